"""Download progress on stderr: a redrawn bar on a terminal, a few plain lines otherwise.

Invariants: progress never writes to stdout (which carries the result); the bar is redrawn at
most every :data:`REDRAW_INTERVAL` seconds and always ends with a newline (``finish`` or
``abort``); the plain form prints at most one line per quarter. The clock is injectable so tests
do not depend on time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, TextIO

REDRAW_INTERVAL = 0.1
BAR_WIDTH = 24


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress(Protocol):
    def start(self, total: int, done: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def finish(self) -> None: ...
    def abort(self) -> None: ...


class NullProgress:
    """``--quiet``: nothing at all."""

    def start(self, total: int, done: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        pass


class LineProgress:
    """Not a terminal: a line at the start, at each quarter and at the end."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._total = 0
        self._done = 0
        self._quarter = 0

    def start(self, total: int, done: int) -> None:
        self._total, self._done = total, done
        self._quarter = self._quarters()
        verb = f"resuming at {human_size(done)} of" if done else "downloading"
        self._print(f"download: {verb} {human_size(total)}")

    def advance(self, n: int) -> None:
        self._done += n
        quarter = self._quarters()
        if quarter > self._quarter and quarter < 4:
            self._print(f"download: {quarter * 25}% ({human_size(self._done)})")
        self._quarter = max(quarter, self._quarter)

    def finish(self) -> None:
        self._print(f"download: complete ({human_size(self._done)})")

    def abort(self) -> None:
        self._print(f"download: stopped at {human_size(self._done)} of {human_size(self._total)}")

    def _quarters(self) -> int:
        return self._done * 4 // self._total if self._total else 4

    def _print(self, line: str) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()


class BarProgress:
    """A terminal: one line redrawn in place with a bar, the sizes and the rate."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._clock = clock
        self._total = 0
        self._done = 0
        self._first = 0
        self._started = 0.0
        self._drawn = float("-inf")

    def start(self, total: int, done: int) -> None:
        self._total, self._done, self._first = total, done, done
        self._started = self._clock()
        self._draw(force=True)

    def advance(self, n: int) -> None:
        self._done += n
        self._draw(force=False)

    def finish(self) -> None:
        self._draw(force=True)
        self._stream.write("\n")
        self._stream.flush()

    def abort(self) -> None:
        self.finish()

    def render(self, now: float) -> str:
        fraction = min(1.0, self._done / self._total) if self._total else 1.0
        filled = int(fraction * BAR_WIDTH)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        elapsed = now - self._started
        rate = (self._done - self._first) / elapsed if elapsed > 0 else 0.0
        sizes = f"{human_size(self._done)} of {human_size(self._total)}"
        return f"\r{fraction:4.0%} [{bar}] {sizes}  {human_size(rate)}/s "

    def _draw(self, *, force: bool) -> None:
        now = self._clock()
        if not force and now - self._drawn < REDRAW_INTERVAL:
            return
        self._drawn = now
        self._stream.write(self.render(now))
        self._stream.flush()


def make_progress(
    stream: TextIO, *, quiet: bool, clock: Callable[[], float] = time.monotonic
) -> Progress:
    if quiet:
        return NullProgress()
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        return BarProgress(stream, clock)
    return LineProgress(stream)
