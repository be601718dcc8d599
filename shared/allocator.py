"""Process-wide allocator tuning for the relay processes (glibc only; a no-op elsewhere).

Relaying a download allocates and frees a few buffers of up to a link message (1 MiB) per
message: the link's batch, the WebSocket masked copy and its frame, the reassembled message. With glibc's
default *dynamic* thresholds, those buffers often sit at the top of the heap and every free
trims it back to the OS, so the next message faults in fresh pages (measured: ~2.7 page
faults per relayed 4 KiB and twice the agent's CPU per byte). Fixed thresholds keep such
buffers in the heap: allocations up to 16 MiB come from it, and it is trimmed only when more
than 64 MiB at its top are free.
"""

from __future__ import annotations

import ctypes
import sys

#: glibc's ``mallopt`` parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 16 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024


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
