"""Process-wide allocator and garbage-collector tuning for the relay processes.

Relaying a download allocates and frees a few buffers of up to a link message (1 MiB) per
message: the link's batch, the WebSocket masked copy and its frame, the reassembled message. With glibc's
default *dynamic* thresholds, those buffers often sit at the top of the heap and every free
trims it back to the OS, so the next message faults in fresh pages (measured: ~2.7 page
faults per relayed 4 KiB and twice the agent's CPU per byte). Fixed thresholds keep such
buffers in the heap: allocations up to 16 MiB come from it, and it is trimmed only when more
than 64 MiB at its top are free (glibc only; a no-op elsewhere).

CPython's cyclic collector runs a young collection every 700 container allocations and a full
one (every live object) every 100 young ones once the old objects grew by a quarter. A CSC
with thousands of agent sessions holds millions of objects, so during a burst of handshakes
(every agent reconnecting after a restart) full collections took about half the CPU (measured,
bench/RESULTS.md). :func:`collect_less_often` raises the thresholds: a young collection every
50,000 allocations, a middle one every 20 young ones, a full one every 100 middle ones (and
still only after the old objects grew by a quarter). Reference counting frees everything that
is not in a cycle at once as before; cycles wait longer, bounded by these counts.
"""

from __future__ import annotations

import ctypes
import gc
import sys

#: glibc's ``mallopt`` parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 16 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024
#: the collector's thresholds (``gc.set_threshold``) of :func:`collect_less_often`
GC_THRESHOLDS = (50_000, 20, 100)


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


def collect_less_often() -> tuple[int, int, int]:
    """Raise the cyclic collector's thresholds to :data:`GC_THRESHOLDS`; the previous ones."""
    previous = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    return previous
