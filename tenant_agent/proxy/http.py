"""The local/DMZ proxy's HTTP side: bootloader connections in, requests to the portal out.

A bootloader configured with Host and Port speaks plain HTTP/1.1 to ``csc-agent proxy``, the
same requests it would send through the CSC's ``/t/{alias}/`` tunnel. Each accepted connection
is a :class:`ClientConnection`: an ``asyncio.Protocol`` around llhttp's request parser
(``httptools``) and one task that serves its requests in order. Each request becomes an
:class:`InboundExchange`, which offers the stream interface
:class:`~tenant_agent.http_upstream.RelayedStream`, so the portal side (pooled keep-alive
connections, timeouts, typed errors, backpressure) is the agent's own
:class:`~tenant_agent.http_upstream.HttpUpstream`. Heads and error bodies are built without I/O
in :mod:`tenant_agent.proxy.messages`; the exchange lives in :mod:`tenant_agent.proxy.exchange`.

Invariants:

* Requests on one connection are answered one at a time, in order; pipelined ones wait, parsed.
* Memory per connection is bounded: reading from the client pauses while more than
  :data:`HIGH_WATER` request body bytes (or :data:`MAX_PIPELINED` requests) wait, and resumes
  once the portal took them; the response side is bounded by HttpUpstream's marks and the
  client transport's write buffer (the relay waits for it to drain).
* The forwarded request has no hop-by-hop field (RFC 9110 §7.6.1) and carries
  ``X-Forwarded-For``/``-Proto``/``-Host`` and an ``X-Request-Id`` (the client's when it is
  well formed, else a new one), which the response echoes.
* A malformed request gets 400 ``bad_request``, a head over ``max_header_size`` 431, a body over
  ``max_body_size`` 413; each closes the connection. Failures before the response head are the
  CSC's JSON bodies (502 ``upstream_refused``, 504 ``upstream_timeout``, ...); after it, the
  connection is aborted, so a truncated response never passes for a complete one.
* A client has ``header_timeout`` to send a whole request head; one that stops sending its body
  or reading the response for ``idle_timeout`` is cut off; an idle keep-alive connection is
  closed after ``idle_timeout``.
* One log line per request (request id, method, path, status, bytes, duration); never a header
  value, a query string or a body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable
from typing import Any, Protocol, cast

import httptools

from shared.errors import (
    BadRequest,
    Cancelled,
    CSCError,
    HeadersTooLarge,
    InternalError,
    InvalidState,
    PayloadTooLarge,
)
from shared.headers import request_id_for
from shared.wakeup import Wakeup
from shared.writeflow import WriteFlow
from tenant_agent.http_upstream import HIGH_WATER, LOW_WATER, RelayedStream
from tenant_agent.proxy.config import ProxyConfig
from tenant_agent.proxy.exchange import InboundExchange
from tenant_agent.proxy.messages import (
    InboundRequest,
    ReadState,
    advance_read,
    error_response,
    forwarded_headers,
    header_value,
    origin_form,
)

log = logging.getLogger("csc_agent.proxy.http")

#: Parsed requests allowed to wait behind the one being served before reading pauses.
MAX_PIPELINED = 8
#: After answering a request whose body was not read, how long to discard the rest before closing.
LINGER = 2.0


class _Stop(Exception):
    """Raised in a parser callback: parse no further (the reason is already recorded)."""


# --- one connection ---------------------------------------------------------------------


class Relay(Protocol):
    """The portal side: :class:`HttpUpstream` (tests may pass a stand-in)."""

    def handle(self, stream: RelayedStream) -> Awaitable[None]: ...

    def close(self) -> Awaitable[None]: ...


class ClientConnection(WriteFlow, asyncio.Protocol):
    """One bootloader connection: requests parsed by llhttp, served in order by one task."""

    def __init__(self, frontend: HttpFrontend) -> None:
        self.frontend = frontend
        self.config = frontend.config
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._requests: deque[InboundRequest] = deque()
        self._parsing: InboundRequest | None = None
        self._url = bytearray()
        self._raw: list[tuple[bytes, bytes]] = []
        self.read_state = ReadState.HEAD
        self._head_bytes = 0
        now = self.loop.time()
        self._head_started: float | None = None
        self._idle_since = now
        self._last_progress = now
        self._first = True
        self._queued = 0
        self._read_paused = False
        self.fatal: CSCError | None = None
        self.lost = False
        self.client_ip = ""
        self.exchange: InboundExchange | None = None
        self._waiting_for_body = False
        self._waiter = Wakeup()
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client_ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        self.frontend.track(self, self.loop.create_task(self._serve()))
        self._rearm()

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return  # no further request is served (lingering close, upgrade, error)
        now = self.loop.time()
        self._last_progress = now
        if self.read_state is ReadState.HEAD:
            if self._head_started is None:
                # the first request's head is due header_timeout after the connection opened
                self._head_started = self._idle_since if self._first else now
                self._rearm()
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade_declined(data, exc)
        except httptools.HttpParserError as exc:
            if not self._stopped:
                self._parse_failed(exc)
        if self.read_state is ReadState.HEAD and self._head_bytes > self.config.max_header_size:
            self._set_fatal(HeadersTooLarge(self._too_large_head()))
        self._wake()

    def _upgrade_declined(self, data: bytes, exc: httptools.HttpParserUpgrade) -> None:
        """llhttp stops after a request asking to switch protocols. The proxy never switches
        (``Upgrade`` is hop-by-hop), so HTTP/1.1 goes on (RFC 9110 §7.8) with a fresh parser,
        except after CONNECT, which is refused and ends the connection."""
        last = self._requests[-1] if self._requests else None
        if last is None or last.method == "CONNECT" or self._stopped:
            self._stop()
            return
        self._parser = httptools.HttpRequestParser(self)
        offset = int(exc.args[0]) if exc.args and str(exc.args[0]).isdigit() else len(data)
        if offset < len(data):
            self.data_received(data[offset:])

    def eof_received(self) -> bool | None:
        """The client half-closed: answer what is queued, then close."""
        if self.read_state is ReadState.LINGERING:
            return False  # the client read our answer and closed: done
        if self._parsing is not None and self.fatal is None:
            self._set_fatal(BadRequest("the client ended the connection inside a request"))
        self._stop()
        self._wake()
        return self.exchange is not None or bool(self._requests) or self.fatal is not None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._cancel_timer()
        self.writing_lost()
        if self.exchange is not None:
            self.exchange.client_lost()
        self.frontend.forget(self)
        self._wake()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._last_progress = self.loop.time()

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url.clear()
        self._raw = []
        self._enter(ReadState.HEAD)
        if self._head_started is None:
            self._head_started = self.loop.time()
            self._rearm()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw.append((name, value))

    def on_headers_complete(self) -> None:
        size = len(self._url) + sum(len(n) + len(v) + 4 for n, v in self._raw)
        if size > self.config.max_header_size:
            self._set_fatal(HeadersTooLarge(self._too_large_head()))
            raise _Stop
        parser = self._parser
        request = InboundRequest(
            parser.get_method().decode("ascii", "replace"),
            self._url.decode("latin-1"),
            [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self._raw],
            http11=parser.get_http_version() != "1.0",
            keep_alive=parser.should_keep_alive(),
        )
        self._enter(ReadState.BODY)
        self._head_bytes = 0
        self._head_started = None
        self._parsing = request if request.has_body else None
        self._requests.append(request)
        if len(self._requests) > MAX_PIPELINED:
            self._pause_reading()
        limit = self.config.max_body_size
        if limit is not None and request.length is not None and request.length > limit:
            self._stop()  # answered 413 without reading the body
            raise _Stop

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        if request is None:  # llhttp calls on_body only after a head announcing a body
            raise InvalidState("request body bytes without a request")
        size = len(body)
        request.received += size
        limit = self.config.max_body_size
        if limit is not None and request.received > limit:
            self._set_fatal(PayloadTooLarge(f"the request body exceeds {limit} bytes"))
            raise _Stop
        request.chunks.append(body)
        request.queued += size
        self._queued += size
        if self._queued > HIGH_WATER:
            self._pause_reading()

    def on_message_complete(self) -> None:
        request = self._parsing
        if request is not None:
            request.body_done = True
            self._parsing = None
        self._enter(ReadState.HEAD)
        if self._requests and not self._requests[-1].keep_alive:
            self._stop()  # Connection: close (or HTTP/1.0): nothing follows
            raise _Stop

    # -- used by the exchange ----------------------------------------------------------------

    def send(self, parts: tuple[bytes, ...] | list[bytes | memoryview]) -> None:
        if parts and not self.lost and self.transport is not None:
            self.transport.writelines(parts)

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()

    def progress(self) -> None:
        self._last_progress = self.loop.time()

    async def wait_for_body(self) -> None:
        self._waiting_for_body = True
        try:
            await self._wait()
        finally:
            self._waiting_for_body = False

    def body_consumed(self, request: InboundRequest, nbytes: int) -> None:
        """The portal side took ``nbytes`` of ``request``'s body: the client may send more."""
        nbytes = min(nbytes, request.queued)
        request.queued -= nbytes
        self._queued -= nbytes
        self._maybe_resume()

    def may_keep_alive(self, request: InboundRequest) -> bool:
        """Whether the connection can carry another request once this one is answered."""
        return request.keep_alive and request.body_done and not self.frontend.draining

    # -- serving -----------------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            while (request := await self._next_request()) is not None:
                if not await self._serve_one(request):
                    break
        except Exception:  # a bug: never leave the connection hanging
            log.exception("proxy connection from %s failed", self.client_ip)
            self.abort()
        finally:
            self._close()

    async def _next_request(self) -> InboundRequest | None:
        while not self.lost:
            if self._requests:
                return self._requests[0]
            if self.fatal is not None:
                self._answer_fatal(self.fatal)
                return None
            if self._stopped or (self.frontend.draining and self._head_started is None):
                return None
            await self._wait()
        return None

    async def _serve_one(self, request: InboundRequest) -> bool:
        """Relay one request; True if the connection may carry the next one."""
        started = self.loop.time()
        request_id = request_id_for(header_value(request.headers, "x-request-id"))
        info: dict[str, Any] = {
            "method": request.method,
            "headers": forwarded_headers(
                request.headers,
                client_ip=self.client_ip,
                proto="https" if self.frontend.tls else "http",
                request_id=request_id,
            ),
            "body": request.has_body,
            "request_id": request_id,
        }
        exchange = InboundExchange(self, request, request_id, info)
        self.exchange = exchange
        self._last_progress = started
        self._rearm()
        try:
            problem = self._precheck(request, info)
            if problem is not None:
                exchange.reject(problem)
            else:
                await self.frontend.relay.handle(exchange)
            if not exchange.done:
                exchange.reset(InternalError("the response did not end"))
        finally:
            self.exchange = None
        self._requests.popleft()
        self._discard(request)
        self._log(request, exchange, started)
        keep = exchange.keep_alive and self.may_keep_alive(request) and not self.lost
        self._first = False
        now = self.loop.time()
        self._idle_since = now
        if self._head_started is not None:
            self._head_started = now  # a pipelined head gets its own time from here
        self._rearm()
        self._maybe_resume()
        return keep

    def _precheck(self, request: InboundRequest, info: dict[str, Any]) -> CSCError | None:
        try:
            info["target"] = origin_form(request.target)
        except BadRequest as err:
            return err
        limit = self.config.max_body_size
        if limit is not None and request.length is not None and request.length > limit:
            return PayloadTooLarge(f"the request body exceeds {limit} bytes")
        return None

    def _answer_fatal(self, err: CSCError) -> None:
        log.info("request from %s refused: %s", self.client_ip, err.message)
        self.send((error_response(err, request_id_for(None), keep_alive=False, http11=True),))

    def _discard(self, request: InboundRequest) -> None:
        """Forget what is left of an answered request's body; if more of it is still to come,
        no further request is read (the connection closes)."""
        request.chunks.clear()
        self._queued -= request.queued  # taken or not, none of it is held any more
        request.queued = 0
        if self._parsing is request:
            self._stop()

    def _log(self, request: InboundRequest, exchange: InboundExchange, started: float) -> None:
        error = exchange.error
        status = exchange.status or (error.spec.http_status if error is not None else 0)
        outcome = "aborted" if error is not None else "complete"
        log.info(
            "%s %s %d",
            request.method,
            request.path,
            status,
            extra={
                "request_id": exchange.request_id,
                "client": self.client_ip,
                "status": status,
                "outcome": outcome,
                "bytes_in": request.received,
                "bytes_out": exchange.sent,
                "duration_ms": round((self.loop.time() - started) * 1000, 1),
            },
        )

    def _close(self) -> None:
        """End the connection; if the client may still be sending, linger to discard it first
        (closing with unread data would reset the connection and could destroy our answer)."""
        self._cancel_timer()
        transport = self.transport
        if transport is None or self.lost or transport.is_closing():
            return
        # a head only ever starts while the state is HEAD (it is None again after the head)
        unread = self._parsing is not None or self.fatal is not None
        unread = unread or self._head_started is not None
        if unread and transport.can_write_eof():
            self._stop()
            self._enter(ReadState.LINGERING)
            transport.write_eof()
            self._resume_reading()
            self._timer = self.loop.call_later(LINGER, transport.abort)
            return
        transport.close()

    # -- flow and timers ---------------------------------------------------------------------

    def _pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None and not self.lost:
            self._read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._read_paused and self.transport is not None and not self.lost:
            self._read_paused = False
            self.transport.resume_reading()

    def _maybe_resume(self) -> None:
        if self._stopped or self._queued > LOW_WATER or len(self._requests) > MAX_PIPELINED:
            return
        self._resume_reading()

    @property
    def _stopped(self) -> bool:
        return self.read_state in (ReadState.STOPPED, ReadState.LINGERING)

    def _enter(self, state: ReadState) -> None:
        self.read_state = advance_read(self.read_state, state)

    def _stop(self) -> None:
        """Read no further request (idempotent; a lingering connection stays lingering)."""
        if not self._stopped:
            self._enter(ReadState.STOPPED)

    def _set_fatal(self, err: CSCError) -> None:
        if self.fatal is None:
            self.fatal = err
        self._stop()
        self._pause_reading()

    def _parse_failed(self, exc: Exception) -> None:
        if isinstance(exc, httptools.HttpParserCallbackError):
            log.error("proxy: request parsing failed", exc_info=exc)
            self._set_fatal(InternalError())
            return
        detail = str(exc)[:120] or exc.__class__.__name__
        self._set_fatal(BadRequest(f"the request is malformed ({detail})"))

    def _too_large_head(self) -> str:
        return f"the request head exceeds {self.config.max_header_size} bytes"

    async def _wait(self) -> None:
        await self._waiter.wait()

    def _wake(self) -> None:
        self._waiter.set()

    def wake(self) -> None:
        """Let the serving task look at the connection again (drain)."""
        self._wake()

    def _deadline(self) -> float | None:
        config = self.config
        if self.read_state is ReadState.LINGERING:
            return None
        if self.exchange is not None:
            return self._last_progress + config.idle_timeout
        if self._requests:
            return None
        if self._head_started is not None:
            return self._head_started + config.header_timeout
        wait = config.header_timeout if self._first else config.idle_timeout
        return self._idle_since + wait

    def _rearm(self) -> None:
        self._cancel_timer()
        if self.lost:
            return
        deadline = self._deadline()
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline()
        if self.lost or deadline is None:
            return
        now = self.loop.time()
        if now < deadline:
            self._timer = self.loop.call_at(deadline, self._on_timer)
            return
        exchange = self.exchange
        if exchange is not None:
            if not (self._waiting_for_body or self.writing_paused):
                self._last_progress = now  # waiting for the portal: its own timeout applies
                self._rearm()
                return
            what = "sending its request body" if self._waiting_for_body else "reading"
            log.info(
                "request %s: the client stopped %s",
                exchange.request_id,
                what,
                extra={"request_id": exchange.request_id},
            )
            exchange.reset(Cancelled(f"the client stopped {what}"))
            return
        if self._head_started is not None:
            log.info("client %s: no complete request head in time", self.client_ip)
            self.abort()
        elif self.transport is not None:
            self.transport.close()  # an idle keep-alive connection ends quietly


# --- the listener's shared state --------------------------------------------------------


class HttpFrontend:
    """The HTTP proxy's shared state: settings, the portal client, live connections, drain."""

    def __init__(self, config: ProxyConfig, relay: Relay, *, tls: bool) -> None:
        self.config = config
        self.relay = relay
        self.tls = tls
        self.connections: set[ClientConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        self._empty = asyncio.Event()
        self._empty.set()

    def protocol(self) -> ClientConnection:
        """The protocol factory of the listener."""
        return ClientConnection(self)

    def track(self, conn: ClientConnection, task: asyncio.Task[None]) -> None:
        """A connection is up (after its TLS handshake) and ``task`` serves it."""
        self.connections.add(conn)
        self._empty.clear()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._empty.set()

    def begin_drain(self) -> None:
        """Take no new requests: idle connections close now, busy ones after their answer."""
        self.draining = True
        for conn in list(self.connections):
            conn.wake()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until every connection has closed; False if ``timeout`` passed first."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._empty.wait()
        return not self.connections

    async def close(self) -> None:
        """Abort every connection, close the portal client, and wait for the serving tasks."""
        for conn in list(self.connections):
            conn.abort()
        await self.relay.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
