"""A TCP proxy that adds latency in each direction, for tests and benchmarks on loopback.

``DelayProxy(target_host, target_port, delay)`` listens on 127.0.0.1 (port 0 by default) and
forwards every accepted connection to the target. Each chunk read from one side is written to
the other side ``delay`` seconds later, so a round trip through the proxy costs ``2 * delay``.

Invariants:

* Order is preserved per direction: chunks wait in a FIFO and one timer (``loop.call_at``) per
  direction serves its head, so many chunks are in flight at once and throughput is not bounded
  by ``chunk / delay`` (a bandwidth-delay product of up to ``queue_limit`` bytes per direction).
* EOF (half-close) is forwarded after the chunks read before it, also ``delay`` later; the
  connection closes once both directions have seen EOF.
* Backpressure: reading from a side pauses while the other side's write buffer is full or the
  direction's queue holds more than ``queue_limit`` bytes.
* A reset or error on either side aborts both at once; :meth:`DelayProxy.kill_connections`
  aborts every proxied connection with a TCP RST (fault injection).
* At ``delay == 0`` with an empty queue a chunk is written straight through.

``python -m tests.support.delayproxy --target host:port --delay 0.025 --ready-file PATH``
runs it as a process; the ready file holds ``{"listen": "host:port", "pid": N}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import struct
from collections import deque
from typing import Any, cast

from shared.allocator import keep_freed_memory
from shared.runtime import format_hostport, wait_for_stop_signal, write_ready_file
from shared.runtime import run as run_main
from tests.support.readyfile import parse_hostport

DEFAULT_QUEUE_LIMIT = 32 * 1024 * 1024
EARLY = 0.0005  # timers may fire this much early; chunks due by then go out too


class _Pipe:
    """One direction: bytes read from ``src`` reach ``dst`` ``delay`` seconds later."""

    def __init__(self, proxy: DelayProxy, conn: _Connection) -> None:
        self._proxy = proxy
        self._conn = conn
        self._loop = asyncio.get_running_loop()
        self.src: asyncio.Transport | None = None
        self.dst: asyncio.Transport | None = None
        self._queue: deque[tuple[float, bytes | None]] = deque()
        self._queued = 0
        self._timer: asyncio.TimerHandle | None = None
        self._dst_full = False
        self._over_limit = False
        self.eof_sent = False

    def feed(self, data: bytes | None) -> None:
        """Queue ``data`` (``None``: EOF) for delivery after the current delay."""
        delay = self._proxy.delay
        if delay <= 0 and not self._queue and self.dst is not None:
            self._deliver(data)
            return
        self._queue.append((self._loop.time() + delay, data))
        self._queued += len(data) if data else 0
        if self._queued > self._proxy.queue_limit and not self._over_limit:
            self._over_limit = True
            self._update_reading()
        self._schedule()

    def attach(self, dst: asyncio.Transport) -> None:
        """Start delivering to ``dst``; bytes read before it existed are queued until now."""
        self.dst = dst
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is None and self._queue and self.dst is not None:
            self._timer = self._loop.call_at(self._queue[0][0], self._flush)

    def _flush(self) -> None:
        self._timer = None
        horizon = self._loop.time() + EARLY
        first = True
        while self._queue and (first or self._queue[0][0] <= horizon):
            first = False
            _, data = self._queue.popleft()
            self._queued -= len(data) if data else 0
            self._deliver(data)
        if self._over_limit and self._queued <= self._proxy.queue_limit // 2:
            self._over_limit = False
            self._update_reading()
        self._schedule()

    def _deliver(self, data: bytes | None) -> None:
        dst = self.dst
        if dst is None or dst.is_closing():
            return
        if data is not None:
            dst.write(data)
            return
        if dst.can_write_eof():
            dst.write_eof()
        self.eof_sent = True
        self._conn.maybe_finished()

    def set_dst_full(self, full: bool) -> None:
        """Flow control from ``dst``'s transport (``pause_writing``/``resume_writing``)."""
        self._dst_full = full
        self._update_reading()

    def _update_reading(self) -> None:
        src = self.src
        if src is None or src.is_closing():
            return
        if self._dst_full or self._over_limit:
            if src.is_reading():
                src.pause_reading()
        elif not src.is_reading():
            src.resume_reading()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()
        self._queued = 0


class _Side(asyncio.Protocol):
    """The protocol of one socket of a proxied connection; it only routes events."""

    def __init__(self, conn: _Connection, outgoing: _Pipe, incoming: _Pipe) -> None:
        self._conn = conn
        self._outgoing = outgoing  # bytes this side reads
        self._incoming = incoming  # bytes written to this side
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self._conn.side_made(self)

    def data_received(self, data: bytes) -> None:
        self._outgoing.feed(data)

    def eof_received(self) -> bool:
        self._outgoing.feed(None)
        return True  # stay half-open; _Connection closes once both directions ended

    def pause_writing(self) -> None:
        self._incoming.set_dst_full(True)

    def resume_writing(self) -> None:
        self._incoming.set_dst_full(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._conn.side_lost(exc)


class _Connection:
    """One accepted client and its connection to the target."""

    def __init__(self, proxy: DelayProxy) -> None:
        self._proxy = proxy
        self.up = _Pipe(proxy, self)  # client -> target
        self.down = _Pipe(proxy, self)  # target -> client
        self.client = _Side(self, outgoing=self.up, incoming=self.down)
        self.target = _Side(self, outgoing=self.down, incoming=self.up)
        self._connect_task: asyncio.Task[Any] | None = None
        self._done = False

    def side_made(self, side: _Side) -> None:
        transport = side.transport
        assert transport is not None
        if side is self.client:
            self.up.src = transport
            transport.pause_reading()  # until the target is connected (bytes before are queued)
            self._proxy._connections.add(self)
            self._connect_task = asyncio.get_running_loop().create_task(self._connect())
        elif self._done:
            transport.abort()
        else:
            # Wire both directions before the target can deliver its first byte.
            assert self.client.transport is not None
            self.down.src = transport
            self.down.attach(self.client.transport)
            self.up.attach(transport)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: self.target, *self._proxy.target)
        except OSError:
            self.abort(rst=True)
            return
        client_t = self.client.transport
        if not self._done and client_t is not None and not client_t.is_closing():
            client_t.resume_reading()

    def maybe_finished(self) -> None:
        if self.up.eof_sent and self.down.eof_sent:
            self._finish()
            for side in (self.client, self.target):
                if side.transport is not None:
                    side.transport.close()

    def side_lost(self, exc: Exception | None) -> None:
        if not self._done:
            self.abort(rst=exc is not None)

    def abort(self, *, rst: bool) -> None:
        """Drop queued bytes and abort both sockets (with a TCP RST when ``rst``)."""
        self._finish()
        for side in (self.client, self.target):
            transport = side.transport
            if transport is None or transport.is_closing():
                continue
            if rst:
                _set_linger_zero(transport)
            transport.abort()

    def _finish(self) -> None:
        self._done = True
        self.up.cancel()
        self.down.cancel()
        if self._connect_task is not None and not self._connect_task.done():
            self._connect_task.cancel()
        self._proxy._connections.discard(self)


def _set_linger_zero(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class DelayProxy:
    """Forward TCP connections to ``target_host:target_port`` adding ``delay`` s per direction."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        delay: float = 0.0,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
    ) -> None:
        self.target = (target_host, target_port)
        self.delay = delay
        self.queue_limit = queue_limit
        self._listen = (listen_host, listen_port)
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()

    @property
    def delay(self) -> float:
        """Seconds each chunk waits per direction; changing it affects chunks read afterwards."""
        return self._delay

    @delay.setter
    def delay(self, value: float) -> None:
        if value < 0:
            raise ValueError("delay must be >= 0")
        self._delay = float(value)

    @property
    def port(self) -> int:
        """The listening port (after :meth:`start`)."""
        if self._server is None:
            raise RuntimeError("DelayProxy is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def host(self) -> str:
        return self._listen[0]

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self).client, self._listen[0], self._listen[1]
        )

    def kill_connections(self) -> int:
        """Abort every proxied connection with a TCP RST; returns how many were killed."""
        victims = list(self._connections)
        for conn in victims:
            conn.abort(rst=True)
        return len(victims)

    async def close(self) -> None:
        """Stop listening and abort all connections."""
        if self._server is not None:
            self._server.close()
        self.kill_connections()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> DelayProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# --- command line --------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.support.delayproxy")
    parser.add_argument("--target", required=True, help="host:port to forward to")
    parser.add_argument("--delay", type=float, default=0.025, help="seconds per direction")
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port (default %(default)s)")
    parser.add_argument("--ready-file", default=None, help="write the bound address here (JSON)")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    listen_host, listen_port = parse_hostport(args.listen)
    proxy = DelayProxy(
        *parse_hostport(args.target), args.delay, listen_host=listen_host, listen_port=listen_port
    )
    await proxy.start()
    info = {"listen": format_hostport(listen_host, proxy.port), "pid": os.getpid()}
    print(f"delay proxy listening: {info} -> {args.target} (+{args.delay}s)", flush=True)
    if args.ready_file:
        write_ready_file(args.ready_file, info)
    try:
        await wait_for_stop_signal()
    finally:
        await proxy.close()


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()  # like the relay: held chunks must not fault in fresh pages each time
    run_main(_serve(_parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
