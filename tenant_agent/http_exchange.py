"""One HTTP/1.1 exchange with the portal: its states, the request body's sender, the relay.

:class:`ExchangeState` is the state of the exchange that an
:class:`~tenant_agent.http_upstream.UpstreamConnection` carries; :data:`TRANSITIONS` lists every
allowed change and :func:`advance` refuses any other with :class:`~shared.errors.InvalidState`.
:class:`Exchange` runs one request and its response on one connection for the stream's
handler task: :func:`send_body` copies a streamed request body to the portal, the relay copies
the response to the :class:`RelayedStream`, :func:`drain_upload` waits for the end of an
upload the portal no longer reads.

Invariants:

* The state only moves along :data:`TRANSITIONS`: ``IDLE`` (no exchange: new or in the pool)
  -> ``AWAITING_HEAD`` (request sent) -> ``BODY`` (final head parsed) -> ``COMPLETE``, or to
  ``FAILED`` (``error`` set) from either of the middle two; only ``COMPLETE`` returns to ``IDLE``.
  A failed connection is closed, never reused.
* Request body bytes are credited back (``stream.consumed``) only after they were handed to the
  transport and the transport is not paused (docs/protocol.md §5).
* A response with a known length up to :data:`SMALL_BODY`, or one complete when its head is
  processed, goes out as head, body and FIN without yielding in between (one link message).
* A response is never ended cleanly unless it was complete: a truncated body resets the stream.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Final, Protocol

from shared.enums import FastEnum
from shared.errors import (
    CSCError,
    HeadersTooLarge,
    InvalidState,
    ProtocolError,
    UpstreamError,
    UpstreamReset,
)
from tenant_agent.http_request import Request

if TYPE_CHECKING:
    from tenant_agent.http_upstream import UpstreamConnection

log = logging.getLogger("csc_agent.upstream.exchange")

#: Responses up to this size are read whole and sent with their head.
SMALL_BODY = 64 * 1024


class ExchangeState(FastEnum):
    #: No exchange: a new connection, or one back in the pool.
    IDLE = "idle"
    #: The request head went out (its body may still be sending); no final response head yet.
    AWAITING_HEAD = "awaiting_head"
    #: The final response head was parsed; the body is arriving.
    BODY = "body"
    #: The whole response arrived (its bytes may still wait in the connection's queue).
    COMPLETE = "complete"
    #: The exchange failed (the connection's ``error``); the connection is not reused.
    FAILED = "failed"


_S = ExchangeState
TRANSITIONS: Final[dict[ExchangeState, frozenset[ExchangeState]]] = {
    _S.IDLE: frozenset({_S.AWAITING_HEAD}),
    _S.AWAITING_HEAD: frozenset({_S.BODY, _S.COMPLETE, _S.FAILED}),
    _S.BODY: frozenset({_S.COMPLETE, _S.FAILED}),
    _S.COMPLETE: frozenset({_S.IDLE}),
    _S.FAILED: frozenset(),
}
#: States in which the portal's bytes belong to the exchange.
RECEIVING: Final = frozenset({_S.AWAITING_HEAD, _S.BODY})


def advance(state: ExchangeState, new: ExchangeState) -> ExchangeState:
    """``new`` if :data:`TRANSITIONS` allows it after ``state``; else :class:`InvalidState`."""
    if new not in TRANSITIONS[state]:
        raise InvalidState(f"an exchange cannot go from {state.value} to {new.value}")
    return new


class RelayedStream(Protocol):
    """What :class:`HttpUpstream` needs of the stream it serves: a link stream
    (:class:`shared.linkstream.LinkStream`) or a request of the local/DMZ proxy
    (:class:`tenant_agent.proxy.exchange.InboundExchange`)."""

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


class Outcome(FastEnum):
    """How far :meth:`Exchange.advance` took an exchange without waiting."""

    #: Nothing more until the connection's state changes (its wake).
    WAIT = "wait"
    #: The head went to the stream and the whole body is queued on the connection.
    WHOLE = "whole"
    #: The head went to the stream; the body is still arriving, or too long to hold: copy it.
    STREAM = "stream"
    #: Answered or refused: nothing more to do on the stream.
    DONE = "done"
    #: The reused connection ended before the portal sent a byte: try a fresh connection.
    RETRY = "retry"


class Exchange:
    """One request and its response on one connection. :meth:`run` drives it in the stream's
    handler task; a caller that serves the stream by callbacks (tenant_agent/http_quick.py)
    calls :meth:`attach`, then :meth:`advance` at each wake of the connection, and
    :meth:`finish` in a task when the outcome needs one."""

    __slots__ = ("conn", "request", "request_id", "sender", "stream")

    def __init__(self, conn: UpstreamConnection, stream: RelayedStream, request: Request) -> None:
        self.conn = conn
        self.stream = stream
        self.request = request
        self.request_id = stream.info.get("request_id", "")
        self.sender: asyncio.Task[None] | None = None

    async def run(self) -> bool:
        """Relay the exchange; True when it should be retried on a fresh connection."""
        self.attach()
        try:
            while (outcome := self.advance()) is Outcome.WAIT:
                await self.conn.wait()
            retry = await self.finish(outcome)
        except CSCError:
            retry = False  # the CSC reset the stream while the response was written to it
        except BaseException as exc:  # not `finally`: an await there (shared/compiled.py)
            await self.detach()
            raise exc
        await self.detach()
        return retry

    def attach(self) -> None:
        """Send the request (its body by a task of its own when streamed) and watch the stream:
        its failure fails the exchange."""
        conn, stream = self.conn, self.stream
        conn.begin(self.request)
        if self.request.streamed:
            body = send_body(conn, stream, self.request.length)
            self.sender = asyncio.get_running_loop().create_task(body)
        stream.opened.add_done_callback(conn.stream_failed)

    async def detach(self) -> None:
        """Undo :meth:`attach` once the exchange is over (the body's sender is stopped)."""
        self.stream.opened.remove_done_callback(self.conn.stream_failed)
        sender = self.sender
        if sender is not None and not sender.done():
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)

    def advance(self) -> Outcome:
        """Take the exchange as far as it goes without waiting: the head to the stream once it
        is in (with all of a short body: a response of known length up to SMALL_BODY is awaited
        whole), or the refusal. Raises the stream's error if the CSC reset it."""
        conn, stream = self.conn, self.stream
        state = conn.state
        if state is ExchangeState.AWAITING_HEAD or (
            state is ExchangeState.BODY and conn.length is not None and conn.length <= SMALL_BODY
        ):
            return Outcome.WAIT
        if conn.error is not None:
            return Outcome.RETRY if self._refuse(conn.error) else Outcome.DONE
        try:
            stream.accept(conn.response_head())
        except HeadersTooLarge:
            conn.poisoned = True
            stream.reject(UpstreamError("the portal's response head is too large"))
            return Outcome.DONE
        return Outcome.WHOLE if conn.state is ExchangeState.COMPLETE else Outcome.STREAM

    async def finish(self, outcome: Outcome) -> bool:
        """Relay what :meth:`advance` left (``outcome`` is not WAIT); True to retry."""
        if outcome is Outcome.WHOLE:  # the whole response: head, body, FIN at once
            conn, stream = self.conn, self.stream
            if conn.chunks:
                data = conn.take_all()
                await stream.write(data)
                conn.delivered(len(data))
            stream.write_eof()
        elif outcome is Outcome.STREAM:
            await self._relay_body()
        return outcome is Outcome.RETRY

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
            elif conn.state is ExchangeState.COMPLETE:
                stream.write_eof()
                return
            else:
                await conn.wait()
