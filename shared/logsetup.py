"""Process-wide logging setup for the entry points: one event per line on stderr.

Two formats. ``json`` (the default for services) writes one JSON object per line::

    {"ts": "2024-05-01T12:00:00.123Z", "level": "info", "component": "csc",
     "logger": "csc.gateway", "msg": "agent connected", "tenant": "acme", "request_id": "…"}

Fields passed with ``extra=`` (``request_id``, ``tenant``, ``status``, …) become keys of the
object; a traceback is the ``exc`` key. ``text`` writes
``2024-05-01T12:00:00.123Z INFO csc csc.gateway: message key=value`` for people at a terminal.

Only entry points call :func:`configure_logging`; library modules just use
``logging.getLogger(__name__)``. Calling it again replaces the handler it installed before
(tests, re-configuration), never a foreign one. As a last line of defence against a secret
reaching a log, anything shaped like a JWT or a ``Bearer`` credential is replaced by
``[redacted]`` in every line; code must still never log tokens or passwords.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, TextIO

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FORMATS = ("json", "text")
_MARK = "_csc_handler"
# the attributes every LogRecord has; anything else on a record came from ``extra=``
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}
_SECRET_RE = re.compile(
    r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*|(?i:bearer)\s+[A-Za-z0-9._~+/=-]{8,}"
)


def redact(text: str) -> str:
    """``text`` with JWT-shaped strings and ``Bearer`` credentials replaced by ``[redacted]``."""
    return _SECRET_RE.sub("[redacted]", text)


def _timestamp(record: logging.LogRecord) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{stamp}.{int(record.msecs):03d}Z"


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a call passed with ``extra=``, in the order they were given."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per record; values that JSON cannot hold are written as strings."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            event.setdefault(key, value)
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            event["exc"] = record.exc_text
        return redact(json.dumps(event, ensure_ascii=False, default=str))


class TextFormatter(logging.Formatter):
    """``<ts> LEVEL component logger: message key=value…``; continuation lines indented."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {self.component} {record.name}: "
        line += record.getMessage()
        extras = extra_fields(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line.replace("\n", "\n    "))


def configure_logging(
    level: str, component: str, *, stream: TextIO | None = None, fmt: str = "json"
) -> None:
    """Send every log record at ``level`` or above to ``stream`` (stderr), one event per line."""
    try:
        numeric = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r} (one of {', '.join(LEVELS)})") from None
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (one of {', '.join(FORMATS)})")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter(component) if fmt == "json" else TextFormatter(component))
    setattr(handler, _MARK, True)
    root.addHandler(handler)
    root.setLevel(numeric)
