"""Logging set-up: plain text on a terminal, JSON lines for log shippers, secrets redacted.

Modules log with `log = logging.getLogger(__name__)` and `%s` arguments; context such as a
round or job id goes in `extra={"round_id": ..., "job_id": ...}` and shows up in both formats.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in sorted(extras.items()))
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, default=str)


class RedactingFilter(logging.Filter):
    """Replaces any secret's value in a record's message and arguments with `********`."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def _scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "********")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:
            # A filter runs outside the handler's error handling: raising here would crash
            # the code that logged. The formatter meets the same error and reports it.
            return True
        scrubbed = self._scrub(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        for key, value in _extras(record).items():
            if isinstance(value, str):
                setattr(record, key, self._scrub(value))
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            if text != self._scrub(text):
                record.exc_info = None
                record.exc_text = self._scrub(text)
        return True


# The project's own loggers: `log_level` applies to them; third parties log at INFO at most
# (discord.py's gateway events, filelock, matplotlib's font scan, ... are DEBUG chatter).
OWN_LOGGERS = ("hps", "bot", "pipeline", "db", "cli")


def configure_logging(level: str = "INFO", fmt: str = "text", secrets: Iterable[str] = ()) -> None:
    """Install one stderr handler on the root logger (idempotent): the project's loggers
    at `level`, everyone else's at `level` or INFO, whichever is quieter."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_hps", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._hps = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter(secrets))
    root.addHandler(handler)
    own = logging.getLevelName(level)
    root.setLevel(max(own, logging.INFO))
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(own)
    # pgserver logs each pg_ctl command's whole output at INFO.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
