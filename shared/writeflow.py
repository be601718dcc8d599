"""Write flow control for asyncio protocols (the agent's upstream HTTP and WebSocket to the CSC,
the CSC's peer links).

The transport calls ``pause_writing``/``resume_writing`` around its high/low water marks;
:meth:`WriteFlow.drain` waits while writing is paused and raises ``ConnectionResetError`` once
:meth:`WriteFlow.writing_lost` was called, so no writer waits on a dead connection.
"""

from __future__ import annotations

from shared.wakeup import Wakeup


class WriteFlow:
    """Mix into an ``asyncio.Protocol``; call :meth:`writing_lost` from ``connection_lost``."""

    _write_paused = False
    _write_lost = False
    _drain_waiter: Wakeup | None = None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._release_drain()

    def writing_lost(self) -> None:
        self._write_lost = True
        self._release_drain()

    @property
    def writing_paused(self) -> bool:
        return self._write_paused

    async def drain(self) -> None:
        """Return once the transport accepts more data; raise if the connection is gone."""
        while self._write_paused and not self._write_lost:
            if self._drain_waiter is None:
                self._drain_waiter = Wakeup()
            await self._drain_waiter.wait()
        if self._write_lost:
            raise ConnectionResetError("the connection is closed")

    def _release_drain(self) -> None:
        if self._drain_waiter is not None:
            self._drain_waiter.set()
