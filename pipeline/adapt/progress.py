"""Progress of long stages: a tqdm bar on a terminal, structured log lines in a worker."""

from __future__ import annotations

import logging
import time
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class Progress:
    """Counts work done out of `total`; draws a bar when `bar`, and logs a line (with
    `context` and the postfix values as structured fields) at most every `every` seconds
    and at the end."""

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        bar: bool,
        context: dict[str, Any] | None = None,
        initial: int = 0,
        every: float = 30.0,
        unit: str = "it",
    ) -> None:
        self.total = total
        self.desc = desc
        self.done = initial
        self.context = context or {}  # e.g. the job id, on every line
        self.every = every
        self.postfix: dict[str, Any] = {}
        self._last = time.monotonic()
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not bar)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.done += n
        self.postfix.update(postfix)
        self._bar.update(n)
        if postfix:
            self._bar.set_postfix(
                {k: f"{v:.4f}" if isinstance(v, float) else v for k, v in postfix.items()}
            )
        if time.monotonic() - self._last >= self.every:
            self._log()

    def close(self) -> None:
        self._bar.close()
        self._log()

    def _log(self) -> None:
        self._last = time.monotonic()
        log.info(
            "%s: %d/%d",
            self.desc,
            self.done,
            self.total,
            extra={
                **self.context,
                "stage": self.desc,
                "done": self.done,
                "total": self.total,
                **self.postfix,
            },
        )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
