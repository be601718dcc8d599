"""One event-loop timer for many deadlines: the heartbeats of every link of a process.

A link's heartbeat is due every few seconds and almost never does anything but queue a PING;
a sleeping task per link costs a task wake-up, a future and a loop timer each time. Here the
deadlines of all links share one ``loop.call_at``: :class:`TimerWheel` (sans-I/O, no clock)
files each deadline under its *tick*, the deadline rounded up to a multiple of ``resolution``;
:class:`LoopTimers` keeps one loop timer armed for the earliest tick and, when it fires, calls
every callback that is due, in deadline-tick order.

Invariants:

* a callback never runs before its deadline (ticks are rounded up, never down) and runs at most
  one ``resolution`` after it, plus the loop's own lateness;
* each callback is filed at most once: scheduling it again moves it; :meth:`LoopTimers.cancel`
  removes it in O(1); a cancelled or moved entry never fires;
* one loop timer at most is armed per :class:`LoopTimers`, for its earliest non-empty tick.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import weakref
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

#: Default tick (seconds): deadlines are met at most this late.
RESOLUTION = 0.02

T = TypeVar("T", bound=Hashable)


class TimerWheel(Generic[T]):
    """Items filed by deadline tick; no clock and no loop inside (``now`` is passed in)."""

    __slots__ = ("_heap", "_slots", "_tick_of", "resolution")

    def __init__(self, resolution: float = RESOLUTION) -> None:
        if not resolution > 0:
            raise ValueError("resolution must be positive")
        self.resolution = resolution
        self._tick_of: dict[T, int] = {}
        self._slots: dict[int, dict[T, None]] = {}
        self._heap: list[int] = []  # ticks with a slot; each at most once

    def __len__(self) -> int:
        return len(self._tick_of)

    def __contains__(self, item: object) -> bool:
        return item in self._tick_of

    def tick_for(self, when: float) -> int:
        """The first tick whose time is at or after ``when``."""
        tick = math.ceil(when / self.resolution)
        if tick * self.resolution < when:  # rounding of the division: never early
            tick += 1
        return tick

    def add(self, when: float, item: T) -> None:
        """File ``item`` for ``when`` (moving it if it was filed already)."""
        tick = self.tick_for(when)
        old = self._tick_of.get(item)
        if old == tick:
            return
        if old is not None:
            self._unfile(item, old)
        self._tick_of[item] = tick
        slot = self._slots.get(tick)
        if slot is None:
            self._slots[tick] = slot = {}
            heapq.heappush(self._heap, tick)
        slot[item] = None

    def discard(self, item: T) -> None:
        tick = self._tick_of.pop(item, None)
        if tick is not None:
            self._unfile(item, tick, forget=False)

    def next_time(self) -> float | None:
        """The time of the earliest tick with an item (None: nothing filed)."""
        heap = self._heap
        while heap and heap[0] not in self._slots:
            heapq.heappop(heap)  # emptied by discard/move
        return heap[0] * self.resolution if heap else None

    def pop_due(self, now: float) -> list[T]:
        """Remove and return the items of every tick whose time is at or before ``now``."""
        due: list[T] = []
        heap, slots = self._heap, self._slots
        while heap and heap[0] * self.resolution <= now:
            slot = slots.pop(heapq.heappop(heap), None)
            if slot:
                for item in slot:
                    del self._tick_of[item]
                due.extend(slot)
        return due

    def _unfile(self, item: T, tick: int, *, forget: bool = True) -> None:
        if forget:
            del self._tick_of[item]
        slot = self._slots[tick]
        del slot[item]
        if not slot:
            del self._slots[tick]  # its heap entry is skipped when it comes up


Callback = Callable[[], None]


class LoopTimers:
    """A :class:`TimerWheel` of callbacks on one event loop, with one armed ``call_at``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float = RESOLUTION) -> None:
        #: weak, so that a loop that is dropped is not kept by its entry in the per-loop table
        self._loop = weakref.ref(loop)
        self.wheel: TimerWheel[Callback] = TimerWheel(resolution)
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for: float | None = None
        self._firing = False  # callbacks that schedule again do not re-arm one by one

    def __len__(self) -> int:
        return len(self.wheel)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop()
        if loop is None:
            raise RuntimeError("the event loop of these timers is gone")
        return loop

    def schedule(self, when: float, callback: Callback) -> None:
        """Call ``callback`` once, at or after loop time ``when`` (re-scheduling moves it)."""
        self.wheel.add(when, callback)
        if not self._firing:
            self._arm()

    def cancel(self, callback: Callback) -> None:
        self.wheel.discard(callback)
        if not self.wheel and self._handle is not None and not self._firing:
            self._handle.cancel()
            self._handle = self._armed_for = None

    def _arm(self) -> None:
        at = self.wheel.next_time()
        if at == self._armed_for:
            return
        if self._handle is not None:
            self._handle.cancel()
            self._handle = self._armed_for = None
        if at is not None:
            self._handle = self.loop.call_at(at, self._fire)
            self._armed_for = at

    def _fire(self) -> None:
        self._handle = self._armed_for = None
        self._firing = True
        try:
            for callback in self.wheel.pop_due(self.loop.time()):
                try:
                    callback()
                except Exception:
                    log.exception("timer callback %r failed", callback)
        finally:
            self._firing = False
            self._arm()


_per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopTimers] = (
    weakref.WeakKeyDictionary()
)


def loop_timers(loop: asyncio.AbstractEventLoop | None = None) -> LoopTimers:
    """The shared :class:`LoopTimers` of ``loop`` (default: the running loop)."""
    loop = loop or asyncio.get_running_loop()
    timers = _per_loop.get(loop)
    if timers is None:
        _per_loop[loop] = timers = LoopTimers(loop)
    return timers
