"""The CSC's side of an agent WebSocket: an ``asyncio.Protocol`` that feeds a :class:`Link`.

csc/relay/gateway.py answers the upgrade on the public listener's connection (csc/relay/http_front.py)
and switches the transport to a :class:`ServerWebSocket`. Its frames are decoded by
:class:`csc.relay.wsframes.FrameReader` as they arrive: every binary (or continuation) payload is
queued for :func:`run_websocket`, which hands it to :meth:`Link.receive` (the link is a byte
stream: fragments are never joined); pings are answered at once, a close frame is echoed and
the connection closed (the server closes TCP first, RFC 6455 §7.1.1). A message that is one
link PING, the usual message of an idle session, is answered in ``data_received`` with one
write (:meth:`Link.answer_ping`), without waking the receive loop or the link's writer, when
the receive loop waits for a payload, the link has no answers queued and the transport is not
paused; otherwise it takes the common way. A link message is sent
as one unmasked binary frame: its head and the link's chunks go to ``transport.writelines``
as they are (a message of at most ``SMALL_MESSAGE`` bytes is joined into one buffer).

Read pacing: the next payload is taken only once :meth:`Link.wait_readable` returns; while
the link's answers back up (:attr:`Link.reading_paused`) or more than ``RECEIVE_HIGH`` bytes
wait, reading from the socket is paused (``transport.pause_reading``), so the agent's sends
block in its kernel. A closing handshake takes at most ``CLOSE_TIMEOUT``, and a link closed as
stalled (:class:`~shared.errors.LinkStalled`) is aborted at once: its peer reads nothing, so
neither a close frame nor the bytes still buffered for it would ever leave.

Invariants: data frames are written whole, so control frames may go between any two; nothing
is written after a close frame; a frame-level violation (csc/relay/wsframes.py) or a text message
closes the WebSocket (1002/1009 for framing, the error's code for text) and ends the link.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from csc.relay.wsframes import (
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    Control,
    FrameError,
    FrameReader,
    close_payload,
    frame_head,
    parse_close,
)
from shared.aio import close_link
from shared.errors import CSCError, LinkStalled, ProtocolError
from shared.link import DIRECT_MAX, TLS_PIECE, Link, coalesce
from shared.protocol.heartbeat import PING_SIZE

#: How long closing the WebSocket may take before its transport is aborted.
CLOSE_TIMEOUT = 5.0
#: Pause reading while this many received payload bytes wait for the link.
RECEIVE_HIGH = 4 * 1024 * 1024
#: Messages up to this size are joined with their frame head and written as one buffer.
SMALL_MESSAGE = 16 * 1024
#: The transport's write buffer marks (a sender waits above the high one).
WRITE_HIGH, WRITE_LOW = 256 * 1024, 64 * 1024
#: Close code when the connection ended without a close frame (RFC 6455 §7.1.5).
ABNORMAL_CLOSURE = 1006
#: The WebSocket head of a message that is one link PING (its ACK is the same size).
_ACK_MESSAGE_HEAD = frame_head(PING_SIZE)

#: Drops the connection at once (the transport's ``abort``).
AbortFn = Callable[[], None]


@dataclass(slots=True)
class Traffic:
    """Bytes of WebSocket messages one session carried: from the agent and to it."""

    bytes_in: int = 0
    bytes_out: int = 0


class WebSocketLike(Protocol):
    """What :func:`run_websocket` needs of a WebSocket (tests may substitute one)."""

    @property
    def closed(self) -> bool: ...

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool: ...

    async def receive_payload(self) -> bytes | None: ...


class ServerWebSocket(asyncio.Protocol):
    """One agent's WebSocket after the 101 answer (see the module's docstring)."""

    def __init__(self, max_size: int) -> None:
        self.loop = asyncio.get_running_loop()
        self._reader = FrameReader(max_size)
        self.transport: asyncio.Transport | None = None
        self._tls = False  # a TLS transport: write short pieces as one (see send_now)
        self._payloads: deque[bytes] = deque()
        self._queued = 0
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._read_paused = self._write_paused = False
        self._link: Link | None = None
        #: message bytes from the agent (fed to the link) and to it (sent)
        self.traffic = Traffic()
        #: set once the transport is gone, whatever the cause
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self._close_sent = self._close_received = False
        self._close_timer: asyncio.TimerHandle | None = None
        #: a text message or a framing violation: raised by receive_payload once reached
        self.violation: CSCError | None = None
        #: the close code the agent sent (1006 when the connection ended without one)
        self.close_code: int | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        self._tls = transport.get_extra_info("ssl_object") is not None

    def data_received(self, data: bytes) -> None:
        if self._close_received or self.lost.done():
            return
        items = answered = 0  # messages, and those answered as lone PINGs
        try:
            for item in self._reader.feed(data):
                items += 1
                if type(item) is bytes:
                    if self._close_sent or self.violation is not None:
                        continue
                    if len(item) == PING_SIZE and self._answer_ping(item):
                        answered += 1
                        continue
                    if self._direct(len(item)):
                        self._feed_now(item)
                    else:
                        self._payloads.append(item)
                        self._queued += len(item)
                elif self._control(cast(Control, item)):
                    break
        except FrameError as err:  # fail the connection (RFC 6455 §7.1.7)
            self.violation = ProtocolError(err.reason)
            self._send_close(err.code, err.reason)
            if self.transport is not None:
                self.transport.close()
            answered = 0
        if answered and answered == items:
            return  # lone PINGs only: nothing queued, the receive loop sleeps on
        self._wake()
        link = self._link
        if not self._read_paused and (
            self._queued > RECEIVE_HIGH or (link is not None and link.reading_paused)
        ):
            self._pause(True)

    def eof_received(self) -> bool | None:
        self._wake()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
        if self.close_code is None:
            self.close_code = ABNORMAL_CLOSURE
        if not self.lost.done():
            self.lost.set_result(None)
        self._wake()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the session's side -------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """The closing handshake started (either side) or the connection is gone."""
        return self._close_sent or self._close_received or self.lost.done()

    def attach(self, link: Link) -> None:
        """From now on, pause reading while ``link``'s answers back up, and feed it short
        payloads at once while :func:`run_websocket` waits for one."""
        self._link = link

    async def receive_payload(self) -> bytes | None:
        """The next received payload; ``None`` once the WebSocket is closing or closed.

        Raises the violation (a text message, broken framing) once the payloads before it
        are taken; the caller ends the link."""
        while not self._payloads:
            if self.violation is not None:
                raise self.violation
            if self.closed or (self._link is not None and self._link.is_closed):
                return None
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._payloads.popleft()
        self._queued -= len(data)
        if self._read_paused and self._queued <= RECEIVE_HIGH // 2:
            link = self._link
            if link is None or not link.reading_paused:
                self._pause(False)
        return data

    def send_now(self, chunks: Sequence[bytes | memoryview]) -> Awaitable[None] | None:
        """Write the chunks as one binary message (a :data:`~shared.link.SendFn`): None when the
        transport took it without pausing, else the wait for it to drain."""
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            raise ConnectionResetError("the agent's WebSocket is closing")
        size = sum(map(len, chunks))
        self.traffic.bytes_out += size
        if size <= SMALL_MESSAGE:  # one short buffer: cheaper than a vector of pieces
            transport.write(b"".join((frame_head(size), *chunks)))
        else:  # over TLS every piece written is a record: short pieces go as one
            pieces = [frame_head(size), *chunks]
            transport.writelines(coalesce(pieces, TLS_PIECE) if self._tls else pieces)
        if self._write_paused or self.lost.done():
            return self._drained()
        return None

    async def send_chunks(self, chunks: Sequence[bytes | memoryview]) -> None:
        """Send the chunks as one binary message; wait while the transport is paused."""
        waiting = self.send_now(chunks)
        if waiting is not None:
            await waiting

    async def _drained(self) -> None:
        while self._write_paused and not self.lost.done():
            self._drain_waiter = self.loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
        if self.lost.done():
            raise ConnectionResetError("the agent's WebSocket is gone")

    async def send_bytes(self, data: bytes) -> None:
        await self.send_chunks((data,))

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool:
        """Run the closing handshake (the agent's close frame, then TCP closed by us), at most
        ``CLOSE_TIMEOUT``; then the connection is dropped. True if this call started it."""
        started = not self._close_sent and not self._close_received
        if started:
            self._send_close(code, message.decode(errors="ignore"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.lost), CLOSE_TIMEOUT)
        self.abort()
        return started

    def abort(self) -> None:
        if self.transport is not None and not self.lost.done():
            self.transport.abort()

    # -- internals ----------------------------------------------------------------------------

    def _direct(self, size: int) -> bool:
        """Whether a payload may go to the link now: the receive loop waits for one (so it
        passed ``wait_readable``, and nothing is queued before it), the link reads, and it is
        short enough for one piece."""
        link = self._link
        return (
            self._waiter is not None
            and size <= DIRECT_MAX
            and link is not None
            and not link.reading_paused
            and not link.is_closed
            and not self._payloads
        )

    def _answer_ping(self, data: bytes) -> bool:
        """The heartbeat's short way: a message that is one link PING, arriving while the
        receive loop waits for a payload (everything before it was fed), is answered here
        with one write when the transport takes it at once (not paused); True if it was."""
        link, transport = self._link, self.transport
        if (
            self._waiter is None
            or link is None
            or transport is None
            or self._write_paused
            or self._payloads
            or transport.is_closing()
        ):
            return False
        ack = link.answer_ping(data)
        if ack is None:
            return False
        self.traffic.bytes_in += len(data)
        self.traffic.bytes_out += len(ack)
        transport.write(_ACK_MESSAGE_HEAD + ack)
        return True

    def _feed_now(self, data: bytes) -> None:
        """Feed a short payload here (``Link.receive_now``); a link-level fault closes the link,
        whose watcher closes the WebSocket."""
        link = self._link
        assert link is not None
        self.traffic.bytes_in += len(data)
        try:
            link.receive_now(data)
        except CSCError:
            self._wake()  # the receive loop sees the link closed

    def _control(self, frame: Control) -> bool:
        """Answer a control frame; True when nothing after it is to be read."""
        transport = self.transport
        if frame.opcode == OP_PING:
            if transport is not None and not self._close_sent and not transport.is_closing():
                transport.writelines([frame_head(len(frame.payload), 0xA), frame.payload])
        elif frame.opcode == OP_CLOSE:
            self._close_received = True
            self.close_code, reason = parse_close(frame.payload)
            if not self._close_sent:  # echo the agent's code (RFC 6455 §5.5.1)
                code = self.close_code if self.close_code != 1005 else 1000
                self._send_close(code, reason)
            if transport is not None:
                transport.close()  # the server closes TCP first
            return True
        elif frame.opcode == OP_TEXT and self.violation is None:
            self.violation = ProtocolError("text messages are not part of the protocol")
        return False

    def _send_close(self, code: int, reason: str) -> None:
        transport = self.transport
        if self._close_sent or transport is None or transport.is_closing():
            return
        self._close_sent = True
        payload = close_payload(code, reason)
        transport.writelines([frame_head(len(payload), OP_CLOSE), payload])
        if self._close_timer is None and not self.lost.done():
            self._close_timer = self.loop.call_later(CLOSE_TIMEOUT, self.abort)
        self._pause(False)  # keep reading: the agent's close frame ends the handshake

    def _pause(self, paused: bool) -> None:
        transport = self.transport
        if paused == self._read_paused or transport is None or self.lost.done():
            return
        self._read_paused = paused
        if paused:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


async def close_websocket(ws: WebSocketLike, err: CSCError, abort: AbortFn | None = None) -> None:
    """Close with the error's close code and ``code: message`` as the reason (≤ 123 bytes).

    With ``abort``: a stalled link is aborted first, and a closing handshake that takes longer
    than ``CLOSE_TIMEOUT`` (or is cancelled) ends with an abort too.
    """
    reason = f"{err.code}: {err.message}".encode()[:120]
    if abort is not None and isinstance(err, LinkStalled):
        abort()
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await ws.close(code=err.spec.close_code, message=reason)
    except asyncio.CancelledError:
        if abort is not None:
            abort()
        raise
    except Exception:
        if abort is not None:
            abort()


async def _close_when_link_ends(ws: WebSocketLike, link: Link, abort: AbortFn | None) -> None:
    err = await link.closed
    if not ws.closed:
        await close_websocket(ws, err, abort)


async def run_websocket(
    ws: WebSocketLike,
    link: Link,
    traffic: Traffic | None = None,
    abort: AbortFn | None = None,
) -> None:
    """Feed received payloads to the link until either side ends it; then close the link.

    ``abort`` drops the connection (see :func:`close_websocket`)."""
    watcher = asyncio.ensure_future(_close_when_link_ends(ws, link, abort))
    counted = traffic if traffic is not None else Traffic()
    try:
        await _feed(ws, link, counted, abort)
    except BaseException as exc:  # not `finally`: an await there (shared/compiled.py)
        await close_link(link, watcher)
        raise exc
    await close_link(link, watcher)


async def _feed(ws: WebSocketLike, link: Link, counted: Traffic, abort: AbortFn | None) -> None:
    try:
        while True:
            await link.wait_readable()
            if link.is_closed:
                return
            data = await ws.receive_payload()
            if data is None:
                return
            counted.bytes_in += len(data)
            try:
                await link.receive(data)
            except CSCError as err:
                await close_websocket(ws, err, abort)
                return
    except ProtocolError as violation:
        link.close(violation)
        await close_websocket(ws, violation, abort)
