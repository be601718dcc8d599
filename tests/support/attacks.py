"""Raw hostile clients and agents for the hardening tests (loopback only).

Agents (threads with plain blocking sockets, speaking the WebSocket through websockets'
sans-I/O client and the link through :class:`shared.protocol.Connection`): :class:`Flooder`
completes the real handshake, then sends messages full of PINGs (each needs a PONG) and never
reads again; :class:`Yielder` sends GOAWAY at once and keeps its link; :class:`LyingAgent`
reads its link and answers every GET with a body shorter or
longer than the ``Content-Length`` it announced, and leaves requests with a body unanswered.

Clients (coroutines on the test's loop, each running until its ``stop`` event is set and
counting what happened in a :class:`Tally`): slowloris heads, idle connections, oversized and
unfinished heads, slow request bodies, request-smuggling shapes, long ``CONNECT`` lines on the
TCP ingress and connect/close loops. Each one paces itself (no busy loop) and holds a bounded
number of connections; every connection it opens is closed when it returns.

Helpers :func:`read_response` and :func:`read_until_closed` read what a listener answers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import select
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from harness.procs import scaled
from shared.protocol import (
    Connection,
    DataReceived,
    LinkSettings,
    Side,
    StreamOpened,
    WelcomeReceived,
)
from shared.protocol.codec import FrameType, encode_frame

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]

#: PING frames per flood message (20 bytes each: ~80 KB a message)
PINGS_PER_MESSAGE = 4000


class Tally(collections.Counter[str]):
    """What the attack clients saw, by outcome (``"slowloris:408"``, ``"idle:closed"``, ...)."""


# --- reading answers -----------------------------------------------------------------------


async def read_response(
    reader: asyncio.StreamReader, timeout: float = 20.0
) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length body (``timeout`` is scaled)."""
    async with asyncio.timeout(scaled(timeout)):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                fields[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(fields.get("content-length", "0")))
    return status, fields, body


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = 20.0) -> bytes:
    """Everything until the server closes the connection (fails past the scaled deadline)."""
    async with asyncio.timeout(scaled(timeout)):
        try:
            return await reader.read()
        except ConnectionError:
            return b""


# --- raw agents ----------------------------------------------------------------------------


class RawAgent(threading.Thread):
    """An agent on a blocking socket: the real handshake, then :meth:`after_welcome`.

    ``rounds`` > 1 connects again each time the CSC drops the link (until ``stop``)."""

    def __init__(
        self,
        host: str,
        port: int,
        token: str,
        alias: str,
        *,
        rounds: int = 1,
        replaces: str | None = None,
    ) -> None:
        super().__init__(name=type(self).__name__, daemon=True)
        self.host, self.port, self.token, self.alias = host, port, token, alias
        self.rounds = rounds
        self.replaces = replaces  # the session its upgrade names as the one it replaces
        self.welcomed = threading.Event()
        self.stop = threading.Event()
        self.links = 0  # handshakes completed
        self.dropped_at: float | None = None
        self.error: BaseException | None = None
        #: why the upgrade failed (websockets' exception: ``InvalidStatus`` for a refusal)
        self.refusal: BaseException | None = None

    def run(self) -> None:
        try:
            for _ in range(self.rounds):
                if self.stop.is_set():
                    return
                self._round()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _round(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(scaled(10))
        sock.connect((self.host, self.port))
        try:
            ws = ClientProtocol(parse_uri(f"ws://{self.host}:{self.port}/v1/agent/connect"))
            request = ws.connect()
            request.headers["Authorization"] = f"Bearer {self.token}"
            if self.replaces is not None:
                request.headers["CSC-Replaces"] = self.replaces
            ws.send_request(request)
            sock.sendall(b"".join(ws.data_to_send()))
            conn = Connection(
                Side.CLIENT, LinkSettings(), accept_streams=True, now=time.monotonic()
            )
            conn.send_hello({"agent": type(self).__name__, "aliases": [self.alias]})
            welcomed = False
            while not welcomed:
                data = sock.recv(65536)
                if not data:
                    self.refusal = ws.handshake_exc
                    raise ConnectionError("the CSC closed the link during the handshake")
                ws.receive_data(data)
                if conn.has_output and ws.state is State.OPEN:  # upgraded: HELLO
                    ws.send_binary(b"".join(conn.data_to_send()))
                    sock.sendall(b"".join(ws.data_to_send()))
                for event in ws.events_received():
                    if isinstance(event, Frame) and event.opcode is Opcode.BINARY:
                        conn.receive_data(bytes(event.data), time.monotonic())
                        welcomed |= any(isinstance(e, WelcomeReceived) for e in conn.events())
            self.links += 1
            self.welcomed.set()
            self.after_welcome(sock, ws, conn)
        finally:
            sock.close()

    def after_welcome(self, sock: socket.socket, ws: ClientProtocol, conn: Connection) -> None:
        raise NotImplementedError

    def refused_status(self) -> int | None:
        """Once its thread ended (waited for): the HTTP status that refused the upgrade."""
        self.join(scaled(10))
        refusal = self.refusal
        return refusal.response.status_code if isinstance(refusal, InvalidStatus) else None


@contextlib.contextmanager
def raw_agents() -> Iterator[list[RawAgent]]:
    """A list for the raw agents a test starts; each is stopped and waited for at the end."""
    agents: list[RawAgent] = []
    try:
        yield agents
    finally:
        for agent in agents:
            agent.stop.set()
        for agent in agents:
            agent.join(scaled(10))


class Flooder(RawAgent):
    """PINGs until the CSC drops the link (``dropped_at``) or ``stop`` is set; never reads."""

    def __init__(
        self, *args: Any, pings_per_message: int = PINGS_PER_MESSAGE, **options: Any
    ) -> None:
        super().__init__(*args, **options)
        self.pings_per_message = pings_per_message
        self.sent = 0  # flood messages sent whole

    def after_welcome(self, sock: socket.socket, ws: ClientProtocol, conn: Connection) -> None:
        ping = encode_frame(FrameType.PING, 0, 0, b"12345678")
        ws.send_binary(ping * self.pings_per_message)
        message = b"".join(ws.data_to_send())  # one masked frame, sent again and again
        sock.setblocking(False)
        view, pos = memoryview(message), 0
        while not self.stop.is_set():
            _, writable, _ = select.select([], [sock], [], 0.1)
            if not writable:
                continue
            try:
                pos += sock.send(view[pos:])
            except BlockingIOError:
                continue
            except OSError:  # reset: the CSC dropped the link
                self.dropped_at = time.monotonic()
                return
            if pos == len(message):
                pos = 0
                self.sent += 1


class Yielder(RawAgent):
    """Sends GOAWAY right after WELCOME (what an agent renewing the session does), then keeps
    the link (answering the CSC's PINGs) until the CSC closes it (``closed_at``) or ``stop``
    is set."""

    def __init__(self, *args: Any, go_away: bool = True, repeat: int = 1, **options: Any):
        super().__init__(*args, **options)
        self.go_away = go_away
        self.repeat = repeat  # GOAWAY frames sent (more than one: a flood)
        self.closed_at: float | None = None

    def after_welcome(self, sock: socket.socket, ws: ClientProtocol, conn: Connection) -> None:
        if self.go_away:
            conn.go_away("going_away", "renewing")
            goaway = encode_frame(FrameType.GOAWAY, 0, 0, b'{"code": "going_away"}')
            if self.repeat > 1:
                ws.send_binary(b"".join(conn.data_to_send()) + goaway * (self.repeat - 1))
        sock.settimeout(0.1)
        while not self.stop.is_set():
            if conn.has_output:
                ws.send_binary(b"".join(conn.data_to_send()))
            out = b"".join(ws.data_to_send())
            if out:
                sock.sendall(out)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            ws.receive_data(data)
            for event in ws.events_received():
                if isinstance(event, Frame) and event.opcode is Opcode.BINARY:
                    conn.receive_data(bytes(event.data), time.monotonic())
            conn.events()
        if not self.stop.is_set():
            self.closed_at = time.monotonic()


class LyingAgent(RawAgent):
    """Answers each GET with ``Content-Length: declared`` and ``sent`` body bytes; a request
    with a body is never answered (its bytes are taken, so only the CSC's deadlines end it)."""

    def __init__(self, *args: Any, declared: int, sent: int, **options: Any) -> None:
        super().__init__(*args, **options)
        self.declared, self.sent = declared, sent
        self.answered = 0

    def after_welcome(self, sock: socket.socket, ws: ClientProtocol, conn: Connection) -> None:
        sock.settimeout(None)
        while not self.stop.is_set():
            readable, _, _ = select.select([sock], [], [], 0.1)
            now = time.monotonic()
            if readable:
                data = sock.recv(65536)
                if not data:
                    self.dropped_at = now
                    return
                ws.receive_data(data)
                for event in ws.events_received():
                    if isinstance(event, Frame) and event.opcode is Opcode.BINARY:
                        conn.receive_data(bytes(event.data), now)
            if now >= conn.next_deadline():
                conn.handle_timer(now)
            for link_event in conn.events():
                if isinstance(link_event, StreamOpened) and link_event.info.get("method") == "GET":
                    headers = [["Content-Length", str(self.declared)]]
                    conn.accept_stream(link_event.stream_id, {"status": 200, "headers": headers})
                    conn.send_data(link_event.stream_id, b"y" * self.sent, fin=True)
                    self.answered += 1
                elif isinstance(link_event, DataReceived):
                    conn.consumed(link_event.stream_id, len(link_event.data), now)
            if conn.has_output:
                ws.send_binary(b"".join(conn.data_to_send()))
            out = b"".join(ws.data_to_send())
            if out:
                sock.sendall(out)
            if ws.state is State.CLOSED:
                self.dropped_at = now
                return


# --- raw clients ---------------------------------------------------------------------------


async def _open(host: str, port: int) -> Conn:
    async with asyncio.timeout(scaled(10)):
        return await asyncio.open_connection(host, port)


def _close(conn: Conn) -> None:
    conn[1].transport.abort()


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    """Pace an attack: wait ``seconds`` or until ``stop``."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def _held(
    name: str,
    host: str,
    port: int,
    stop: asyncio.Event,
    tally: Tally,
    count: int,
    feed: Callable[[Conn], Awaitable[None]],
) -> None:
    """``count`` workers, each opening a connection, running ``feed`` on it until the server
    ends it (tallied by how), then opening the next, until ``stop``."""

    async def worker() -> None:
        while not stop.is_set():
            try:
                conn = await _open(host, port)
            except (OSError, TimeoutError):
                tally[f"{name}:connect-failed"] += 1
                await _pause(stop, 0.5)
                continue
            try:
                await feed(conn)
                tally[f"{name}:done"] += 1
            except (ConnectionError, asyncio.IncompleteReadError):
                tally[f"{name}:closed"] += 1
            except TimeoutError:
                tally[f"{name}:timeout"] += 1
            finally:
                _close(conn)
            await _pause(stop, 0.1)

    await asyncio.gather(*(worker() for _ in range(count)))


async def _until_answer_or_stop(conn: Conn, stop: asyncio.Event) -> bytes:
    """Whatever the server sends (a 408, say) or b"" on close, or b"" when ``stop`` is set."""
    read = asyncio.ensure_future(conn[0].read(4096))
    halt = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({read, halt}, return_when=asyncio.FIRST_COMPLETED)
    halt.cancel()
    if read in done:
        return read.result()
    read.cancel()
    return b""


def _status(answer: bytes) -> str:
    return answer.split(b" ", 2)[1].decode("ascii", "replace") if answer else "closed"


async def slowloris(
    host: str, port: int, stop: asyncio.Event, tally: Tally, count: int = 20
) -> None:
    """Heads sent one byte a second, never finished."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 4096

    async def feed_loop(conn: Conn) -> None:
        # one byte, then up to a second waiting for an answer: that is the pacing
        reader, writer = conn
        for i in range(len(head)):
            if stop.is_set() or reader.at_eof():
                return
            writer.write(head[i : i + 1])
            await writer.drain()
            try:
                got = await asyncio.wait_for(reader.read(4096), 1.0)
            except TimeoutError:
                continue
            tally[f"slowloris:{_status(got)}"] += 1
            return

    await _held("slowloris", host, port, stop, tally, count, feed_loop)


async def idle_connections(
    host: str, port: int, stop: asyncio.Event, tally: Tally, count: int = 300
) -> None:
    """Connections that send nothing (opened again when the server closes them)."""

    async def feed(conn: Conn) -> None:
        got = await _until_answer_or_stop(conn, stop)
        tally[f"idle:{_status(got)}"] += 1

    await _held("idle", host, port, stop, tally, count, feed)


async def oversized_heads(
    host: str, port: int, stop: asyncio.Event, tally: Tally, size: int = 64 * 1024
) -> None:
    """Whole heads far over the size limit, one every 50 ms."""
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * size + b"\r\n\r\n"

    async def feed(conn: Conn) -> None:
        conn[1].write(request)
        with contextlib.suppress(ConnectionError):
            await conn[1].drain()
        got = await asyncio.wait_for(conn[0].read(4096), scaled(10))
        tally[f"oversized:{_status(got)}"] += 1
        await _pause(stop, 0.05)

    await _held("oversized", host, port, stop, tally, 1, feed)


async def unfinished_heads(
    host: str, port: int, stop: asyncio.Event, tally: Tally, count: int = 50, size: int = 15000
) -> None:
    """Heads just under the per-connection bound, never finished (held until answered)."""

    async def feed(conn: Conn) -> None:
        conn[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * size)
        await conn[1].drain()
        got = await _until_answer_or_stop(conn, stop)
        tally[f"unfinished:{_status(got)}"] += 1

    await _held("unfinished", host, port, stop, tally, count, feed)


async def slow_bodies(
    host: str, port: int, path: str, stop: asyncio.Event, tally: Tally, count: int = 10
) -> None:
    """POSTs to ``path`` whose body comes one byte a second."""

    async def feed(conn: Conn) -> None:
        reader, writer = conn
        writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n".encode())
        while not stop.is_set() and not reader.at_eof():
            writer.write(b"x")
            await writer.drain()
            try:
                got = await asyncio.wait_for(reader.read(4096), 1.0)
            except TimeoutError:
                continue
            tally[f"slowbody:{_status(got)}"] += 1
            return

    await _held("slowbody", host, port, stop, tally, count, feed)


async def stalled_downloads(
    host: str,
    port: int,
    alias_path: str,
    size: int,
    stall: float,
    stop: asyncio.Event,
    tally: Tally,
    count: int = 10,
) -> None:
    """GETs of a ``size``-byte download at ``alias_path`` whose client reads the head and then
    nothing for ``stall`` seconds (past the CSC's send deadline), then reads what it can: a
    connection the CSC ended meanwhile gives a short body (``stalled:closed``, whether by
    reset or by the end of what the kernel still held), one it went on serving the whole body
    (``stalled:served``)."""

    async def feed(conn: Conn) -> None:
        reader, writer = conn
        writer.write(f"GET {alias_path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), scaled(10))
        tally[f"stalled:{_status(head)}"] += 1
        await _pause(stop, stall)  # not a byte read: the CSC's buffers and ours fill up
        if stop.is_set():
            return  # cut short by the storm's end: no verdict
        got = 0
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(scaled(20)):
                while chunk := await reader.read(256 * 1024):
                    got += len(chunk)
        tally["stalled:served" if got >= size else "stalled:closed"] += 1

    await _held("stalled", host, port, stop, tally, count, feed)


#: Request shapes a smuggler tries: each must be refused or answered once, never relayed twice.
SMUGGLING = (
    b"POST /t/{alias}/ HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /t/{alias}/x HTTP/1.1\r\n\r\n",
    b"POST /t/{alias}/ HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 40\r\n\r\nabc",
    b"POST /t/{alias}/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    b"GET /t/{alias}/ HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\n\r\n",
    b"GET /t/{alias}/ HTTP/1.1\nHost: x\n\n",
    b"POST /t/{alias}/ HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc",
    b"POST /t/{alias}/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"ffffffffffffffffff\r\n",
)


async def smuggling(host: str, port: int, alias: str, stop: asyncio.Event, tally: Tally) -> None:
    """The :data:`SMUGGLING` shapes in turn, each on a new connection, one every 50 ms."""
    shapes = [shape.replace(b"{alias}", alias.encode()) for shape in SMUGGLING]
    index = 0

    async def feed(conn: Conn) -> None:
        nonlocal index
        conn[1].write(shapes[index % len(shapes)])
        index += 1
        got = await read_until_closed(conn[0], 10)
        tally[f"smuggling:{_status(got)}"] += 1
        await _pause(stop, 0.05)

    await _held("smuggling", host, port, stop, tally, 1, feed)


async def connect_lines(
    host: str, port: int, stop: asyncio.Event, tally: Tally, count: int = 10
) -> None:
    """TCP ingress clients sending a ``CONNECT`` line that never ends (64 KiB a second)."""

    async def feed(conn: Conn) -> None:
        reader, writer = conn
        writer.write(b"CONNECT ")
        while not stop.is_set() and not reader.at_eof():
            writer.write(b"c" * 65536)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(writer.drain(), 1.0)
            try:
                got = await asyncio.wait_for(reader.read(4096), 1.0)
            except TimeoutError:
                continue
            tally[f"connect:{got[:3].decode('ascii', 'replace') or 'closed'}"] += 1
            return

    await _held("connect", host, port, stop, tally, count, feed)


async def reconnect_loop(
    host: str, port: int, stop: asyncio.Event, tally: Tally, rate: float = 100.0
) -> None:
    """Connect and close again at about ``rate`` a second (half with a partial head)."""
    while not stop.is_set():
        try:
            conn = await _open(host, port)
        except (OSError, TimeoutError):
            tally["reconnect:failed"] += 1
        else:
            if tally["reconnect:ok"] % 2:
                conn[1].write(b"GET /t/")
            _close(conn)
            tally["reconnect:ok"] += 1
        await _pause(stop, 1 / rate)


async def pipelined_gets(
    host: str, port: int, path: str, stop: asyncio.Event, tally: Tally
) -> None:
    """Two GETs of ``path`` pipelined on one connection, every 100 ms; each answer is tallied
    by status, ``aborted`` (the connection ended inside it) or ``garbage`` (a response that
    does not parse: a body longer than its length would read as the next head)."""
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    while not stop.is_set():
        try:
            reader, writer = await _open(host, port)
        except (OSError, TimeoutError):
            tally["pipelined:connect-failed"] += 1
            await _pause(stop, 0.1)
            continue
        try:
            writer.write(request + request)
            for _ in range(2):
                status, _, _ = await read_response(reader, 30)
                tally[f"pipelined:{status}"] += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            tally["pipelined:aborted"] += 1
        except (ValueError, IndexError, asyncio.LimitOverrunError):
            tally["pipelined:garbage"] += 1
        finally:
            writer.transport.abort()
        await _pause(stop, 0.1)
