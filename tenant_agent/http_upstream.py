"""The agent's HTTP/1.1 client: one stream in, one request to the portal, the response back.

:class:`HttpUpstream` keeps a pool of keep-alive connections to the one configured upstream
(``http://`` or ``https://``, optionally with a path prefix). Each connection is an
:class:`UpstreamConnection`, an ``asyncio.Protocol`` around llhttp's response parser
(``httptools``) whose exchange moves through the states of
:class:`~tenant_agent.http_exchange.ExchangeState`; the stream's handler task runs one
:class:`~tenant_agent.http_exchange.Exchange` at a time on it, or, for a bodyless request on an
idle connection, callbacks do (:meth:`HttpUpstream.quick`, :mod:`tenant_agent.http_quick`).
The request head is built by :mod:`tenant_agent.http_request`.

Invariants:

* Only the configured origin is contacted; the stream supplies a path that is appended to the
  origin's prefix, and ``Host`` is always the origin's ``host[:port]``.
* A connection holds at most :data:`HIGH_WATER` bytes of a response body plus one socket read
  in its queue, and one chunk waiting for the stream's credit: above the mark, reading from the
  portal pauses until the queue is down to :data:`LOW_WATER`. A Content-Length body bypasses
  the parser once its head is parsed, so its bytes are relayed without a copy.
* The parser callbacks change the exchange's state only as
  :data:`tenant_agent.http_exchange.TRANSITIONS` allows (else :class:`InvalidState`).
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
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, cast

import httptools

from shared.errors import (
    CSCError,
    GoingAway,
    InvalidState,
    ProtocolError,
    UpstreamError,
    UpstreamRefused,
    UpstreamReset,
    UpstreamTimeout,
)
from shared.headers import strip_hop_by_hop
from shared.linkstream import LinkStream
from shared.wakeup import Wakeup
from shared.writeflow import WriteFlow
from tenant_agent.http_exchange import (
    RECEIVING,
    SMALL_BODY,
    Exchange,
    ExchangeState,
    Outcome,
    RelayedStream,
    advance,
    drain_upload,
)
from tenant_agent.http_quick import QuickExchange
from tenant_agent.http_request import Request, build_request, parse_origin

log = logging.getLogger("csc_agent.upstream.http")

__all__ = ["HIGH_WATER", "LOW_WATER", "SMALL_BODY", "HttpUpstream", "RelayedStream"]

#: Reading from the portal pauses when a connection holds more body bytes than this ...
HIGH_WATER = 256 * 1024
#: ... and resumes once the stream has taken all but this many.
LOW_WATER = 64 * 1024
#: Idle keep-alive connections kept per upstream (most recently used first).
MAX_IDLE = 64
#: An idle connection unused for this long is closed.
IDLE_TIMEOUT = 30.0


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
        self.loop = loop
        self._timeout = read_timeout
        self._name = name
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.reused = False
        self.idle_since = 0.0
        self._reading_paused = False
        self._waiter = Wakeup(loop)
        #: Called at each wake, after the waiting task is woken (an exchange served by
        #: callbacks, tenant_agent/http_quick.py); None otherwise.
        self.on_wake: Callable[[], None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_activity = 0.0
        self._parser_stale = False
        self.state = ExchangeState.IDLE
        self._reset_exchange(is_head=False, request_done=True)

    def _reset_exchange(self, *, is_head: bool, request_done: bool) -> None:
        """The per-exchange fields, fresh for the next request (the state is separate)."""
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
        if self.state not in RECEIVING:
            # unsolicited bytes (idle) or bytes past the response: never reuse this connection
            self.poisoned = True
            if self.state is ExchangeState.IDLE:
                self.close()
            return
        self.received = True
        self._last_activity = self.loop.time()
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
        if self.state is ExchangeState.BODY and self.length is not None:
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
            self._enter(ExchangeState.COMPLETE)
            self.keep_alive = self._keep_alive_after_body
            # the parser still expects the body: the next exchange needs a new one
            self._parser_stale = True
        elif self.queued > HIGH_WATER and not self._reading_paused:
            self._pause_reading()

    def eof_received(self) -> bool | None:
        return False  # close our side too; connection_lost ends the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.state in RECEIVING:
            if self.state is ExchangeState.BODY and self._until_eof and exc is None:
                self._enter(
                    ExchangeState.COMPLETE
                )  # the body was delimited by the connection's end
            elif self.state is ExchangeState.AWAITING_HEAD:
                self._fail(UpstreamReset(f"the portal at {self._name} closed the connection"))
            else:
                self._fail(UpstreamReset("the portal's response broke off"))
        self._cancel_timer()
        self._wake()
        self.writing_lost()

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.state is ExchangeState.COMPLETE:
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
        if self.state is not ExchangeState.AWAITING_HEAD:
            return  # failed meanwhile: nothing more is parsed into this exchange
        self.status = status
        self._enter(ExchangeState.BODY)
        chunked = False
        for name, value in self._raw:
            if len(name) == 14 and name.lower() == b"content-length":
                self.length = int(value)
            elif len(name) == 17 and name.lower() == b"transfer-encoding":
                chunked = value.rstrip().lower().endswith(b"chunked")
        if self.is_head:
            # llhttp does not know the request was HEAD: end here, never reuse the connection
            self._enter(ExchangeState.COMPLETE)
            self.poisoned = True
        elif status not in (204, 304) and not chunked and self.length is None:
            self._until_eof = True

    def on_body(self, body: bytes) -> None:
        if self.state is not ExchangeState.BODY:
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
        elif self.state is ExchangeState.BODY:
            self._enter(ExchangeState.COMPLETE)
            self.keep_alive = self._parser.should_keep_alive()

    # -- used by the exchange ----------------------------------------------------------------

    def begin(self, request: Request) -> None:
        """Start an exchange: send the request head (and the whole body when known).

        Only on an ``IDLE`` connection whose transport is up (else :class:`InvalidState`).
        """
        if self.transport is None:
            raise InvalidState("the upstream connection has no transport yet")
        self._enter(ExchangeState.AWAITING_HEAD)
        self._reset_exchange(is_head=request.is_head, request_done=not request.streamed)
        if self._parser_stale:
            self._parser = httptools.HttpResponseParser(self)
            self._parser_stale = False
        now = self.loop.time()
        self._last_activity = now
        self._timer = self.loop.call_at(now + self._timeout, self._on_timer)
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
        await self._waiter.wait()

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
        self._last_activity = self.loop.time()

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
            self.state is ExchangeState.COMPLETE
            and self.keep_alive
            and self.request_done
            and not self.poisoned
            and not self.lost
            and not self.chunks
        )

    def park(self, now: float) -> None:
        """The exchange is over and the connection goes back to the pool."""
        self._cancel_timer()
        self._enter(ExchangeState.IDLE)
        self.reused = True
        self.idle_since = now
        self.buffered = 0
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        """Close the connection; an exchange still running on it fails."""
        if self.state in RECEIVING:
            self.fail(UpstreamReset(f"the connection to the portal at {self._name} was closed"))
        self._cancel_timer()
        # a complete response (this one or, in the pool, the last one) and all of the request
        done = self.state is ExchangeState.COMPLETE or (
            self.state is ExchangeState.IDLE and self.reused
        )
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if done and self.request_done:
                transport.close()  # nothing is lost by flushing first
            else:
                transport.abort()  # never wait on a portal that stopped reading

    # -- internals ---------------------------------------------------------------------------

    def _parse_error(self, exc: Exception) -> CSCError:
        if self.state is ExchangeState.BODY:
            return UpstreamReset("the portal's response broke off (invalid body framing)")
        detail = str(exc)[:120] or exc.__class__.__name__
        return UpstreamError(f"the portal at {self._name} sent an invalid response ({detail})")

    def _enter(self, state: ExchangeState) -> None:
        self.state = advance(self.state, state)

    def _fail(self, err: CSCError) -> None:
        self.poisoned = True
        if self.state not in RECEIVING:
            return  # complete, failed already, or no exchange: only never reuse the connection
        self._enter(ExchangeState.FAILED)
        self.error = err
        self._cancel_timer()
        if self.transport is not None and not self.lost:
            self.transport.abort()

    def _pause_reading(self) -> None:
        if self.transport is not None and not self.lost:
            self._reading_paused = True
            self.transport.pause_reading()

    def _wake(self) -> None:
        self._waiter.set()
        if self.on_wake is not None:
            self.on_wake()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self.state not in RECEIVING:
            return
        now = self.loop.time()
        if self._reading_paused or self.buffered or self.waiting_for_body:
            self._last_activity = now  # the link side is the slow one, not the portal
        deadline = self._last_activity + self._timeout
        if now < deadline:
            self._timer = self.loop.call_at(deadline, self._on_timer)
            return
        what = "stopped sending" if self.state is ExchangeState.BODY else "did not answer"
        self.fail(UpstreamTimeout(f"the portal {what} within {self._timeout:g} s"))


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
        #: Tasks that took over exchanges started by quick() (kept until they end).
        self.tasks: set[asyncio.Task[None]] = set()
        #: Exchanges quick() started that a task took over, by why (tests and diagnostics).
        self.taken_over: Counter[Outcome] = Counter()
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
        await self._exchange(stream, request, fresh=False)

    def quick(self, stream: LinkStream, ended: Callable[[], None]) -> QuickExchange | None:
        """For a bodyless request whose FIN came with its OPEN, an exchange served by callbacks
        on an idle pooled connection (:class:`~tenant_agent.http_quick.QuickExchange`: its
        ``start()`` sends the request; ``ended`` is called once it is over). None, and nothing
        done, when no connection is idle or the request is not valid: :meth:`handle` then
        serves it (connecting, or refusing it)."""
        if stream.info.get("body") or not stream.read_done or not self._idle:
            return None  # (no idle connection: handle() builds the request and connects)
        try:
            request = build_request(stream.info, self.origin, None)
        except ProtocolError:
            return None
        conn = self._take_idle()
        if conn is None:
            return None
        return QuickExchange(self, stream, Exchange(conn, stream, request), ended)

    async def resume(self, exchange: Exchange, outcome: Outcome) -> None:
        """Go on in a task with an exchange that :meth:`quick` started and could not end
        by callbacks (a long or slow answer, an answer over the stream's credit, a retry)."""
        stream = exchange.stream
        try:
            retry = await exchange.finish(outcome)
        except CSCError:
            retry = False  # the CSC reset the stream while the response was written to it
        except BaseException as exc:  # not `finally`: an await there (shared/compiled.py)
            await exchange.detach()
            self.release(exchange.conn)
            raise exc
        await exchange.detach()
        self.release(exchange.conn)
        if retry:
            await self._exchange(stream, exchange.request, fresh=True)
        elif not stream.done:
            await drain_upload(stream, self.read_timeout)

    async def _exchange(self, stream: RelayedStream, request: Request, *, fresh: bool) -> None:
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
                retry = await Exchange(conn, stream, request).run()
            finally:
                self.release(conn)
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
        for conn in list(self._busy):  # an exchange served by callbacks ends at once
            conn.fail(GoingAway("the tenant agent is shutting down"))
        for conn in [*self._idle, *self._busy]:
            conn.close()
        self._idle.clear()
        self._busy.clear()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    # -- connections -------------------------------------------------------------------------

    async def _acquire(self) -> UpstreamConnection:
        conn = self._take_idle()
        return conn if conn is not None else await self._connect()

    def _take_idle(self) -> UpstreamConnection | None:
        """The most recently used idle connection that is still up (now busy), if any."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.lost and conn.transport is not None and not conn.transport.is_closing():
                self._busy.add(conn)
                return conn
        return None

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

    def release(self, conn: UpstreamConnection) -> None:
        """An exchange on ``conn`` is over: back to the pool if it can be reused, else closed."""
        self._busy.discard(conn)
        if self._closed or not conn.reusable:
            conn.close()
            return
        loop = conn.loop
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
