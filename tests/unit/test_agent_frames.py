"""The agent's own reading of the CSC's frames (tenant_agent/websocket.py ``_take_frames``).

After the upgrade the agent reads binary and continuation frames itself and hands every other
frame to websockets. Driven here without sockets: a websockets ``ServerProtocol`` answers the
agent's upgrade request, and the server's bytes are fed to ``data_received`` in arbitrary
pieces (the response head too), so the frame boundaries fall anywhere. What the agent writes
back is read with the same ``ServerProtocol``.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from shared.errors import ProtocolError
from tenant_agent.websocket import AgentWebSocket

MAX = 64 * 1024
BINARY, CONT, TEXT, PING, CLOSE = 0x2, 0x0, 0x1, 0x9, 0x8


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False
        self.aborted = False

    def write(self, data: Any) -> None:
        self.written += data

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, masked: bool = False, rsv: int = 0
) -> bytes:
    """One frame as a server (unmasked) or, with ``masked``, as no server may send it."""
    first = (0x80 if fin else 0) | rsv | opcode
    mask = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head = bytes((first, mask | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, mask | 126, n)
    else:
        head = struct.pack("!BBQ", first, mask | 127, n)
    return head + (b"\0\0\0\0" if masked else b"") + payload


class Rig:
    """An agent WebSocket after its upgrade request, and the server that answers it."""

    def __init__(self) -> None:
        self.transport = FakeTransport()
        protocol = ClientProtocol(parse_uri("ws://127.0.0.1:9/ws"), max_size=MAX)
        self.ws = AgentWebSocket(protocol, {}, max_size=MAX)
        self.ws.connection_made(self.transport)
        self.server = ServerProtocol()
        self.server.receive_data(bytes(self.transport.written))
        request = self.server.events_received()[0]
        self.server.send_response(self.server.accept(request))
        self.response = b"".join(self.server.data_to_send())
        del self.transport.written[:]

    def feed(self, data: bytes, cuts: list[int]) -> None:
        last = 0
        for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
            if cut > last:
                self.ws.data_received(data[last:cut])
                last = cut

    def delivered(self) -> bytes:
        out = b""
        while self.ws._received:
            out += self.ws._received.popleft()
        return out

    def frames_back(self) -> list[Frame]:
        """The frames the agent wrote, as the server reads them."""
        self.server.receive_data(bytes(self.transport.written))
        return [e for e in self.server.events_received() if isinstance(e, Frame)]


# one message: a list of fragments' payloads (one: unfragmented); or a ping's payload
message = st.lists(st.binary(max_size=300), min_size=1, max_size=3)
item = st.one_of(
    st.tuples(st.just("data"), message),
    st.tuples(st.just("big"), st.integers(126, MAX)),
    st.tuples(st.just("ping"), st.binary(max_size=125)),
)


def encode(items: list[tuple[str, Any]]) -> tuple[bytes, bytes, list[bytes]]:
    """The server's bytes, the payload bytes the agent must deliver, and the pings' payloads."""
    stream, expected, pings = b"", b"", []
    for kind, value in items:
        if kind == "ping":
            stream += frame(PING, value)
            pings.append(value)
            continue
        parts = (
            value if kind == "data" else [bytes(range(256)) * (value // 256) + b"x" * (value % 256)]
        )
        for i, part in enumerate(parts):
            stream += frame(BINARY if i == 0 else CONT, part, fin=i == len(parts) - 1)
            expected += part
    return stream, expected, pings


@settings(max_examples=150)
@given(st.lists(item, max_size=8), st.lists(st.integers(0, 1 << 20), max_size=12))
def test_payloads_arrive_whole_and_in_order_however_the_bytes_are_cut(
    items: list[tuple[str, Any]], cuts: list[int]
) -> None:
    async def run() -> None:
        rig = Rig()
        stream, expected, pings = encode(items)
        rig.feed(rig.response + stream, cuts)
        assert rig.ws.opened.done() and rig.ws.opened.exception() is None
        assert rig.delivered() == expected
        pongs = [f.data for f in rig.frames_back() if f.opcode is Opcode.PONG]
        assert pongs == pings
        assert rig.ws._own_frames  # nothing it reads made it hand the stream over

    asyncio.run(run())


def _after_upgrade(server_bytes: bytes) -> Rig:
    rig = Rig()
    rig.ws.data_received(rig.response + server_bytes)
    return rig


def _close_code(rig: Rig) -> int | None:
    closes = [Close.parse(f.data) for f in rig.frames_back() if f.opcode is Opcode.CLOSE]
    return closes[0].code if closes else None


@pytest.mark.parametrize(
    ("server_bytes", "code"),
    [
        (frame(BINARY, b"abc", masked=True), 1002),  # a server never masks
        (frame(BINARY, b"abc", rsv=0x40), 1002),  # no extension was negotiated
        (frame(0x3, b"abc"), 1002),  # a reserved opcode
        (frame(CONT, b"abc"), 1002),  # a continuation of no message
        (frame(BINARY, b"ab", fin=False) + frame(BINARY, b"c"), 1002),  # a message inside one
        (bytes((0x80 | PING, 126)) + struct.pack("!H", 200) + b"p" * 200, 1002),  # a long ping
        (frame(BINARY, b"a" * (MAX + 1)), 1009),
        (frame(BINARY, b"a" * MAX, fin=False) + frame(CONT, b"b"), 1009),  # over, in fragments
    ],
)
def test_a_frame_against_the_rules_fails_the_websocket(server_bytes: bytes, code: int) -> None:
    async def run() -> None:
        rig = _after_upgrade(frame(BINARY, b"before") + server_bytes + frame(BINARY, b"after"))
        assert rig.delivered().startswith(b"before")
        assert _close_code(rig) == code
        assert rig.ws._proto.state is not State.OPEN
        assert await rig.ws.receive() is None

    asyncio.run(run())


def test_a_long_frame_announced_is_refused_before_its_bytes_come() -> None:
    async def run() -> None:
        rig = _after_upgrade(struct.pack("!BBQ", 0x80 | BINARY, 127, 1 << 40))
        assert _close_code(rig) == 1009
        assert not rig.ws._pending  # nothing buffered for it

    asyncio.run(run())


def test_the_csc_closing_is_echoed_and_what_follows_is_dropped() -> None:
    async def run() -> None:
        close = Close(4401, "token revoked").serialize()
        rig = _after_upgrade(frame(BINARY, b"x") + frame(CLOSE, close) + frame(BINARY, b"late"))
        assert rig.delivered() == b"x"
        assert (rig.ws.close_code, rig.ws.close_reason) == (4401, "token revoked")
        assert _close_code(rig) == 4401  # the echo
        assert await rig.ws.receive() is None

    asyncio.run(run())


def test_text_ends_the_link_after_the_payloads_before_it() -> None:
    async def run() -> None:
        rig = _after_upgrade(frame(BINARY, b"x") + frame(TEXT, b"hello") + frame(BINARY, b"y"))
        assert await rig.ws.receive() == b"x"
        with pytest.raises(ProtocolError):
            await rig.ws.receive()

    asyncio.run(run())


def test_a_refused_upgrade_is_read_whole_by_websockets() -> None:
    async def run() -> None:
        rig = Rig()
        body = b'{"code": "auth_failed", "message": "token revoked"}'
        answer = (
            b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        rig.feed(answer, list(range(0, len(answer), 7)))
        exc = rig.ws.opened.exception()
        assert exc is not None and getattr(exc, "status", None) == 401
        assert not rig.ws._own_frames

    asyncio.run(run())
