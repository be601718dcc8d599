"""The local/DMZ proxy's TCP mode: each accepted connection spliced to ``tcp://host:port``.

Used when the portal is reached over TLS end to end: the proxy never sees the plaintext, it
copies bytes. Each client connection gets one :class:`TcpForward`: two ``asyncio.Protocol``
sides whose received bytes are written to the other side.

Invariants:

* Backpressure is end to end: when one side's write buffer is above its high-water mark, the
  other side stops reading until it drains, so a slow reader never grows the proxy's memory.
* Half-close passes through: an EOF from one side becomes ``write_eof`` on the other, and the
  connection closes once both directions have ended. (A TLS listener cannot half-close: there,
  the end of one direction closes the other side after its pending bytes are written.)
* An abortive end (reset) of one side aborts the other; a clean end closes it after a flush.
* A client is not read from until the upstream connection is up (what one read brought before
  the pause took effect waits, and is sent first); a refused or timed-out
  upstream closes the client connection (there is no protocol in which to say why; the log
  says it).
* A connection with no byte moving either way for ``idle_timeout`` is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import cast

from shared.errors import InvalidState
from tenant_agent.proxy.config import ProxyConfig

log = logging.getLogger("csc_agent.proxy.tcp")


class _Side(asyncio.Protocol):
    """One end of a :class:`TcpForward` (the client's or the upstream's connection)."""

    def __init__(self, forward: TcpForward, name: str) -> None:
        self.forward = forward
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        self.forward.side_made(self)

    def data_received(self, data: bytes) -> None:
        self.forward.relay(self, data)

    def eof_received(self) -> bool | None:
        self.eof = True
        return self.forward.half_close(self)

    def pause_writing(self) -> None:
        self.forward.set_reading(self.forward.other(self), False)

    def resume_writing(self) -> None:
        self.forward.set_reading(self.forward.other(self), True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.forward.side_lost(self, exc)


class TcpForward:
    """One client connection and its upstream connection, spliced."""

    def __init__(self, frontend: TcpFrontend) -> None:
        self.frontend = frontend
        self.loop = asyncio.get_running_loop()
        self.client = _Side(self, "client")
        self.upstream = _Side(self, "upstream")
        self.peer = ""
        self.bytes_up = 0
        self.bytes_down = 0
        self._last_activity = self.loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        #: What the client sent before the upstream connection was up (at most one read).
        self._early: list[bytes] = []
        self._early_eof = False

    def other(self, side: _Side) -> _Side:
        return self.upstream if side is self.client else self.client

    # -- called by the sides -----------------------------------------------------------------

    def side_made(self, side: _Side) -> None:
        if side is not self.client:
            return
        if side.transport is None:
            raise InvalidState("side_made before the side's connection was made")
        peer = side.transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"
        # read nothing before the upstream is there; uvloop starts reading only after
        # connection_made returns, so the pause is also repeated once that has happened
        side.transport.pause_reading()
        self.loop.call_soon(self._hold_client)
        self._task = self.loop.create_task(self._connect())
        self.frontend.track(self, self._task)
        self._arm()

    def relay(self, side: _Side, data: bytes) -> None:
        self._last_activity = self.loop.time()
        if side is self.client:
            self.bytes_up += len(data)
        else:
            self.bytes_down += len(data)
        target = self.other(side).transport
        if target is None:  # client bytes that came before the upstream connection
            self._early.append(data)
            self._hold_client()
        elif not target.is_closing():
            target.write(data)

    def _hold_client(self) -> None:
        """Stop reading the client until the upstream connection is up."""
        client = self.client.transport
        if self.upstream.transport is None and client is not None and not client.is_closing():
            client.pause_reading()

    def half_close(self, side: _Side) -> bool:
        """``side`` sent EOF: pass it on."""
        other = self.other(side)
        target = other.transport
        if target is None:
            self._early_eof = True  # passed on once the upstream connection is up
        elif not target.is_closing():
            if target.can_write_eof():
                target.write_eof()
            else:
                target.close()  # TLS cannot half-close: end that direction with the connection
        if other.eof:
            self.close()
        own = side.transport
        # keep ``side`` open to write the other direction (a TLS transport closes regardless)
        return own is not None and own.can_write_eof()

    def set_reading(self, side: _Side, on: bool) -> None:
        transport = side.transport
        if transport is None or transport.is_closing():
            return
        if on:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        other = self.other(side).transport
        if other is not None and not other.is_closing():
            if exc is None:
                other.close()  # a clean end: flush what is pending first
            else:
                other.abort()
        if self.client.closed and (self.upstream.closed or self.upstream.transport is None):
            self._finish()

    # -- lifecycle ---------------------------------------------------------------------------

    async def _connect(self) -> None:
        config = self.frontend.config
        host, port = config.tcp_address
        try:
            async with asyncio.timeout(config.upstream_connect_timeout):
                await self.loop.create_connection(lambda: self.upstream, host, port)
        except (OSError, TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
            log.warning("tcp %s: connecting to %s:%d failed: %s", self.peer, host, port, reason)
            self.abort()
            return
        client = self.client.transport
        if self.client.closed or client is None or client.is_closing():
            self.abort()
            return
        log.debug("tcp %s: connected to %s:%d", self.peer, host, port)
        upstream = self.upstream.transport
        if upstream is None:
            raise InvalidState("connected without an upstream transport")
        if self._early:
            upstream.writelines(self._early)
            self._early.clear()
        if self._early_eof:
            upstream.write_eof()
        else:
            client.resume_reading()

    def close(self) -> None:
        """Both directions ended: close both sides after their pending bytes."""
        for side in (self.client, self.upstream):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.close()

    def abort(self) -> None:
        for side in (self.client, self.upstream):
            if side.transport is not None and not side.closed:
                side.transport.abort()
        if self.upstream.transport is None and self.client.closed:
            self._finish()

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.frontend.forget(self):
            log.info(
                "tcp %s: closed (%d bytes up, %d down)",
                self.peer,
                self.bytes_up,
                self.bytes_down,
                extra={
                    "client": self.peer,
                    "bytes_in": self.bytes_up,
                    "bytes_out": self.bytes_down,
                },
            )

    def _arm(self) -> None:
        deadline = self._last_activity + self.frontend.config.idle_timeout
        self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.loop.time() < self._last_activity + self.frontend.config.idle_timeout:
            self._arm()
            return
        log.info("tcp %s: idle for %g s, closing", self.peer, self.frontend.config.idle_timeout)
        self.abort()


class TcpFrontend:
    """The TCP mode's shared state: settings and live forwards (for the drain)."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.forwards: set[TcpForward] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._empty = asyncio.Event()
        self._empty.set()

    def protocol(self) -> asyncio.Protocol:
        """The protocol factory of the listener: the client side of a new forward."""
        return TcpForward(self).client

    def track(self, forward: TcpForward, task: asyncio.Task[None]) -> None:
        self.forwards.add(forward)
        self._empty.clear()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget(self, forward: TcpForward) -> bool:
        if forward not in self.forwards:
            return False
        self.forwards.discard(forward)
        if not self.forwards:
            self._empty.set()
        return True

    def begin_drain(self) -> None:
        """Nothing to announce in TCP: connections in flight just carry on."""

    async def wait_idle(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._empty.wait()
        return not self.forwards

    async def close(self) -> None:
        for forward in list(self.forwards):
            forward.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
