"""The agent's WebSocket to the CSC: websockets' sans-I/O client over an asyncio transport.

The agent dials out (docs/protocol.md §1), so it is the WebSocket *client* and RFC 6455 §5.3
requires it to mask every frame it sends, and downloads (the bulk of the traffic) flow this
way. :class:`websockets.client.ClientProtocol` does the opening handshake, parses the CSC's
frames and answers its control frames; :meth:`AgentWebSocket.send_chunks` writes the link's
data itself: one binary frame whose payload is the given chunks, each masked while it is copied
(``apply_mask`` returns new bytes) with the one frame key rotated by the chunk's offset, and
handed to ``transport.writelines``. Each payload byte is touched once in user space, then by
the kernel; nothing joins the chunks first.

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
import os
import ssl
import struct
from collections import deque
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, cast

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import SEND_EOF, State
from websockets.uri import parse_uri

try:  # the C version (websockets.utils.apply_mask is its pure-Python fallback)
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

from shared.errors import CSCError, InvalidState, LinkStalled, ProtocolError
from shared.link import TLS_PIECE, Link, coalesce
from shared.wakeup import Wakeup
from tenant_agent.writeflow import WriteFlow

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

_BINARY_FIN = 0x82
_MASKED = 0x80
_LEN16 = struct.Struct("!BBH")
_LEN64 = struct.Struct("!BBQ")
_PAYLOAD_OPCODES = (Opcode.BINARY, Opcode.CONT)


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
        with contextlib.suppress(ValueError, RecursionError):
            body = json.loads(self.body)
            if isinstance(body, dict) and isinstance(body.get("message"), str):
                return str(body["message"])
        return self.reason_phrase


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

    def __init__(self, protocol: ClientProtocol, headers: Mapping[str, str]) -> None:
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
        self._proto.receive_data(data)
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

    def eof_received(self) -> bool | None:
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
        key = os.urandom(4)
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
        lambda: AgentWebSocket(protocol, headers),
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
        while True:
            await link.wait_readable()
            if link.is_closed or (data := await ws.receive()) is None:
                break
            try:
                await link.receive(data)
            except CSCError as err:
                await close_for(ws, err)
                return
    except ProtocolError as violation:
        link.close(violation)
        await close_for(ws, violation)
    finally:
        link.close()
        with contextlib.suppress(Exception):  # it closes the WebSocket (bounded) or sees it closed
            await watcher
