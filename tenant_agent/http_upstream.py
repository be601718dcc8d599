"""The agent's HTTP/1.1 client: one stream in, one request to the portal, the response back.

:class:`HttpUpstream` keeps a pool of keep-alive connections to the one configured upstream
(``http://`` or ``https://``, optionally with a path prefix). Each connection is an
:class:`UpstreamConnection`, an ``asyncio.Protocol`` around llhttp's response parser
(``httptools``); the stream's handler task drives one exchange at a time on it. The request
head is built by :mod:`tenant_agent.http_request`.

Invariants:

* Only the configured origin is contacted; the stream supplies a path that is appended to the
  origin's prefix, and ``Host`` is always the origin's ``host[:port]``.
* Request bodies are credited back (``stream.consumed``) only after their bytes were handed to
  the transport and the transport is not paused (docs/protocol.md §5).
* A connection holds at most :data:`HIGH_WATER` bytes of a response body plus one socket read
  in its queue, and one chunk waiting for the stream's credit: above the mark, reading from the
  portal pauses until the queue is down to :data:`LOW_WATER`. A Content-Length body bypasses
  the parser once its head is parsed, so its bytes are relayed without a copy.
* A response with a known length up to :data:`SMALL_BODY`, or one complete when its head is
  processed, goes out as head, body and FIN without yielding in between (one link message).
* A response is never ended cleanly unless it was complete: a truncated body resets the stream.
* A connection returns to the pool only after a complete, keep-alive exchange whose request
  was fully sent and whose response was fully delivered; anything else closes it.
* :meth:`HttpUpstream.handle` returns only once the stream is done (FIN both ways, or failed):
  the link resets a stream whose handler returns earlier, and that RST could overtake the
  response's end at the CSC. If the portal answered before the upload ended, the handler waits
  for the CSC's FIN or RST without crediting more.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, cast

import httptools

from shared.errors import (
    CSCError,
    GoingAway,
    HeadersTooLarge,
    ProtocolError,
    UpstreamError,
    UpstreamRefused,
    UpstreamReset,
    UpstreamTimeout,
)
from shared.headers import strip_hop_by_hop
from tenant_agent.http_request import Request, build_request, parse_origin
from tenant_agent.writeflow import WriteFlow

log = logging.getLogger("csc_agent.upstream")

#: Responses up to this size are read whole and sent with their head.
SMALL_BODY = 64 * 1024
#: Reading from the portal pauses when a connection holds more body bytes than this ...
HIGH_WATER = 256 * 1024
#: ... and resumes once the stream has taken all but this many.
LOW_WATER = 64 * 1024
#: Idle keep-alive connections kept per upstream (most recently used first).
MAX_IDLE = 64
#: An idle connection unused for this long is closed.
IDLE_TIMEOUT = 30.0


class RelayedStream(Protocol):
    """What :class:`HttpUpstream` needs of the stream it serves: a link stream
    (:class:`shared.link.LinkStream`) or a request of the local/DMZ proxy
    (:class:`tenant_agent.proxy_exchange.InboundExchange`)."""

    info: dict[str, Any]
    #: Watched only for its failure: it fails when the stream does.
    opened: asyncio.Future[dict[str, Any]]

    @property
    def error(self) -> CSCError | None: ...

    @property
    def done(self) -> bool: ...

    async def read(self) -> bytes | memoryview: ...

    def read_complete(self) -> bytes | None: ...

    def consumed(self, nbytes: int) -> None: ...

    async def write(self, data: bytes | memoryview) -> None: ...

    def write_eof(self) -> None: ...

    def accept(self, info: dict[str, Any]) -> None: ...

    def reject(self, err: CSCError) -> None: ...

    def reset(self, err: CSCError) -> None: ...


# --- one connection ---------------------------------------------------------------------


class _Surplus(Exception):
    """Bytes after the end of the response: stop parsing (the connection is not reused)."""


class UpstreamConnection(WriteFlow, asyncio.Protocol):
    """One HTTP/1.1 connection to the portal; one exchange at a time.

    The parser callbacks fill in the exchange's state (head, body chunks, completion, error)
    and :meth:`wait` lets the stream's task sleep until the next change. The connection never
    talks to the link itself.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float, name: str) -> None:
        self._loop = loop
        self._timeout = read_timeout
        self._name = name
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.reused = False
        self.idle_since = 0.0
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_activity = 0.0
        self._parser_stale = False
        self.active = False
        self._reset_exchange(is_head=False, request_done=True)

    def _reset_exchange(self, *, is_head: bool, request_done: bool) -> None:
        self.is_head = is_head
        self.request_done = request_done
        #: Set while the request body's sender waits for the stream (not the portal's fault).
        self.waiting_for_body = False
        self.status = 0
        self._reason = b""
        self._raw: list[tuple[bytes, bytes]] = []
        self.length: int | None = None
        self._until_eof = False
        self._interim = False
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.poisoned = False
        self.received = False
        self.error: CSCError | None = None
        self.chunks: deque[bytes] = deque()
        self._body_seen = 0
        #: Content-Length body bytes still expected once the parser is bypassed (0: parse).
        self._body_left = 0
        self._keep_alive_after_body = False
        #: Body bytes held: queued in ``chunks`` plus taken and not yet delivered.
        self.buffered = 0
        #: Body bytes in ``chunks``: reading pauses above :data:`HIGH_WATER`.
        self.queued = 0

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.active or self.complete:
            # unsolicited bytes (idle) or bytes past the response: never reuse this connection
            self.poisoned = True
            if not self.active:
                self.close()
            return
        self.received = True
        self._last_activity = self._loop.time()
        if self._body_left:
            self._raw_body(data)
        else:
            self._feed(data)
        self._wake()

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError(f"the portal at {self._name} switched protocols"))
        except httptools.HttpParserError as exc:
            if not isinstance(exc.__context__, _Surplus):
                self._fail(self._parse_error(exc))
            return
        if self.head_done and not self.complete and self.length is not None:
            # the rest of a Content-Length body bypasses the parser: no copy per read
            self._body_left = self.length - self._body_seen
            self._keep_alive_after_body = self._parser.should_keep_alive()

    def _raw_body(self, data: bytes) -> None:
        left, size = self._body_left, len(data)
        if size > left:  # bytes past the response: never reuse this connection
            self.poisoned = True
            data, size = data[:left], left
        self._body_left = left - size
        self.chunks.append(data)
        self.buffered += size
        self.queued += size
        if not self._body_left:
            self.complete = True
            self.keep_alive = self._keep_alive_after_body
            # the parser still expects the body: the next exchange needs a new one
            self._parser_stale = True
        elif self.queued > HIGH_WATER and not self._reading_paused:
            self._pause_reading()

    def eof_received(self) -> bool | None:
        return False  # close our side too; connection_lost ends the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.active and not self.complete:
            if self.head_done and self._until_eof and exc is None:
                self.complete = True  # the body was delimited by the connection's end
            elif not self.head_done:
                self._fail(UpstreamReset(f"the portal at {self._name} closed the connection"))
            else:
                self._fail(UpstreamReset("the portal's response broke off"))
        self._cancel_timer()
        self._wake()
        self.writing_lost()

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            self.poisoned = True  # the parser stops in an error state: never reuse it
            raise _Surplus

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            if status == 101:
                self._fail(UpstreamError(f"the portal at {self._name} switched protocols"))
            self._interim = True  # 1xx: skipped, the final response follows
            self._reason, self._raw = b"", []
            return
        self.status = status
        self.head_done = True
        chunked = False
        for name, value in self._raw:
            if len(name) == 14 and name.lower() == b"content-length":
                self.length = int(value)
            elif len(name) == 17 and name.lower() == b"transfer-encoding":
                chunked = value.rstrip().lower().endswith(b"chunked")
        if self.is_head:
            # llhttp does not know the request was HEAD: end here, never reuse the connection
            self.complete = True
            self.poisoned = True
        elif status not in (204, 304) and not chunked and self.length is None:
            self._until_eof = True

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        self.chunks.append(body)
        size = len(body)
        self._body_seen += size
        self.buffered += size
        self.queued += size
        if self.queued > HIGH_WATER and not self._reading_paused:
            self._pause_reading()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
        elif not self.complete:
            self.complete = True
            self.keep_alive = self._parser.should_keep_alive()

    # -- used by the exchange ----------------------------------------------------------------

    def begin(self, request: Request) -> None:
        """Start an exchange: send the request head (and the whole body when known)."""
        assert self.transport is not None and not self.active
        self.active = True
        self._reset_exchange(is_head=request.is_head, request_done=not request.streamed)
        if self._parser_stale:
            self._parser = httptools.HttpResponseParser(self)
            self._parser_stale = False
        now = self._loop.time()
        self._last_activity = now
        self._timer = self._loop.call_at(now + self._timeout, self._on_timer)
        if request.whole:
            self.transport.writelines((request.head, request.whole))
        else:
            self.transport.write(request.head)

    def response_head(self) -> dict[str, Any]:
        headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self._raw]
        return {
            "status": self.status,
            "reason": self._reason.decode("latin-1"),
            "headers": strip_hop_by_hop(headers),
        }

    def take(self) -> bytes:
        """The oldest queued body chunk; counted in :attr:`buffered` until :meth:`delivered`.

        Reading resumes once the queue is low, so the portal's next bytes arrive while this
        chunk waits for the stream's credit.
        """
        data = self.chunks.popleft()
        self.queued -= len(data)
        if self._reading_paused and self.queued <= LOW_WATER:
            self._reading_paused = False
            if self.transport is not None and not self.lost:
                self.transport.resume_reading()
        return data

    def take_all(self) -> bytes:
        """Every queued body byte in one piece (a small, complete response)."""
        data = b"".join(self.chunks)
        self.chunks.clear()
        self.queued = 0
        return data

    def delivered(self, nbytes: int) -> None:
        """``nbytes`` taken by the stream."""
        self.buffered -= nbytes

    async def wait(self) -> None:
        """Sleep until the exchange's state may have changed."""
        self._waiter = waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def write(self, data: bytes | memoryview) -> None:
        if self.lost or self.transport is None:
            raise ConnectionResetError("the upstream connection is closed")
        self.transport.write(data)

    def write_chunk(self, data: bytes | memoryview) -> None:
        if self.lost or self.transport is None:
            raise ConnectionResetError("the upstream connection is closed")
        self.transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))

    def touch(self) -> None:
        """The request made progress: the read timeout starts again."""
        self._last_activity = self._loop.time()

    def stream_failed(self, opened: asyncio.Future[dict[str, Any]]) -> None:
        """Done-callback of the stream's ``opened`` future: it fails when the stream does."""
        if not opened.cancelled() and isinstance(err := opened.exception(), CSCError):
            self._fail(err)
            self._wake()

    def fail(self, err: CSCError) -> None:
        self._fail(err)
        self._wake()

    @property
    def retryable(self) -> bool:
        """A reused connection that ended before the portal sent a byte."""
        return self.reused and not self.received

    @property
    def reusable(self) -> bool:
        return (
            self.complete
            and self.keep_alive
            and self.request_done
            and not self.poisoned
            and not self.lost
            and not self.chunks
        )

    def park(self, now: float) -> None:
        """The exchange is over and the connection goes back to the pool."""
        self._cancel_timer()
        self.active = False
        self.reused = True
        self.idle_since = now
        self.buffered = 0
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        """Close the connection; an exchange still running on it fails."""
        if self.active and not self.complete:
            self.fail(UpstreamReset(f"the connection to the portal at {self._name} was closed"))
        self._cancel_timer()
        self.active = False
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if self.complete and self.request_done:
                transport.close()  # nothing is lost by flushing first
            else:
                transport.abort()  # never wait on a portal that stopped reading

    # -- internals ---------------------------------------------------------------------------

    def _parse_error(self, exc: Exception) -> CSCError:
        if self.head_done:
            return UpstreamReset("the portal's response broke off (invalid body framing)")
        detail = str(exc)[:120] or exc.__class__.__name__
        return UpstreamError(f"the portal at {self._name} sent an invalid response ({detail})")

    def _fail(self, err: CSCError) -> None:
        if self.complete or self.error is not None:
            self.poisoned = True
            return
        self.error = err
        self.poisoned = True
        self._cancel_timer()
        if self.transport is not None and not self.lost:
            self.transport.abort()

    def _pause_reading(self) -> None:
        if self.transport is not None and not self.lost:
            self._reading_paused = True
            self.transport.pause_reading()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if not self.active or self.complete or self.error is not None:
            return
        now = self._loop.time()
        if self._reading_paused or self.buffered or self.waiting_for_body:
            self._last_activity = now  # the link side is the slow one, not the portal
        deadline = self._last_activity + self._timeout
        if now < deadline:
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        what = "stopped sending" if self.head_done else "did not answer"
        self.fail(UpstreamTimeout(f"the portal {what} within {self._timeout:g} s"))


# --- one exchange -----------------------------------------------------------------------


async def send_body(conn: UpstreamConnection, stream: RelayedStream, length: int | None) -> None:
    """Copy the request body from the stream to the portal; credit each chunk once drained."""
    left = length
    try:
        while True:
            conn.waiting_for_body = True
            data = await stream.read()
            conn.waiting_for_body = False
            if not data:
                break
            size = len(data)
            if left is None:
                conn.write_chunk(data)
            elif size > left:
                raise ProtocolError("the request body is longer than its Content-Length")
            else:
                left -= size
                conn.write(data)
                if not left:
                    conn.request_done = True  # the portal has it all; the FIN follows
            await conn.drain()
            conn.touch()
            stream.consumed(size)
        if left:
            raise ProtocolError("the request body is shorter than its Content-Length")
        if left is None:
            conn.write(b"0\r\n\r\n")
        conn.request_done = True
    except ProtocolError as err:
        stream.reset(err)
        conn.fail(err)
    except CSCError as err:  # the CSC reset the stream
        conn.fail(err)
    except ConnectionError:
        pass  # the connection is gone; the response side reports why
    finally:
        conn.waiting_for_body = False


async def drain_upload(stream: RelayedStream, timeout: float) -> None:
    """The response ended before the CSC's FIN: wait for the FIN or the CSC's RST.

    The bytes are not credited, so the CSC's upload stops at the window; it resets the stream
    once its response is delivered. If it does neither in ``timeout``, reset the stream.
    """
    try:
        async with asyncio.timeout(timeout):
            while await stream.read():
                pass
    except CSCError:
        return
    except TimeoutError:
        stream.reset(UpstreamReset("the portal answered before the request body ended"))


class _Exchange:
    """One request and its response on one connection, run by the stream's handler task."""

    __slots__ = ("conn", "request", "request_id", "sender", "stream")

    def __init__(self, conn: UpstreamConnection, stream: RelayedStream, request: Request) -> None:
        self.conn = conn
        self.stream = stream
        self.request = request
        self.request_id = stream.info.get("request_id", "")
        self.sender: asyncio.Task[None] | None = None

    async def run(self) -> bool:
        """Relay the exchange; True when it should be retried on a fresh connection."""
        conn, stream = self.conn, self.stream
        conn.begin(self.request)
        if self.request.streamed:
            body = send_body(conn, stream, self.request.length)
            self.sender = asyncio.get_running_loop().create_task(body)
        stream.opened.add_done_callback(conn.stream_failed)
        try:
            return await self._relay()
        except CSCError:
            return False  # the CSC reset the stream while the response was written to it
        finally:
            stream.opened.remove_done_callback(conn.stream_failed)
            sender = self.sender
            if sender is not None and not sender.done():
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)

    async def _relay(self) -> bool:
        conn, stream = self.conn, self.stream
        while not conn.head_done and conn.error is None:
            await conn.wait()
        if conn.head_done and conn.length is not None and conn.length <= SMALL_BODY:
            while not conn.complete and conn.error is None:
                await conn.wait()
        if conn.error is not None:
            return self._refuse(conn.error)
        try:
            stream.accept(conn.response_head())
        except HeadersTooLarge:
            conn.poisoned = True
            stream.reject(UpstreamError("the portal's response head is too large"))
            return False
        if conn.complete:  # the whole response is here: head, body and FIN in one go
            if conn.chunks:
                data = conn.take_all()
                await stream.write(data)
                conn.delivered(len(data))
            stream.write_eof()
            return False
        await self._relay_body()
        return False

    def _refuse(self, err: CSCError) -> bool:
        """Fail the stream before its head was sent (or ask for a retry)."""
        if self.stream.error is not None:
            return False  # the CSC gave up on the stream
        if isinstance(err, UpstreamReset) and self.conn.retryable and not self.request.body:
            return True
        log.info("request %s: %s", self.request_id, err.message, extra=self._where(err))
        self.stream.reject(err.public())  # the portal's address stays in this log
        return False

    def _where(self, err: CSCError) -> dict[str, str]:
        """The ``extra`` of a log line about this exchange's failure."""
        return {"request_id": self.request_id, "code": err.code}

    async def _relay_body(self) -> None:
        conn, stream = self.conn, self.stream
        while True:
            if conn.error is not None:
                if stream.error is None:
                    log.info(
                        "request %s: %s",
                        self.request_id,
                        conn.error.message,
                        extra=self._where(conn.error),
                    )
                    stream.reset(conn.error.public())
                return
            if conn.chunks:
                data = conn.take()
                await stream.write(data)
                conn.delivered(len(data))
            elif conn.complete:
                stream.write_eof()
                return
            else:
                await conn.wait()


# --- the pool -----------------------------------------------------------------------------


class HttpUpstream:
    """The pooled HTTP/1.1 client of one upstream; :meth:`handle` serves an ``http`` stream."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        max_idle: int = MAX_IDLE,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.origin = parse_origin(url)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._ssl: ssl.SSLContext | None = None
        if self.origin.tls:
            self._ssl = ssl_context or ssl.create_default_context()
        self._idle: deque[UpstreamConnection] = deque()
        self._busy: set[UpstreamConnection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        #: Connections opened so far (tests and diagnostics).
        self.connections_opened = 0

    @property
    def idle_count(self) -> int:
        return sum(1 for conn in self._idle if not conn.lost)

    @property
    def busy_count(self) -> int:
        return len(self._busy)

    @property
    def buffered(self) -> int:
        """Response body bytes held by busy connections right now."""
        return sum(conn.buffered for conn in self._busy)

    @property
    def write_buffered(self) -> int:
        """Request bytes waiting in the busy connections' transports right now."""
        return sum(c.transport.get_write_buffer_size() for c in self._busy if c.transport)

    async def handle(self, stream: RelayedStream) -> None:
        whole = stream.read_complete() if stream.info.get("body") else None
        try:
            request = build_request(stream.info, self.origin, whole)
        except ProtocolError as err:
            stream.reject(err)
            return
        if whole:
            # the stream's FIN is in: this credit grants the CSC nothing more, it only returns
            # the session budget for bytes that now sit in the transport instead of the stream
            stream.consumed(len(whole))
        fresh = False
        while True:
            try:
                conn = await (self._connect() if fresh else self._acquire())
            except CSCError as err:
                request_id = stream.info.get("request_id", "")
                where = {"request_id": request_id, "code": err.code}
                log.info("request %s: %s", request_id, err.message, extra=where)
                stream.reject(err.public())  # the portal's address stays in this log
                return
            try:
                retry = await _Exchange(conn, stream, request).run()
            finally:
                self._release(conn)
            if not retry:
                break
            fresh = True
        if not stream.done:  # returning now would reset the stream (LinkStream.finish)
            await drain_upload(stream, self.read_timeout)

    async def close(self) -> None:
        """Close every connection, idle or busy (the streams of busy ones fail: going_away)."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in self._busy:
            conn.fail(GoingAway("the tenant agent is shutting down"))
        for conn in [*self._idle, *self._busy]:
            conn.close()
        self._idle.clear()
        self._busy.clear()

    # -- connections -------------------------------------------------------------------------

    async def _acquire(self) -> UpstreamConnection:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.lost and conn.transport is not None and not conn.transport.is_closing():
                self._busy.add(conn)
                return conn
        return await self._connect()

    async def _connect(self) -> UpstreamConnection:
        origin = self.origin
        loop = asyncio.get_running_loop()
        factory: Callable[[], UpstreamConnection] = lambda: UpstreamConnection(  # noqa: E731
            loop, self.read_timeout, origin.name
        )
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    factory,
                    origin.host,
                    origin.port,
                    ssl=self._ssl,
                    server_hostname=origin.host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise UpstreamTimeout(f"connecting to the portal at {origin.name} timed out") from None
        except ssl.SSLError as exc:
            reason = exc.reason or exc.__class__.__name__
            raise UpstreamError(f"TLS with the portal at {origin.name} failed: {reason}") from None
        except OSError as exc:
            reason = exc.strerror or exc.__class__.__name__
            raise UpstreamRefused(
                f"the portal at {origin.name} refused the connection ({reason})"
            ) from None
        self.connections_opened += 1
        if self._closed:
            conn.close()
            raise UpstreamRefused("the agent is shutting down")
        self._busy.add(conn)
        return conn

    def _release(self, conn: UpstreamConnection) -> None:
        self._busy.discard(conn)
        if self._closed or not conn.reusable:
            conn.close()
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        conn.park(now)
        idle = self._idle
        idle.append(conn)
        if len(idle) > self.max_idle:
            idle.popleft().close()
        if self._sweeper is None:
            self._sweeper = loop.call_at(now + self.idle_timeout, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for ``idle_timeout``; forget those the portal closed."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self.idle_timeout
        keep: deque[UpstreamConnection] = deque()
        for conn in self._idle:
            if conn.lost or conn.idle_since <= cutoff:
                conn.close()
            else:
                keep.append(conn)
        self._idle = keep
        if keep:
            self._sweeper = loop.call_at(keep[0].idle_since + self.idle_timeout, self._sweep)
