"""Every log call built as in production, in every test; and the log lines of processes.

`LogCheck` (installed for each test by tests/conftest.py) configures logging with the
project's own `configure_logging` at DEBUG, then formats every record with both of its
formatters (text and JSON), and records whatever goes wrong on the way: a `LogRecord` that
cannot be made (an `extra=` key clashing with a record attribute raises `KeyError` only when
the level is enabled), a message whose `%` arguments do not fit, a value the JSON formatter
cannot write, an error any handler met (logging's `handleError` would print it and go on).
The test that made such a call fails at teardown, naming it.

For processes (`hps serve`, bots, workers), `parse_json_lines` reads their JSON log lines
and `problems` lists the lines at ERROR or above and any sign of a broken log call.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Iterable
from typing import Any

import pytest

from hps.logs import JsonFormatter, TextFormatter, configure_logging

# What logging prints to stderr when a handler failed (`Handler.handleError`).
LOGGING_ERROR = "--- Logging error ---"


class _FormatEverything(logging.Handler):
    """Formats each record with both production formatters; output discarded."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.errors = errors
        self.formatters = (TextFormatter(), JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        for formatter in self.formatters:
            try:
                formatter.format(record)
            except Exception:
                self.errors.append(_describe(record, type(formatter).__name__))


def _describe(record: logging.LogRecord | None, where: str) -> str:
    origin = f"{record.pathname}:{record.lineno} {record.msg!r}" if record is not None else "?"
    return f"{where}: {origin}\n{traceback.format_exc()}"


class LogCheck:
    """Install with `start()`, remove with `stop()`; `errors` holds what went wrong."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.errors: list[str] = []
        self.monkeypatch = monkeypatch
        self.handler = _FormatEverything(self.errors)

    def start(self) -> None:
        configure_logging("DEBUG", "text", secrets=["log-check-secret"])
        logging.getLogger().addHandler(self.handler)
        errors = self.errors
        make_record = logging.Logger.makeRecord

        def checked_make_record(logger: logging.Logger, *args: Any, **kwargs: Any) -> Any:
            try:
                return make_record(logger, *args, **kwargs)
            except Exception:
                errors.append(
                    f"making a record of {logger.name}: {args[4]!r}\n" + traceback.format_exc()
                )
                raise

        def handle_error(handler: logging.Handler, record: logging.LogRecord) -> None:
            errors.append(_describe(record, type(handler).__name__))

        self.monkeypatch.setattr(logging.Logger, "makeRecord", checked_make_record)
        self.monkeypatch.setattr(logging.Handler, "handleError", handle_error)

    def stop(self) -> None:
        logging.getLogger().removeHandler(self.handler)

    def check(self) -> None:
        if self.errors:
            pytest.fail(
                f"{len(self.errors)} log call(s) failed to build or format:\n\n"
                + "\n".join(self.errors[:5]),
                pytrace=False,
            )


def parse_json_lines(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(the JSON log records, the rest) of a process's output. A record may follow other
    output on its line (a progress bar drawn with carriage returns, no newline)."""
    decoder = json.JSONDecoder()
    records, others = [], []
    for line in text.splitlines():
        start = line.find('{"')
        if start >= 0:
            try:
                record, end = decoder.raw_decode(line, start)
            except json.JSONDecodeError:
                pass
            else:
                records.append(record)
                line = line[:start] + line[end:]
        if line.strip():
            others.append(line)
    return records, others


def problems(
    records: Iterable[dict[str, Any]], others: Iterable[str], allowed: Iterable[str] = ()
) -> list[str]:
    """Log records at ERROR or above (unless their message contains one of `allowed`),
    and other lines showing a traceback or a failed log call."""
    allowed = list(allowed)
    found = [
        json.dumps(r)
        for r in records
        if r.get("level") in ("ERROR", "CRITICAL")
        and not any(a in str(r.get("msg")) for a in allowed)
    ]
    found += [line for line in others if LOGGING_ERROR in line or line.startswith("Traceback")]
    return found
