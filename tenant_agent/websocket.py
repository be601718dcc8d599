"""The agent's WebSocket to the CSC: websockets' sans-I/O client over an asyncio transport.

The agent dials out (docs/protocol.md §1), so it is the WebSocket *client* and RFC 6455 §5.3
requires it to mask every frame it sends, and downloads (the bulk of the traffic) flow this
way. :class:`websockets.client.ClientProtocol` does the opening handshake and answers the CSC's
control frames; :meth:`AgentWebSocket.send_chunks` writes the link's
data itself: one binary frame whose payload is the given chunks, each masked while it is copied
(``apply_mask`` returns new bytes) with the one frame key rotated by the chunk's offset, and
handed to ``transport.writelines``. Each payload byte is touched once in user space, then by
the kernel; nothing joins the chunks first.

Reading: websockets is handed the upgrade response's head alone; once the upgrade succeeded,
the CSC's binary and continuation frames (all the link's messages) are read by
:meth:`AgentWebSocket._take_frames` itself, compiled with the rest of this module, and each
control frame is handed to websockets whole, at a frame boundary, so it answers pings and runs
the closing handshake as before. A frame this reader does not take (text, reserved bits or
opcodes, a masked frame, a control frame over 125 bytes) is handed to websockets with
everything after it, which then reads the rest of the connection and fails it as it would
have; a continuation of no message, a new message inside a fragmented one and a message over
``max_size`` (known from its frame's head, before its payload is buffered) fail it here the
same way, with 1002 and 1009. At most one incomplete frame is buffered.

Invariants:

* Data frames are written only while the protocol is OPEN and are always complete (FIN set),
  so the control frames the protocol emits (pong, close) may go between any two of them.
* Whatever the protocol queues (``data_to_send``) is written right after the call that queued
  it, in order; ``SEND_EOF`` closes the transport (a client only sends it once the server has
  closed, or when the upgrade failed).
* A sender awaits :meth:`AgentWebSocket.drain` while the transport is paused, so the bytes
  buffered in user space stay below the high-water mark plus one message.
* Received binary and continuation payloads are delivered in arrival order; the link is a byte
  stream, so fragmented messages need no reassembly. Reading pauses while more than
  ``RECEIVE_HIGH`` bytes wait to be received.
* :meth:`receive` returns ``None`` once the closing handshake started (either side) or the
  connection is lost; :attr:`closed` is set once the transport is gone, whatever the cause.
* The protocol logs to :data:`WIRE_LOG`, which never logs below ``info``: websockets' debug
  lines echo the handshake's headers (the token) and frames' bytes (request bodies).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import struct
from collections import deque
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, cast

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.frames import Close, CloseCode, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import SEND_EOF, State
from websockets.uri import parse_uri

try:  # the C version (websockets.utils.apply_mask is its pure-Python fallback)
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

from shared.aio import close_link
from shared.errors import CSCError, InvalidState, LinkStalled, ProtocolError
from shared.link import TLS_PIECE, Link, coalesce
from shared.randpool import random_bytes
from shared.wakeup import Wakeup
from shared.writeflow import WriteFlow
from shared.wsframe import payload_length

#: websockets' logger for our connections, held at ``info`` whatever the agent's log level.
WIRE_LOG = logging.getLogger("csc_agent.websocket")
WIRE_LOG.setLevel(logging.INFO)
#: Wait this long for the CSC to close TCP after the closing handshake, then abort.
CLOSE_TIMEOUT = 5.0
#: Pause reading while this many received bytes wait for :meth:`AgentWebSocket.receive`.
RECEIVE_HIGH = 4 * 1024 * 1024
#: Chunks shorter than this are joined before masking (fewer calls, fewer buffers).
SMALL_CHUNK = 1024
#: Close code when the connection ended without a close frame (RFC 6455 §7.1.5).
ABNORMAL_CLOSURE = 1006

#: The upgrade response's head longer than this is left to websockets (which refuses it).
MAX_RESPONSE_HEAD = 64 * 1024

_BINARY_FIN = 0x82
_MASKED = 0x80
_LEN16 = struct.Struct("!BBH")
_LEN64 = struct.Struct("!BBQ")
_PAYLOAD_OPCODES = (Opcode.BINARY, Opcode.CONT)
_OP_CONT = 0x0
_FIRST_CONTROL = 0x8
#: the longest control frame (RFC 6455 §5.5)
_MAX_CONTROL = 125
#: text and the reserved opcodes: websockets reads the stream from such a frame on
_LEFT_TO_WEBSOCKETS = frozenset({0x1, 0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF})


class HandshakeError(Exception):
    """The WebSocket upgrade failed (a bad or missing response)."""


class HandshakeRefused(HandshakeError):
    """The CSC answered the upgrade with an HTTP status other than 101."""

    def __init__(self, response: Response) -> None:
        super().__init__(f"HTTP {response.status_code} {response.reason_phrase}")
        self.status = response.status_code
        self.body = bytes(response.body)
        self.reason_phrase = response.reason_phrase
        self.retry_after: str | None = response.headers.get("Retry-After")

    @property
    def reason(self) -> str:
        """The ``message`` of the CSC's JSON error body, else the HTTP reason phrase."""
        message = self._body_field("message")
        return message if message is not None else self.reason_phrase

    @property
    def code(self) -> str | None:
        """The error code (``error``) of the CSC's JSON error body, if it has one."""
        return self._body_field("error")

    def _body_field(self, name: str) -> str | None:
        with contextlib.suppress(ValueError, RecursionError):
            body = json.loads(self.body)
            if isinstance(body, dict) and isinstance(body.get(name), str):
                return str(body[name])
        return None


def frame_header(length: int, key: bytes) -> bytes:
    """The header of one masked, final binary frame of ``length`` payload bytes."""
    if length < 126:
        return bytes((_BINARY_FIN, _MASKED | length)) + key
    if length < 65536:
        return _LEN16.pack(_BINARY_FIN, _MASKED | 126, length) + key
    return _LEN64.pack(_BINARY_FIN, _MASKED | 127, length) + key


def mask_chunks(chunks: Sequence[bytes | memoryview], key: bytes) -> list[bytes]:
    """The chunks as one payload masked with ``key`` (RFC 6455 §5.3), still in pieces.

    Byte ``i`` of the payload is XORed with ``key[i % 4]``: a chunk starting at offset ``o``
    is masked with the key rotated by ``o % 4``. Short neighbours are joined first.
    """
    keys = (key, key[1:] + key[:1], key[2:] + key[:2], key[3:] + key[:3])
    out: list[bytes] = []
    offset = 0
    for piece in coalesce(chunks, SMALL_CHUNK):
        out.append(apply_mask(piece, keys[offset & 3]))
        offset += len(piece)
    return out


class AgentWebSocket(WriteFlow, asyncio.Protocol):
    """One client WebSocket; make it with :func:`connect`."""

    def __init__(
        self, protocol: ClientProtocol, headers: Mapping[str, str], *, max_size: int
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._proto = protocol
        self._headers = headers
        self._transport: asyncio.Transport | None = None
        self._tls = False  # a TLS transport: write short pieces as one (see send_now)
        self.opened: asyncio.Future[None] = self.loop.create_future()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self._received: deque[bytes] = deque()
        self._received_size = 0
        self._receive_waiter = Wakeup(self.loop)
        self._reading_paused = False
        self._text_seen = False
        self._close_timer: asyncio.TimerHandle | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        #: the upgrade response read so far, until its head is complete (see data_received)
        self._response: bytearray | None = bytearray()
        #: after the upgrade: the CSC's data frames are read here (:meth:`_take_frames`) until
        #: one that is not binary data comes; websockets then reads everything from that frame on
        self._own_frames = False
        #: the longest message taken (``protocol`` was made with the same limit)
        self._max_size = max_size
        #: bytes of a frame not complete yet, their total, and how many complete it (0: unknown)
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._pending_need = 0
        #: a message's first frame came without FIN; its length so far
        self._fragmented = False
        self._message_size = 0

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._tls = transport.get_extra_info("ssl_object") is not None
        request = self._proto.connect()
        for name, value in self._headers.items():
            request.headers[name] = value
        self._proto.send_request(request)
        self._write_protocol_output()

    def data_received(self, data: bytes) -> None:
        if self._own_frames:
            data = self._take_frames(data)
        elif self._response is not None:
            data = self._upgrade_response(self._response, data)
        if data:
            self._protocol_receive(data)

    def _protocol_receive(self, data: bytes) -> None:
        """Let websockets parse ``data`` and act on what it made of it."""
        self._proto.receive_data(data)
        self._after_protocol()

    def _after_protocol(self) -> None:
        self._write_protocol_output()
        events = self._proto.events_received()
        self._check_handshake(events)
        for event in events:
            if isinstance(event, Frame):
                self._frame_received(event)
        if self._proto.close_expected():
            self._expect_close()
        if self._proto.state is not State.OPEN:
            self._wake_receiver()

    def _upgrade_response(self, response: bytearray, data: bytes) -> bytes:
        """Hand websockets the upgrade response's head alone (a 101 has no body), so that it
        has parsed no frame when the upgrade succeeds and :meth:`_take_frames` reads the frames
        from the first one; return what follows the head (or everything, when the upgrade
        failed or the head is not complete within ``MAX_RESPONSE_HEAD``: websockets judges it).
        """
        searched = max(len(response) - 3, 0)
        response += data
        end = response.find(b"\r\n\r\n", searched)
        if end < 0:
            if len(response) <= MAX_RESPONSE_HEAD:
                return b""
            self._response = None
            return bytes(response)
        self._response = None
        head, rest = bytes(response[: end + 4]), bytes(response[end + 4 :])
        self._protocol_receive(head)
        if self._proto.state is State.OPEN and self.opened.done():
            self._own_frames = True
            return self._take_frames(rest) if rest else b""
        return rest

    def _take_frames(self, data: bytes) -> bytes:
        """Deliver the payloads of the complete binary and continuation frames ``data`` holds
        (after what was pending); hand each control frame to websockets as it comes. Return the
        bytes from the first frame this reader leaves to websockets for good (text, reserved
        bits or opcodes, a masked frame, one over ``max_size``), which then parses everything;
        b"" when all was taken or waits for the rest of a frame."""
        if self._pending:
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size < self._pending_need:
                return b""
            data = b"".join(self._pending)
            self._pending, self._pending_size, self._pending_need = [], 0, 0
        size = len(data)
        pos = 0
        while pos < size:
            if size - pos < 2:
                return self._keep(data, pos, 0)
            first, second = data[pos], data[pos + 1]
            opcode = first & 0x0F
            length, after = payload_length(data, pos, size)
            if length < 0:
                return self._keep(data, pos, 0)
            head = after - pos
            control = opcode >= _FIRST_CONTROL
            if (
                first & 0x70
                or second & 0x80
                or opcode in _LEFT_TO_WEBSOCKETS
                or (control and length > _MAX_CONTROL)
            ):
                self._own_frames = False
                return data[pos:]
            if control:  # ping, pong, close: websockets answers them
                if size - pos < head + length:
                    return self._keep(data, pos, head + length)
                end = pos + head + length
                self._protocol_receive(data[pos:end])
                pos = end
                if self._proto.state is not State.OPEN:
                    self._own_frames = False
                    return data[pos:]
                continue
            if (opcode == _OP_CONT) != self._fragmented:
                if self._fragmented:
                    self._fail(CloseCode.PROTOCOL_ERROR, "a new message inside a fragmented one")
                else:
                    self._fail(CloseCode.PROTOCOL_ERROR, "a continuation of no message")
                return b""
            if length > self._max_size - self._message_size:
                total = self._message_size + length
                self._fail(
                    CloseCode.MESSAGE_TOO_BIG, f"message of {total} bytes over {self._max_size}"
                )
                return b""
            if size - pos < head + length:
                return self._keep(data, pos, head + length)
            start = pos + head
            pos = start + length
            self._fragmented = not first & 0x80
            self._message_size = self._message_size + length if self._fragmented else 0
            if length and not self._text_seen:
                self._deliver(data[start:pos])
        return b""

    def _keep(self, data: bytes, pos: int, need: int) -> bytes:
        """Keep the incomplete frame at ``pos`` until ``need`` bytes of it are in (0: its
        head is not complete yet, any more bytes may complete it)."""
        rest = data[pos:]
        self._pending, self._pending_size = [rest], len(rest)
        self._pending_need = need if need else len(rest) + 1
        return b""

    def _fail(self, code: CloseCode, reason: str) -> None:
        """Fail the WebSocket as websockets does for a frame it refuses: a close frame with
        ``code``, then wait for the CSC to close; websockets discards what still arrives."""
        self._own_frames = False
        self._proto.fail(code, reason)
        self._after_protocol()

    def eof_received(self) -> bool | None:
        if self._response:  # an answer that ended before its head did: websockets judges it
            self._proto.receive_data(bytes(self._response))
        self._response = None
        self._proto.receive_eof()
        self._write_protocol_output()
        self._check_handshake(())
        self._wake_receiver()
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
        if self.close_code is None:
            self.close_code = ABNORMAL_CLOSURE
        lost = ConnectionResetError("the connection to the CSC was lost")
        if not self.opened.done():
            self.opened.set_exception(exc or lost)
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake_receiver()
        self.writing_lost()

    # -- sending ------------------------------------------------------------------------------

    def send_now(self, chunks: Sequence[bytes | memoryview]) -> Awaitable[None] | None:
        """Write the chunks as one binary message (a :data:`~shared.link.SendFn`): None when the
        transport took it without pausing, else the wait for it to drain."""
        transport = self._transport
        if transport is None or transport.is_closing() or self._proto.state is not State.OPEN:
            raise ConnectionResetError("the WebSocket to the CSC is closing")
        key = random_bytes(4)
        pieces = [frame_header(sum(map(len, chunks)), key), *mask_chunks(chunks, key)]
        # over TLS every piece written is a record: short pieces go as one
        transport.writelines(coalesce(pieces, TLS_PIECE) if self._tls else pieces)
        return self.drain() if self.writing_paused else None

    async def send_chunks(self, chunks: Sequence[bytes | memoryview]) -> None:
        """Send the chunks as one binary message; wait while the transport is paused."""
        waiting = self.send_now(chunks)
        if waiting is not None:
            await waiting

    @property
    def write_buffer_size(self) -> int:
        """Bytes written but not yet taken by the kernel."""
        return 0 if self._transport is None else self._transport.get_write_buffer_size()

    async def send_bytes(self, data: bytes) -> None:
        await self.send_chunks((data,))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Run the closing handshake (at most ``CLOSE_TIMEOUT``), then drop the connection."""
        if self._proto.state is State.OPEN:
            self._proto.send_close(code, reason)
            self._write_protocol_output()
            self._expect_close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.closed), CLOSE_TIMEOUT)
        self.abort()

    def abort(self) -> None:
        if self._transport is not None and not self.closed.done():
            self._transport.abort()

    # -- receiving ----------------------------------------------------------------------------

    async def receive(self) -> bytes | None:
        """The next received payload; ``None`` once the WebSocket is closing or closed.

        Raises :class:`~shared.errors.ProtocolError` after a text message (not part of the
        protocol); the caller closes the WebSocket.
        """
        while not self._received:
            if self._text_seen:
                raise ProtocolError("text messages are not part of the protocol")
            if self._proto.state is not State.OPEN or self.closed.done():
                return None
            await self._receive_waiter.wait()
        data = self._received.popleft()
        self._received_size -= len(data)
        if self._reading_paused and self._received_size < RECEIVE_HIGH // 2:
            self._reading_paused = False
            if self._transport is not None:
                self._transport.resume_reading()
        return data

    # -- internals ----------------------------------------------------------------------------

    def _write_protocol_output(self) -> None:
        transport = self._transport
        if transport is None:
            raise InvalidState("protocol output before the connection was made")
        for data in self._proto.data_to_send():
            if data == SEND_EOF:
                transport.close()
            elif not transport.is_closing():
                transport.write(data)

    def _check_handshake(self, events: Sequence[object]) -> None:
        """Settle :attr:`opened` once the response arrived (the frames after it may already
        have closed the WebSocket) or the upgrade failed."""
        if self.opened.done():
            return
        exc = self._proto.handshake_exc
        if exc is None:
            if any(isinstance(event, Response) for event in events):
                self.opened.set_result(None)
            return
        failure: Exception
        if isinstance(exc, InvalidStatus):
            failure = HandshakeRefused(exc.response)
        else:
            failure = HandshakeError(f"the WebSocket upgrade failed: {exc}")
            failure.__cause__ = exc
        self.opened.set_exception(failure)

    def _frame_received(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode in _PAYLOAD_OPCODES:
            if frame.data and not self._text_seen:
                self._deliver(bytes(frame.data))
        elif opcode is Opcode.TEXT:
            self._text_seen = True  # receive() raises once the payloads before it are taken
            self._wake_receiver()
        elif opcode is Opcode.CLOSE:
            close = Close.parse(frame.data)
            self.close_code, self.close_reason = close.code, close.reason

    def _deliver(self, data: bytes) -> None:
        self._received.append(data)
        self._received_size += len(data)
        if self._received_size > RECEIVE_HIGH and not self._reading_paused:
            self._reading_paused = True
            if self._transport is not None:
                self._transport.pause_reading()
        self._wake_receiver()

    def _wake_receiver(self) -> None:
        self._receive_waiter.set()

    def _expect_close(self) -> None:
        if self._close_timer is None and not self.closed.done():
            self._close_timer = self.loop.call_later(CLOSE_TIMEOUT, self.abort)


async def connect(
    url: str,
    headers: Mapping[str, str],
    *,
    max_size: int,
    ssl_context: ssl.SSLContext | None = None,
) -> AgentWebSocket:
    """Open a WebSocket to ``url`` (``ws://`` or ``wss://``) with extra request ``headers``.

    Raises :class:`HandshakeRefused` for a non-101 answer, :class:`HandshakeError` for a bad
    one, ``OSError`` (including TLS verification errors) for the connection itself. The caller
    bounds the time it takes.
    """
    uri = parse_uri(url)
    protocol = ClientProtocol(uri, max_size=max_size, logger=WIRE_LOG)
    loop = asyncio.get_running_loop()
    tls: ssl.SSLContext | None = None
    if uri.secure:
        tls = ssl_context or ssl.create_default_context()
    _, ws = await loop.create_connection(
        lambda: AgentWebSocket(protocol, headers, max_size=max_size),
        uri.host,
        uri.port,
        ssl=tls,
        server_hostname=uri.host if tls is not None else None,
    )
    try:
        await ws.opened
    except BaseException:
        ws.abort()
        raise
    return ws


# -- the link over this WebSocket (the agent's counterpart of csc.relay.websocket.run_websocket) ---------


def close_reason(err: CSCError) -> str:
    """``code: message`` cut to fit a close frame (≤ 123 bytes)."""
    return f"{err.code}: {err.message}".encode()[:120].decode(errors="ignore")


async def close_for(ws: AgentWebSocket, err: CSCError) -> None:
    """Close with the error's close code and reason (a stalled link is aborted: its peer reads
    nothing, so no close frame would reach it)."""
    if isinstance(err, LinkStalled):
        ws.abort()
    await ws.close(err.spec.close_code, close_reason(err))


async def _close_when_link_ends(ws: AgentWebSocket, link: Link) -> None:
    err = await link.closed
    if not ws.closed.done():
        await close_for(ws, err)


async def run_link(ws: AgentWebSocket, link: Link) -> None:
    """Feed received payloads to the link until either side ends it; then close the link.

    The next payload is taken only once :meth:`Link.wait_readable` returns: while the CSC does
    not read the link's answers, the agent stops reading too (its receive buffer fills and
    pauses the socket), and a link closed as stalled is aborted at once."""
    watcher: asyncio.Future[Any] = asyncio.ensure_future(_close_when_link_ends(ws, link))
    try:
        await _feed(ws, link)
    except BaseException as exc:  # not `finally`: an await there (shared/compiled.py)
        await close_link(link, watcher)
        raise exc
    await close_link(link, watcher)


async def _feed(ws: AgentWebSocket, link: Link) -> None:
    try:
        while True:
            await link.wait_readable()
            if link.is_closed or (data := await ws.receive()) is None:
                return
            try:
                await link.receive(data)
            except CSCError as err:
                await close_for(ws, err)
                return
    except ProtocolError as violation:
        link.close(violation)
        await close_for(ws, violation)
