"""Random bytes for request ids and WebSocket masks, without a system call each.

``os.urandom`` is one ``getrandom`` system call per call; a relay drew one per request (its
request id) and the agent one per WebSocket message (its mask key). :func:`random_bytes`
hands out the operating system's random bytes from a block of :data:`BLOCK` read at once, so
the source and its strength are the same and the call is made once per few hundred draws.

Invariants: no byte is handed out twice; a forked child starts with an empty block (it never
repeats its parent's bytes).
"""

from __future__ import annotations

import os

#: Bytes read from the operating system at once.
BLOCK = 4096


class RandomPool:
    """A block of the operating system's random bytes, handed out in order."""

    __slots__ = ("_at", "_block")

    def __init__(self) -> None:
        self._block = b""
        self._at = 0

    def take(self, n: int) -> bytes:
        """``n`` random bytes never handed out before."""
        start = self._at
        end = start + n
        if end > len(self._block):
            self._block = os.urandom(max(BLOCK, n))
            start, end = 0, n
        self._at = end
        return self._block[start:end]

    def forget(self) -> None:
        """Drop the block (a forked child's copy of its parent's)."""
        self._block = b""
        self._at = 0


_POOL = RandomPool()
os.register_at_fork(after_in_child=_POOL.forget)


def random_bytes(n: int) -> bytes:
    """``n`` bytes from the operating system's random source (see the module docstring)."""
    return _POOL.take(n)
