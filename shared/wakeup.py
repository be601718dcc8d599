"""One task sleeping until what it watches may have changed.

The relay's protocols and streams each have a single consumer task that loops: check a
condition (data queued, writing resumed, a frame arrived), else sleep. :class:`Wakeup` is that
sleep: :meth:`Wakeup.wait` parks the one waiting task; :meth:`Wakeup.set`, called from protocol
callbacks, wakes it. A ``set`` with nobody waiting does nothing, which is safe because the
waiter re-checks its condition before sleeping again (no state is carried between the two).
"""

from __future__ import annotations

import asyncio


class Wakeup:
    """A single waiter's future, created per wait (nothing lives while nobody waits)."""

    __slots__ = ("_future", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._future: asyncio.Future[None] | None = None
        #: the loop the waiter runs on, when the owner knows it: found otherwise at each wait
        #: (``asyncio.get_running_loop`` checks the process id, a system call each time)
        self._loop = loop

    @property
    def waiting(self) -> bool:
        return self._future is not None

    async def wait(self) -> None:
        """Sleep until :meth:`set` (or cancellation). One waiter at a time."""
        loop = self._loop if self._loop is not None else asyncio.get_running_loop()
        self._future = future = loop.create_future()
        try:
            await future
        finally:
            self._future = None

    def set(self) -> None:
        """Wake the waiting task, if there is one."""
        future = self._future
        if future is not None and not future.done():
            future.set_result(None)
