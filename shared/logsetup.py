"""Process-wide logging setup for the entry points: one line per event on stderr.

Format: ``2024-05-01T12:00:00.123Z INFO csc csc.gateway: message``. Only entry points call
:func:`configure_logging`; library modules just use ``logging.getLogger(__name__)``. Calling it
again replaces the handler it installed before (tests, re-configuration), never a foreign one.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_MARK = "_csc_handler"


def _utc(seconds: float | None) -> time.struct_time:
    return time.gmtime(seconds)


class _Formatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__(
            f"%(asctime)s.%(msecs)03dZ %(levelname)s {component} %(name)s: %(message)s",
            datefmt="%Y-%m-%dT%H:%M:%S",
        )
        self.converter = _utc

    def format(self, record: logging.LogRecord) -> str:
        # one event, one line: continuation lines (tracebacks) are indented under it
        return super().format(record).replace("\n", "\n    ")


def configure_logging(level: str, component: str, *, stream: TextIO | None = None) -> None:
    """Send every log record at ``level`` or above to ``stream`` (stderr) as one line."""
    try:
        numeric = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r} (one of {', '.join(LEVELS)})") from None
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_Formatter(component))
    setattr(handler, _MARK, True)
    root.addHandler(handler)
    root.setLevel(numeric)
