"""Process-wide logging setup for the entry points: one event per line on stderr.

Two formats. ``json`` (what ``auto``, the default, picks when stderr is not a terminal) writes one JSON object per line::

    {"ts": "2024-05-01T12:00:00.123Z", "level": "info", "component": "csc",
     "logger": "csc.relay.gateway", "msg": "agent connected", "tenant": "acme", "request_id": "…"}

Fields passed with ``extra=`` (``request_id``, ``tenant``, ``status``, …) become keys of the
object; a traceback is the ``exc`` key. ``text`` writes
``2024-05-01T12:00:00.123Z INFO csc csc.relay.gateway: message key=value`` for people at a terminal.

Only entry points call :func:`configure_logging`; library modules just use
``logging.getLogger(__name__)``. Calling it again replaces the handler it installed before
(tests, re-configuration), never a foreign one. As a last line of defence against a secret
reaching a log, anything shaped like a JWT or a ``Bearer`` credential is replaced by
``[redacted]`` in every line; code must still never log tokens or passwords.
``auto`` (:func:`resolve_format`) picks ``text`` when the stream is a terminal, else ``json``.

:func:`log_event` is for events written once per request on a hot path (the CSC's access log):
it writes the same line :meth:`logging.Logger.log` would, with the same redaction, straight to
the stream of the handler installed here, at a fraction of the cost (no ``LogRecord``, no
generic extras scan); when anything else would see the record (another handler, a filter, a
test's capture handler) it goes through :mod:`logging` instead.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from collections.abc import Mapping
from json.encoder import encode_basestring
from typing import Any, TextIO

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FORMATS = ("json", "text")
#: what ``log_format`` may say: a format, or ``auto`` (text on a terminal, JSON otherwise)
FORMAT_CHOICES = ("auto", *FORMATS)
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
    lowered = text.lower()  # a cheap test first: most lines hold neither
    if "eyj" not in lowered and "bearer" not in lowered:
        return text
    return _SECRET_RE.sub("[redacted]", text)


def _timestamp(record: logging.LogRecord) -> str:
    return _stamp(record.created, int(record.msecs))


def _stamp(created: float, msecs: int) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{stamp}.{msecs:03d}Z"


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


def resolve_format(fmt: str, stream: TextIO) -> str:
    """``fmt``, with ``auto`` made ``text`` when ``stream`` is a terminal and ``json`` otherwise."""
    if fmt not in FORMAT_CHOICES:
        raise ValueError(f"unknown log format {fmt!r} (one of {', '.join(FORMAT_CHOICES)})")
    if fmt != "auto":
        return fmt
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "json"


def configure_logging(
    level: str, component: str, *, stream: TextIO | None = None, fmt: str = "auto"
) -> None:
    """Send every log record at ``level`` or above to ``stream`` (stderr), one event per line,
    in ``fmt`` (``json``, ``text`` or ``auto``: see :func:`resolve_format`)."""
    try:
        numeric = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r} (one of {', '.join(LEVELS)})") from None
    out = stream if stream is not None else sys.stderr
    fmt = resolve_format(fmt, out)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter(component) if fmt == "json" else TextFormatter(component))
    setattr(handler, _MARK, True)
    root.addHandler(handler)
    root.setLevel(numeric)
    _outputs[:] = [(handler, fmt, component)]


_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)
#: (handler, format, component) of the handler :func:`configure_logging` installed last
_outputs: list[tuple[logging.StreamHandler[TextIO], str, str]] = []


def _direct_output(
    logger: logging.Logger, level: int
) -> tuple[logging.StreamHandler[TextIO], str, str] | None:
    """Our handler, when it is the only thing a ``level`` record of ``logger`` would reach."""
    if not _outputs:
        return None
    output = _outputs[0]
    ours = [output[0]]
    if output[0].filters or level < output[0].level:
        return None
    node: logging.Logger | None = logger
    while node is not None:
        if node.filters or (node.handlers and node.handlers != ours):
            return None
        if not node.propagate or node.parent is None:
            return output if node.handlers == ours else None
        node = node.parent
    return None  # pragma: no cover - the root logger ends every chain


_BASE_KEYS = frozenset({"ts", "level", "component", "logger", "msg"})
_second: list[Any] = [None, ""]  # the last whole second stamped, and its text


def _fast_stamp(created: float) -> str:
    """:func:`_stamp`, formatting the date and time once per second."""
    second = int(created)
    if second != _second[0]:
        _second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))]
    return f"{_second[1]}.{int((created - second) * 1000):03d}Z"


def _json_value(value: Any) -> str:
    """``value`` as ``json.dumps(value, ensure_ascii=False, default=str)`` writes it."""
    kind = type(value)
    if kind is str:
        return encode_basestring(value)
    if kind is int or (kind is float and math.isfinite(value)):
        return repr(value)
    if value is None:
        return "null"
    return _ENCODER.encode(value)


def render_event(
    fmt: str,
    component: str,
    logger: str,
    level: int,
    msg: str,
    fields: Mapping[str, Any],
    *,
    created: float | None = None,
) -> str:
    """The line :class:`JsonFormatter` or :class:`TextFormatter` writes for an event logged at
    ``created`` (default: now) with ``extra=fields`` (no exception), redacted. Keys that
    ``extra=`` may not hold (the attributes of a ``LogRecord``) are the caller's to avoid."""
    created = time.time() if created is None else created
    stamp = _fast_stamp(created)
    name = logging.getLevelName(level)
    if fmt == "json":
        parts = [
            f'{{"ts": "{stamp}", "level": "{name.lower()}", "component": '
            f"{encode_basestring(component)}, "
            f'"logger": {encode_basestring(logger)}, "msg": {encode_basestring(msg)}'
        ]
        for key, value in fields.items():
            if key not in _BASE_KEYS and not key.startswith("_"):
                parts.append(f", {encode_basestring(key)}: {_json_value(value)}")
        parts.append("}")
        return redact("".join(parts))
    line = f"{stamp} {name} {component} {logger}: {msg}"
    extras = [f"{k}={v}" for k, v in fields.items() if not k.startswith("_")]
    if extras:
        line += " " + " ".join(extras)
    return redact(line.replace("\n", "\n    "))


def log_event(logger: logging.Logger, level: int, msg: str, fields: Mapping[str, Any]) -> None:
    """``logger.log(level, msg, extra=fields)``, cheaper (see the module docstring). ``msg`` is
    final (no %-arguments); the caller checks ``logger.isEnabledFor(level)`` first."""
    output = _direct_output(logger, level)
    if output is None:
        logger.log(level, "%s", msg, extra=dict(fields))
        return
    handler, fmt, component = output
    line = render_event(fmt, component, logger.name, level, msg, fields) + handler.terminator
    handler.acquire()
    try:
        handler.stream.write(line)
        handler.flush()
    finally:
        handler.release()


#: for writers that batch events themselves (csc/relay/accesslog.py): our handler when it alone would
#: see a record, and the timestamp as the formatters write it
direct_output = _direct_output
fast_stamp = _fast_stamp
