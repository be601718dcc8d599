"""One blocking re-read shared by every caller that asked while it was pending.

Each agent handshake re-reads the registry's catalog (a revocation or suspension made by
another process must count at once), in a worker thread since the store may be a remote
database. Hundreds of handshakes a second each running their own re-read queue up on the
store's one reading connection; :class:`SharedRefresh` runs them as a group instead.

Invariant: a caller's wait ends with a re-read that *started after* the caller asked, so it
sees every change committed before it asked, exactly as if it had run its own. Callers that
ask while a re-read runs share the next one, which starts when the running one ends; so at
most one re-read runs at a time and at most one more is pending. A failed re-read raises its
exception in every caller that shared it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class SharedRefresh:
    """``await shared()`` runs ``refresh`` in the loop's default executor, shared as above."""

    def __init__(self, refresh: Callable[[], object]) -> None:
        self._refresh = refresh
        self._running: asyncio.Future[None] | None = None
        self._next: asyncio.Future[None] | None = None
        #: re-reads started (for tests and benchmarks)
        self.runs = 0

    async def __call__(self) -> None:
        loop = asyncio.get_running_loop()
        if self._running is None:
            waiter = self._start(loop, loop.create_future())
        else:  # the running one may have started before this call: wait for the next one
            if self._next is None:
                self._next = loop.create_future()
            waiter = self._next
        await asyncio.shield(waiter)

    def _start(
        self, loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[None]
    ) -> asyncio.Future[None]:
        self._running = waiter
        self.runs += 1
        work = loop.run_in_executor(None, self._refresh)
        work.add_done_callback(lambda done: self._finished(loop, waiter, done))
        return waiter

    def _finished(
        self,
        loop: asyncio.AbstractEventLoop,
        waiter: asyncio.Future[None],
        done: asyncio.Future[object],
    ) -> None:
        self._running = None
        if not waiter.done():
            if done.cancelled():
                waiter.cancel()
            elif (exc := done.exception()) is not None:
                waiter.set_exception(exc)
                waiter.exception()  # retrieved here too: every caller may have gone
            else:
                waiter.set_result(None)
        pending, self._next = self._next, None
        if pending is not None:
            self._start(loop, pending)
