"""The CSC's public HTTP listener: an ``asyncio.Protocol`` around llhttp (``httptools``).

:class:`~csc.relay.http_listener.HttpFront` owns the listening socket (plain or TLS) and the
hardening bounds shared by its connections; each accepted connection is a :class:`FrontConnection`. The bootloader-facing
routes (``/t/{alias}``, ``/t/{alias}/...``, ``GET /v1/resolve/{alias}``, ``/healthz``,
``/readyz``) are served here by a :class:`Handler` (csc/relay/http_ingress.py); any other path
is 404 ``not_found``. A request for an *upgrade path* (``/v1/agent/connect``) is served by its ``UpgradeHandler``
(csc/relay/gateway.py), which answers it here and may switch the connection to another protocol
(:meth:`FrontConnection.switch_protocol`, with the bytes read after the request head).

Invariants:

* Requests on one connection are answered one at a time, in order; at most
  :data:`MAX_PIPELINED` parsed requests wait, and at most :data:`HIGH_WATER` body bytes are
  queued before reading from the client pauses.
* A request head must arrive within ``http_head_timeout`` (from the connection's start, or from
  its first byte on a kept-alive connection) and within ``http_max_head_size`` bytes; unfinished
  heads of all connections together hold at most ``http_head_buffer_total`` bytes (a connection
  that would exceed it is closed). An idle kept-alive connection is closed after
  ``http_keepalive_timeout``.
* A request body that stalls for ``http_body_timeout`` while the CSC waits for it, or that runs
  slower than ``http_body_min_rate`` after ``http_body_grace``, fails with 408
  ``request_timeout`` (an abort once the response has begun), so its stream slot is freed.
* While bytes wait for the client (an answer, or the last bytes of a closed connection), it
  must acknowledge some within ``client_send_timeout``, or the connection is aborted and the
  handler resets its stream (shared/sendwatch.py).
* Those bytes, and request body bytes queued while the stream takes none of them (reading
  paused), count toward the node's ``client_buffer_limit``; past it the connection may be
  closed earlier (shared/sendwatch.py ``SendWatches``).
* Everything the listener answers by itself is the JSON error shape of shared/errors.py
  (400, 404, 405, 408, 413, 431); a malformed request (llhttp's strict parser, plus
  ``Transfer-Encoding`` other than ``chunked``) ends the connection after the answer.
* Nothing per connection outlives it: the connection drops its buffers when it closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Protocol, cast

import httptools

from csc.relay.http_front_request import FrontRequest, origin_form, route
from shared.errors import (
    BadRequest,
    Cancelled,
    CSCError,
    HeadersTooLarge,
    PayloadTooLarge,
    RequestTimeout,
)
from shared.headers import request_id_for
from shared.http1 import CONTINUE, error_response
from shared.sendwatch import Hold, SendWatch
from shared.wakeup import Wakeup

if TYPE_CHECKING:
    from csc.relay.http_listener import HttpFront
    from shared.linkstream import TunnelStream

log = logging.getLogger("csc.http.front")

#: Parsed requests allowed to wait behind the one being served before reading pauses.
MAX_PIPELINED = 8
#: Request body bytes queued (read from the client, not yet taken by the stream) before pausing.
HIGH_WATER = 256 * 1024
#: The client transport's write buffer marks: the relay waits for it to drain below them.
WRITE_HIGH, WRITE_LOW = 256 * 1024, 64 * 1024

#: After answering while the client may still be sending, how long to discard its bytes.
LINGER = 2.0


#: The route kind of a request for an upgrade path (``FrontRequest.alias`` holds the path).
UPGRADE = "upgrade"


class _Stop(Exception):
    """Raised in a parser callback: parse no further (the reason is already recorded)."""


class Handler(Protocol):
    """Serves one parsed request on a connection (csc/relay/http_ingress.py)."""

    async def serve(self, conn: FrontConnection, request: FrontRequest) -> None: ...


class FrontConnection(asyncio.Protocol):
    """One client connection: requests parsed by llhttp, served in order by one task at a time."""

    def __init__(self, front: HttpFront, client: tuple[str, int] | None = None) -> None:
        self.front = front
        #: the client a balancer's PROXY header named (csc/relay/proxied.py), else None
        self._client = client
        self.config = front.config
        self.loop = front.loop
        self.transport: asyncio.Transport | None = None
        self.client_ip = ""
        self.peer = ""
        #: the address key counted for this connection (csc/relay/conncap.py) until it is given back
        self._counted: str | None = None
        self._lingering = False  # refused, its bytes being discarded
        #: dropped when the connection ends (it refers back to us: a cycle that would keep
        #: the connection and its partial head until the cyclic GC ran)
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._requests: deque[FrontRequest] = deque()
        self._parsing: FrontRequest | None = None
        self._url = bytearray()
        self._raw: list[tuple[bytes, bytes]] = []
        #: Bytes after the head of a request that asked to switch protocols (reading paused).
        self._tail = b""
        self._upgrading = False
        self._in_head = True
        self._head_bytes = 0  # counted against the front's total while the head is unfinished
        self._head_started: float | None = self.loop.time()  # the first head is due from now
        self._idle_since = self.loop.time()
        self._queued = 0
        #: request body bytes the handler has taken, in all (the progress of a held body)
        self.body_taken = 0
        #: the request body held while the stream takes none of it (made when needed)
        self._body_hold: Hold | None = None
        self._read_paused = False
        self._write_paused = False
        self._stopped = False  # parse no further request
        self._aborted = False  # by the handler, which then finishes by itself
        self._paused_at = 0.0
        self.fatal: CSCError | None = None
        self.lost = False
        self._task: asyncio.Task[None] | None = None
        self._waiter = Wakeup(self.loop)
        self._drain_waiter = Wakeup(self.loop)
        self._timer: asyncio.TimerHandle | None = None
        #: bytes handed to the transport, and the send deadline's watch (made when needed)
        self.handed = 0
        self._watch: SendWatch | None = None
        #: the stream whose bytes are being relayed to the client, and its tenant: the last
        #: one's until the next relay (:meth:`relay_from`)
        self.upstream: TunnelStream | None = None
        self.tenant = ""

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        peer = self._client or transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.client_ip, self.peer = str(peer[0]), f"{peer[0]}:{peer[1]}"
        counted = self.front.counts.take(self.client_ip, "http")
        if isinstance(counted, CSCError):
            self._refuse_connection(counted)
            return
        self._counted = counted
        self.front.connections.add(self)
        self._rearm()

    def data_received(self, data: bytes) -> None:
        if self._upgrading and len(self._tail) < HIGH_WATER:
            self._tail += data  # reading is paused; a transport may deliver what it holds
            return
        if self._stopped or self.lost:
            return
        if self._in_head:
            if self._head_started is None:
                self._head_started = self.loop.time()
                self._rearm()
            if not self._count_head(len(data)):
                return
        elif self._parsing is not None:
            self._parsing.last_body = self.loop.time()
        try:
            if self._parser is not None:
                self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # llhttp stops after a request asking to switch protocols: that request is the
            # connection's last; what follows it waits for the switch (if any)
            self._stopped = True
            if self._requests:
                self._requests[-1].keep_alive = False
            if self.transport is not None:
                self._upgrading = True
                self._tail = data[upgrade.args[0] :]
                self._pause_reading()
        except httptools.HttpParserError as exc:
            if not self._stopped:
                self._fail(BadRequest(f"malformed request: {exc}"))
        if self._in_head and self._head_bytes > self.config.http_max_head_size:
            self._fail(HeadersTooLarge(self._too_large()))
        self._wake()

    def eof_received(self) -> bool | None:
        """The client half-closed: answer what was read, then close."""
        if self._stopped:
            request = self._parsing
            if request is not None and request.body_error is None:
                request.body_error = BadRequest("the client ended the connection inside a body")
                self._wake()
            return self._task is not None  # lingering or answering: close once done
        if self._parsing is not None or (self._in_head and self._head_bytes):
            self._fail(BadRequest("the client ended the connection inside a request"))
        self._stopped = True
        self._wake()
        return self._task is not None or bool(self._requests)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._release_head()
        self._cancel_timer()
        if self._watch is not None:
            self._watch.stop()
        if self._body_hold is not None:
            self._body_hold.leave()
        self._parser = None
        self._requests.clear()
        self.front.connections.discard(self)
        self._uncount()
        self._drain_waiter.set()
        if self._task is not None and not self._aborted:
            self._task.cancel()  # the client went away: the handler resets its stream
        self._wake()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._watch_send()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._drain_waiter.set()

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url.clear()
        self._raw = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None  # called by it
        if len(self._url) + sum(len(n) + len(v) + 4 for n, v in self._raw) > (
            self.config.http_max_head_size
        ):
            self._fail(HeadersTooLarge(self._too_large()))
            raise _Stop
        try:
            target = origin_form(self._url.decode("latin-1"))
            request = FrontRequest(
                parser.get_method().decode("ascii", "replace"),
                target,
                [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self._raw],
                http11=parser.get_http_version() != "1.0",
            )
        except (BadRequest, ValueError) as exc:
            self._fail(exc if isinstance(exc, BadRequest) else BadRequest("malformed request"))
            raise _Stop from None
        request.keep_alive = parser.should_keep_alive()
        request.kind, request.alias = route(request.method, target)
        if (path := target.split("?", 1)[0]) in self.front.upgrades:
            request.kind, request.alias = UPGRADE, path
        self._release_head()
        self._in_head = False
        self._head_started = None
        self._parsing = request if request.has_body else None
        request.body_started = request.last_body = self.loop.time()
        self._requests.append(request)
        if len(self._requests) > MAX_PIPELINED:
            self._pause_reading()
        self._serve_soon()
        limit = self.config.max_body_size
        if limit is not None and request.length is not None and request.length > limit:
            self._stopped = True  # answered 413 without reading the body
            request.body_error = PayloadTooLarge(f"the request body exceeds {limit} bytes")
            raise _Stop

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        assert request is not None
        request.received += len(body)
        limit = self.config.max_body_size
        if limit is not None and request.received > limit:
            self._fail(PayloadTooLarge(f"the request body exceeds {limit} bytes"))
            raise _Stop
        request.chunks.append(body)
        request.queued += len(body)
        self._queued += len(body)
        if self._queued > HIGH_WATER:
            self._pause_reading()
            hold = self._body_hold
            if hold is None:
                watches = self.front.counts.watches
                hold = Hold(
                    watches,
                    self.transport,
                    self._held_body,
                    self._taken_body,
                    self._tenant,
                    self.shed_body,
                )
                self._body_hold = hold
            hold.join()

    def on_message_complete(self) -> None:
        if self._parsing is not None:
            self._parsing.body_done = True
            self._parsing = None
        self._in_head = True
        if self._requests and not self._requests[-1].keep_alive:
            self._stopped = True  # Connection: close (or HTTP/1.0 without keep-alive)
            raise _Stop

    # -- used by the handler -----------------------------------------------------------------

    @property
    def tls(self) -> bool:
        return self.front.tls

    def send(self, *parts: bytes | memoryview) -> None:
        if not self.lost and self.transport is not None:
            if len(parts) == 1:
                self.handed += len(parts[0])
                self.transport.write(parts[0])
            else:
                self.handed += sum(len(part) for part in parts)
                self.transport.writelines(parts)

    async def drain(self) -> None:
        """Return once the client's write buffer is below its high-water mark."""
        while self._write_paused and not self.lost:
            await self._drain_waiter.wait()
        if self.lost:
            raise ConnectionResetError("the client went away")

    def abort(self) -> None:
        """End the connection at once: a response that cannot be completed must not pass for
        a complete one, and the connection is never reused."""
        self._stopped = self._aborted = True
        if self.transport is not None and not self.lost:
            self.transport.abort()

    def keep_alive(self, request: FrontRequest) -> bool:
        """Whether the connection can carry another request once ``request`` is answered."""
        return request.keep_alive and request.body_done and not self.front.draining()

    def continue_body(self, request: FrontRequest) -> None:
        """Send ``100 Continue`` if the client waits for it (RFC 9110 §10.1.1), once."""
        if request.expect_continue and request.http11 and not request.continued:
            request.continued = True
            if not request.body_done and request.body_error is None:
                self.send(CONTINUE)

    async def body_chunk(self, request: FrontRequest) -> bytes:
        """The next chunk of ``request``'s body, ``b""`` at its end; raises the body's error
        (malformed, too large, too slow) or Cancelled when the client went away."""
        self.continue_body(request)
        while True:
            if request.chunks:
                chunk = request.chunks.popleft()
                request.queued -= len(chunk)
                self._queued -= len(chunk)
                self.body_taken += len(chunk)
                self._maybe_resume()
                return chunk
            if request.body_error is not None:
                raise request.body_error
            if request.body_done:
                return b""
            if self.lost:
                raise Cancelled("the client went away")
            await self._wait()

    def error(self, request: FrontRequest | None, err: CSCError) -> int:
        """Answer ``err`` as the JSON error; returns its status."""
        request_id = request.request_id if request is not None else request_id_for(None)
        keep = request is not None and self.keep_alive(request)
        self.send(
            error_response(
                err,
                request_id,
                keep_alive=keep,
                http11=request.http11 if request is not None else True,
                method=request.method if request is not None else "GET",
            )
        )
        return err.spec.http_status

    # -- serving -----------------------------------------------------------------------------

    def _serve_soon(self) -> None:
        if self._task is None and not self.lost:
            self._task = self.loop.create_task(self._serve())
        self._rearm()

    async def _serve(self) -> None:
        try:
            while self._requests and not self.lost:
                request = self._requests[0]
                request.request_id = request_id_for(request.header("x-request-id"))
                try:
                    if request.kind == UPGRADE:
                        await self.front.upgrades[request.alias](self, request)
                    else:
                        await self.front.handler.serve(self, request)
                finally:
                    if self._requests and self._requests[0] is request:
                        self._requests.popleft()
                if self.transport is None:
                    return  # switched to another protocol
                if not self.keep_alive(request):
                    self._stopped = True  # that answer said Connection: close
                    return
                self._idle_since = self.loop.time()
                self._maybe_resume()
            if self.fatal is not None and not self.lost:
                self.error(None, self.fatal)
                self._stopped = True
        except asyncio.CancelledError:
            if not self.lost:
                raise
        except Exception:  # a bug: never leave the connection hanging
            log.exception("http connection from %s failed", self.peer)
            self.abort()
        finally:
            self._task = None
            if self._stopped and self.transport is not None and not self.lost:
                self._close_gently()
            self._rearm()

    def _refuse_connection(self, err: CSCError) -> None:
        """Answer ``err`` to a connection refused as it was accepted (csc/relay/conncap.py)
        and serve nothing on it: closed, or when it may linger, half-closed at once with its
        bytes discarded (the request it is sending, so that it reads the answer rather than a
        reset) until it closes or :data:`LINGER` seconds pass."""
        transport = self.transport
        assert transport is not None
        self._stopped = True
        self._parser = None
        transport.write(error_response(err, request_id_for(None), keep_alive=False, http11=True))
        if not self.front.counts.may_linger():
            transport.close()
            return
        self._lingering = True
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = self.loop.call_later(LINGER, transport.close)

    def _uncount(self) -> None:
        """Give the connection's place in the counts back (once)."""
        if self._counted is not None:
            self.front.counts.close(self._counted)
            self._counted = None
        if self._lingering:
            self._lingering = False
            self.front.counts.linger_done()

    def _close_gently(self) -> None:
        """Close after our answer; while the client may still be sending (a body we did not
        read), half-close and discard its bytes for up to :data:`LINGER` seconds first, so the
        answer is not lost to a reset."""
        transport = self.transport
        assert transport is not None
        if (self._in_head and not self._head_bytes) or not transport.can_write_eof():
            self._close_now()
            return
        try:
            transport.write_eof()
        except OSError:  # the client reset the connection meanwhile
            transport.abort()
            return
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        self._watch_send()
        self.loop.call_later(LINGER, self._close_now)

    def _close_now(self) -> None:
        """Close; the send deadline holds while the answer's last bytes wait to be flushed."""
        if self.transport is not None and not self.lost:
            self.transport.close()
            self._watch_send()

    # -- bounds ------------------------------------------------------------------------------

    def _watch_send(self) -> None:
        """Start the send deadline (shared/sendwatch.py) if bytes wait for the client."""
        if self.transport is None or self.lost:
            return
        watch = self._watch
        if watch is None:
            try:
                if not self.transport.get_write_buffer_size():
                    return  # nothing waits (most answers): no watch made for this connection
            except AttributeError:  # asyncio's own TLS transport once its connection was lost
                return
            timeout = self.config.client_send_timeout
            watch = self._watch = SendWatch(
                self.transport,
                timeout,
                self._handed,
                self._stalled,
                self.front.counts.watches,
                self.loop,
            )
            watch.pending, watch.tenant = self._pending, self.tenant
        watch.start()

    def _handed(self) -> int:
        return self.handed

    def relay_from(self, stream: TunnelStream | None, tenant: str) -> None:
        """The handler relays ``stream``'s bytes of ``tenant`` to the client (None: no more,
        although its last bytes may wait): what the send deadline's watch counts."""
        self.upstream, self.tenant = stream, tenant
        if self._watch is not None:
            self._watch.tenant = tenant

    def _pending(self) -> int:
        upstream = self.upstream
        return 0 if upstream is None else upstream.buffered()

    def _held_body(self) -> int:
        return self._queued

    def _taken_body(self) -> int:
        return self.body_taken

    def _tenant(self) -> str:
        return self.tenant

    def shed_body(self, why: str) -> None:
        """Close the connection: the request body it holds waits for a stream that does not
        take it (the tenant's agent gives no credit: its portal reads slowly, or not at all),
        and the node is over ``client_buffer_limit`` (shared/sendwatch.py ``Hold``)."""
        transport = self.transport
        if transport is None or self.lost:
            return
        answering = self._requests[0].request_id if self._requests else ""
        log.info(
            "closing %s: %d bytes of its request body waiting for the portal, %s, %s",
            self.peer,
            self._queued,
            why,
            self.front.counts.watches.state(),
            extra={"request_id": answering, "tenant": self.tenant},
        )
        self.front.counts.stalled("http", True)
        self._stopped = True
        transport.abort()

    def _stalled(self, shed: bool) -> None:
        """The client took no byte for ``client_send_timeout``, or for less while the node
        holds too much for slow clients (``shed``): it went away, as far as the relay is
        concerned (the handler resets its stream)."""
        transport, watch = self.transport, self._watch
        if transport is None or watch is None or self.lost:
            return
        answering = self._requests[0].request_id if self._requests else ""
        log.info(
            "closing %s: %s",
            self.peer,
            watch.reason(shed),
            extra={"request_id": answering, "tenant": self.tenant},
        )
        self.front.counts.stalled("http", shed)
        self._stopped = True
        transport.abort()

    def _idle(self) -> bool:
        """No request is being read, waits or is being answered: a request boundary."""
        return self._task is None and not self._requests and self._parsing is None

    def _count_head(self, nbytes: int) -> bool:
        front = self.front
        if front.head_bytes + nbytes > self.config.http_head_buffer_total:
            log.warning("closing %s: unfinished request heads hold too many bytes", self.peer)
            front.heads_refused += 1
            self.abort()
            return False
        self._head_bytes += nbytes
        front.head_bytes += nbytes
        return True

    def _release_head(self) -> None:
        self.front.head_bytes -= self._head_bytes
        self._head_bytes = 0

    def _too_large(self) -> str:
        return f"the request head exceeds {self.config.http_max_head_size} bytes"

    def _fail(self, err: CSCError) -> None:
        """A failure of the input: the request being read (if any) fails with ``err``; the
        connection serves nothing after it and answers ``err`` if no response is under way."""
        self._stopped = True
        request = self._parsing
        if request is not None:
            request.body_error = err
        if self.fatal is None:
            self.fatal = err if request is None else None
        self._release_head()
        if self._task is None and self.fatal is not None and not self._requests:
            self.error(None, self.fatal)
            self._close_now()
        self._wake()

    def switch_protocol(self, head: bytes, proto: asyncio.Protocol) -> bool:
        """Write ``head`` (the 101 answer) and give the connection to ``proto``, with the bytes
        read after the request head; this module never sees it again. The task serving the
        request goes on serving ``proto`` (the front waits for it when it closes). False when
        the client already went away."""
        transport = self.transport
        if transport is None or self.lost:
            return False
        self._release_head()
        self._cancel_timer()
        if self._watch is not None:  # the link has its own deadlines (stuck_timeout)
            self._watch.stop()
        self._stopped = True
        self.transport = None
        self.front.connections.discard(self)
        counts, counted, self._counted = self.front.counts, self._counted, None
        if counted is not None:  # an agent's link now: its tenant's max_sessions bounds those
            counts.leave(counted)
        task = asyncio.current_task()
        if task is not None:
            self.front.switched.add(task)
            task.add_done_callback(self.front.switched.discard)
        if counted is not None:  # the node counts the link until the task serving it ends
            if task is None:
                counts.close(None)
            else:
                task.add_done_callback(lambda _task: counts.close(None))
        transport.write(head)
        transport.set_protocol(proto)
        proto.connection_made(transport)
        tail, self._tail = self._tail, b""
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        if tail:
            proto.data_received(tail)
        return True

    def _rearm(self) -> None:
        """One timer per connection, due no later than the earliest of its deadlines.

        The timer is moved only to an earlier time: a timer due earlier than needed (or when
        nothing is due any more) fires, :meth:`_on_timer` finds nothing to do yet and arms it
        again. So a kept-alive connection serving requests does not cancel and re-create its
        timer for every request."""
        if self.lost or self.transport is None:
            self._cancel_timer()
            return
        at = self._deadline()
        if at is None:
            return
        timer = self._timer
        if timer is not None:
            if timer.when() <= at:
                return
            timer.cancel()
        self._timer = self.loop.call_at(at, self._on_timer)

    def _deadline(self) -> float | None:
        config = self.config
        if self._task is None and not self._requests and self._head_started is not None:
            return self._head_started + config.http_head_timeout
        if self._task is None and not self._requests:
            return self._idle_since + config.http_keepalive_timeout
        request = self._parsing
        if request is not None and request.body_error is None and not self._read_paused:
            stall = request.last_body + config.http_body_timeout
            if config.http_body_min_rate:
                rate_at = max(request.body_started + config.http_body_grace, self.loop.time() + 1)
                return min(stall, rate_at)
            return stall
        return None

    def _on_timer(self) -> None:
        self._timer = None
        if self.lost or self.transport is None:
            return
        now, config = self.loop.time(), self.config
        idle = self._task is None and not self._requests
        if idle and self._head_started is not None:
            if now >= self._head_started + config.http_head_timeout:
                msg = f"no complete request head within {config.http_head_timeout:g} s"
                self._fail(RequestTimeout(msg))
                return
        elif idle:
            if now >= self._idle_since + config.http_keepalive_timeout:
                self._stopped = True
                self._close_now()
                return
        elif (
            (request := self._parsing) is not None
            and request.body_error is None
            and not self._read_paused
            and self._body_too_slow(request, now)
        ):
            return
        self._rearm()

    def _body_too_slow(self, request: FrontRequest, now: float) -> bool:
        config = self.config
        if now >= request.last_body + config.http_body_timeout:
            msg = f"the request body stalled for {config.http_body_timeout:g} s"
        elif (
            config.http_body_min_rate
            and now >= request.body_started + config.http_body_grace
            and request.received < config.http_body_min_rate * (now - request.body_started)
        ):
            msg = f"the request body is slower than {config.http_body_min_rate} bytes/s"
        else:
            return False
        self._fail(RequestTimeout(msg))
        return True

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self._paused_at = self.loop.time()
            self.transport.pause_reading()

    def _maybe_resume(self) -> None:
        if (
            self._read_paused
            and self._queued <= HIGH_WATER // 2
            and len(self._requests) <= MAX_PIPELINED
            and self.transport is not None
            and not self.lost
        ):
            self._read_paused = False
            if self._body_hold is not None:
                self._body_hold.leave()
            now = self.loop.time()
            if (request := self._parsing) is not None:  # the pause was ours, not the client's
                request.last_body = now
                request.body_started += now - self._paused_at
            self.transport.resume_reading()
            self._rearm()

    async def _wait(self) -> None:
        await self._waiter.wait()

    def _wake(self) -> None:
        self._waiter.set()
