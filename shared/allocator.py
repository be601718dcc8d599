"""Process-wide allocator tuning for the relay processes (glibc only; a no-op elsewhere).

Relaying a download allocates and frees a few buffers of up to a link message (1 MiB) per
message: the link's batch, the WebSocket masked copy and its frame, the reassembled message. With glibc's
default *dynamic* thresholds, those buffers often sit at the top of the heap and every free
trims it back to the OS, so the next message faults in fresh pages (measured: ~2.7 page
faults per relayed 4 KiB and twice the agent's CPU per byte). Fixed thresholds keep such
buffers in the heap: allocations up to 16 MiB come from it, and it is trimmed only when more
than 64 MiB at its top are free.

The price of those thresholds is that memory freed after a burst stays in the heap: after a
storm of hostile connections the CSC kept most of its peak RSS indefinitely although Python's
own live allocations were back to their resting size (tracemalloc). :func:`return_free_memory`
runs for the process's lifetime and, every ``interval`` seconds, gives the heap's free pages
back (``malloc_trim(0)``) once more than ``slack`` bytes that were in use are free again
(``mallinfo2``, see :class:`TrimPolicy`), so a node that weathered a burst returns close to
its resting size within seconds, while a steady load gives its free buffers back at most once
per interval (a few page faults per interval).

Much of what a burst leaves behind is not free yet but garbage in reference cycles (closed
connections, exceptions with their frames and buffers), which only a full collection frees;
Python starts one only after enough new allocations, which a process that went quiet after
the burst may never make (measured: 7-11 MiB in the hostile-tenant storm, once the whole
34 MiB above rest). So the same loop runs one full collection when the process, busy before,
has gone quiet (:class:`CollectPolicy`), before it looks at the heap.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import sys
from functools import cache

#: glibc's ``mallopt`` parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 16 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024
#: How often :func:`return_free_memory` looks, and the free heap bytes that make it trim.
RETURN_INTERVAL = 5.0
RETURN_SLACK = 4 * 1024 * 1024
#: Young-generation collections in one interval up to which the process counts as quiet.
QUIET_COLLECTIONS = 2


def keep_freed_memory() -> bool:
    """Set fixed glibc malloc thresholds; True if they were applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


class _Mallinfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (malloc.h, glibc 2.33 and later)."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _Mallinfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # not glibc, or older than 2.33
        return None
    return libc


def free_heap_bytes() -> int:
    """Bytes malloc holds free in its arenas (``mallinfo2().fordblks``); 0 if unknown."""
    libc = _libc()
    return 0 if libc is None else int(libc.mallinfo2().fordblks)


def trim_heap() -> bool:
    """``malloc_trim(0)``: give every free page of the heap back; True if any was."""
    libc = _libc()
    return libc is not None and bool(libc.malloc_trim(0))


class TrimPolicy:
    """When to trim, from samples of the heap's free bytes (pure: no clock, no libc).

    A trim leaves the freed chunks in malloc's books (their pages are returned, the bytes
    still count as free), so "much is free" alone would trim on every sample. Instead: trim
    when the free bytes rose more than ``slack`` above their lowest sample since the last trim
    (memory that was in use and is free now), and start over from the figure after the trim.
    The first sample trims once, whatever it finds: what start-up (imports, configuration,
    the first connections) used and freed would otherwise stay for the process's life, since
    it is below any later low mark (measured: 0.6 MiB of the agent's idle RSS).
    """

    def __init__(self, slack: int = RETURN_SLACK) -> None:
        self.slack = slack
        self.low: int | None = None

    def due(self, free: int) -> bool:
        """Record a sample; True when a trim is due."""
        if self.low is None:  # the first sample: give back what start-up left free
            self.low = free
            return True
        self.low = min(self.low, free)
        return free - self.low > self.slack

    def trimmed(self, free: int) -> None:
        """Record the free bytes right after a trim."""
        self.low = free


class CollectPolicy:
    """When to run a full collection, from samples of the number of young-generation
    collections so far (pure): once, at the first sample after a busy interval (more than
    ``quiet`` of them) that finds the process quiet again."""

    def __init__(self, quiet: int = QUIET_COLLECTIONS) -> None:
        self.quiet = quiet
        self.last: int | None = None
        self.busy = False

    def due(self, young: int) -> bool:
        """Record a sample; True when a full collection is due."""
        last, self.last = self.last, young
        if last is None:
            return False
        if young - last > self.quiet:
            self.busy = True
            return False
        if self.busy:
            self.busy = False
            return True
        return False


def young_collections() -> int:
    """How many young-generation collections the interpreter has run so far."""
    return int(gc.get_stats()[0]["collections"])


async def return_free_memory(interval: float = RETURN_INTERVAL, slack: int = RETURN_SLACK) -> None:
    """Forever, every ``interval`` seconds: one full collection when :class:`CollectPolicy`
    says so, then a trim of the heap when :class:`TrimPolicy` does (glibc only)."""
    libc = _libc()
    policy, collect = TrimPolicy(slack), CollectPolicy()
    while True:
        await asyncio.sleep(interval)
        if collect.due(young_collections()):
            gc.collect()
        if libc is not None and policy.due(free_heap_bytes()):
            trim_heap()
            policy.trimmed(free_heap_bytes())
