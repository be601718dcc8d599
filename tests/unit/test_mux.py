"""Stream multiplexer of the agent link (docs/protocol.md §3-§7), driven by a two-peer harness.

The harness pumps each side's ``data_to_send()`` into the other's ``receive_data()`` with a fake
clock: one *step* collects what both sides queued, advances the clock by the one-way latency and
delivers, so a round trip takes exactly ``2 * latency``. Nothing here uses an event loop.
"""

from __future__ import annotations

import contextlib
import struct
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    precondition,
    rule,
)

from shared.errors import (
    ERRORS,
    CSCError,
    FrameTooLarge,
    GoingAway,
    HeartbeatTimeout,
    InvalidState,
    ProtocolError,
    TooManyStreams,
    VersionUnsupported,
)
from shared.protocol import (
    VERSION,
    ClusterChanged,
    Connection,
    DataReceived,
    Event,
    Fault,
    Frame,
    FrameDecoder,
    FrameType,
    GoAwayReceived,
    HelloReceived,
    LinkSettings,
    LinkState,
    PongReceived,
    SendCreditAvailable,
    Side,
    StreamAccepted,
    StreamEnded,
    StreamInput,
    StreamOpened,
    StreamRejected,
    StreamReset,
    StreamState,
    WelcomeReceived,
    encode_frame,
)
from shared.protocol.codec import FLAG_ACK, FLAG_FIN, HARD_MAX_PAYLOAD, encode_json, encode_u32
from shared.protocol.stream_state import transition
from shared.protocol.windows import GrowthPool

KiB = 1024
MiB = 1024 * KiB
HELLO_INFO: dict[str, Any] = {
    "agent": {"name": "csc-agent", "version": "0.1.0"},
    "aliases": ["acme@example.com"],
}
WELCOME_INFO: dict[str, Any] = {
    "session_id": "3f2a",
    "node": "csc-1",
    "aliases": ["acme@example.com"],
    "heartbeat_interval": 10.0,
}
HTTP_OPEN: dict[str, Any] = {
    "alias": "acme@example.com",
    "kind": "http",
    "client": "198.51.100.7:50312",
    "request_id": "r-1",
    "method": "GET",
    "target": "/enrol?x=1",
    "headers": [["Host", "portal.acme"], ["Accept", "*/*"]],
}
HTTP_OK: dict[str, Any] = {"status": 200, "reason": "OK", "headers": [["Content-Length", "5"]]}


def decode_all(chunks: list[bytes | memoryview]) -> list[Frame]:
    return FrameDecoder(HARD_MAX_PAYLOAD).feed(b"".join(chunks))


def frame(ftype: int, sid: int = 0, payload: bytes = b"", flags: int = 0) -> bytes:
    return encode_frame(ftype, flags, sid, payload)


def jframe(ftype: int, sid: int, obj: dict[str, Any]) -> bytes:
    return encode_frame(ftype, 0, sid, encode_json(obj))


class Pair:
    """A client (the agent, accepts streams) and a server (the CSC, opens them) on a fake link."""

    def __init__(
        self,
        client_settings: LinkSettings | None = None,
        server_settings: LinkSettings | None = None,
        *,
        latency: float = 0.0,
    ) -> None:
        self.now = 1000.0
        self.latency = latency
        self.client = Connection(
            Side.CLIENT, client_settings or LinkSettings(), accept_streams=True, now=self.now
        )
        self.server = Connection(
            Side.SERVER, server_settings or LinkSettings(), accept_streams=False, now=self.now
        )
        self.client_events: list[Event] = []
        self.server_events: list[Event] = []

    def step(self) -> bool:
        c_out = b"".join(self.client.data_to_send())
        s_out = b"".join(self.server.data_to_send())
        if not c_out and not s_out:
            return False
        self.now += self.latency
        if c_out:
            self.server.receive_data(c_out, self.now)
        if s_out:
            self.client.receive_data(s_out, self.now)
        self.client_events += self.client.events()
        self.server_events += self.server.events()
        return True

    def pump(self, limit: int = 10_000) -> None:
        for _ in range(limit):
            if not self.step():
                return
        raise AssertionError("the link never went quiet")

    def take(self, side: Connection) -> list[Event]:
        if side is self.client:
            events, self.client_events = self.client_events, []
        else:
            events, self.server_events = self.server_events, []
        return events

    def handshake(self) -> None:
        self.client.send_hello(HELLO_INFO)
        self.step()
        assert self.take(self.server) == [HelloReceived(self.hello_seen())]
        self.server.send_welcome(WELCOME_INFO, self.now)
        self.pump()

    def hello_seen(self) -> dict[str, Any]:
        client = self.client.settings
        return {**HELLO_INFO, "version": client.version, "settings": client.to_wire()}

    def open(self, info: dict[str, Any] | None = None, *, accept: bool = True) -> int:
        sid = self.server.open_stream(info or HTTP_OPEN)
        self.pump()
        if accept:
            self.client.accept_stream(sid, HTTP_OK)
            self.pump()
        self.take(self.client)
        self.take(self.server)
        return sid

    def inject(self, side: Connection, data: bytes) -> tuple[list[Event], list[Frame]]:
        """Feed raw bytes to one side as if from its peer; return what it reported and sent."""
        side.receive_data(data, self.now)
        return side.events(), decode_all(side.data_to_send())


def of_type(events: list[Event], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


@pytest.fixture
def pair() -> Pair:
    p = Pair(latency=0.01)
    p.handshake()
    p.take(p.client)
    p.take(p.server)
    return p


# -- handshake -----------------------------------------------------------------------------------


def test_handshake_exchanges_info_and_opens_both_sides() -> None:
    p = Pair(latency=0.01)
    p.client.send_hello(HELLO_INFO)
    (hello,) = decode_all(p.client.data_to_send())
    assert (hello.type, hello.flags, hello.stream_id) == (FrameType.HELLO, 0, 0)
    p.server.receive_data(encode_frame(FrameType.HELLO, 0, 0, bytes(hello.payload)), p.now)
    (event,) = p.server.events()
    assert isinstance(event, HelloReceived)
    assert event.info["agent"] == HELLO_INFO["agent"]
    assert event.info["aliases"] == ["acme@example.com"]
    assert event.info["version"] == "1.2"
    assert event.info["settings"] == {
        "initial_window": 256 * KiB,
        "max_frame": 256 * KiB,
        "max_streams": 1024,
    }
    assert p.server.state.value == "handshake"
    p.server.send_welcome(WELCOME_INFO, p.now)
    assert p.server.state.value == "open"
    frames = decode_all(p.server.data_to_send())
    assert [f.type for f in frames] == [FrameType.WELCOME, FrameType.PING]
    p.client.receive_data(
        b"".join(encode_frame(f.type, f.flags, 0, bytes(f.payload)) for f in frames), p.now
    )
    welcome = of_type(p.client.events(), WelcomeReceived)[0]
    assert welcome.info["session_id"] == "3f2a"
    assert welcome.info["heartbeat_interval"] == 10.0
    assert p.client.state is LinkState.OPEN
    assert p.client.peer is not None and p.client.peer.initial_window == 256 * KiB


def test_handshake_measures_rtt_on_both_sides() -> None:
    p = Pair(latency=0.025)
    p.handshake()
    assert p.server.rtt == pytest.approx(0.05)
    assert p.client.rtt == pytest.approx(0.05)
    for side in (p.server, p.client):
        assert [e.rtt for e in of_type(p.take(side), PongReceived)] == [pytest.approx(0.05)]


def hello_with(version: Any = VERSION, **settings: Any) -> bytes:
    wire = {"initial_window": 65536, "max_frame": 65536, "max_streams": 10, **settings}
    obj: dict[str, Any] = {"settings": wire, "agent": {"name": "x", "version": "9"}}
    if version is not None:
        obj["version"] = version
    return jframe(FrameType.HELLO, 0, obj)


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.99", "1"])
def test_same_major_any_minor_is_accepted(version: str) -> None:
    server = Connection(Side.SERVER, LinkSettings(), accept_streams=False, now=0.0)
    server.receive_data(hello_with(version), 0.0)
    assert isinstance(server.events()[0], HelloReceived)
    assert server.peer is not None and server.peer.max_streams == 10


@pytest.mark.parametrize("version", ["2.0", "0.9", "10.0", "", "v1.0", "01.0"])
def test_other_major_is_refused_with_version_unsupported(version: str) -> None:
    server = Connection(Side.SERVER, LinkSettings(), accept_streams=False, now=0.0)
    with pytest.raises(VersionUnsupported, match="please update") as info:
        server.receive_data(hello_with(version), 0.0)
    assert info.value.spec.close_code == 4426
    assert server.state is LinkState.CLOSED


def test_client_refuses_welcome_of_other_major() -> None:
    p = Pair()
    p.client.send_hello(HELLO_INFO)
    p.client.data_to_send()
    welcome = {"version": "2.0", "settings": LinkSettings().to_wire(), **WELCOME_INFO}
    with pytest.raises(VersionUnsupported):
        p.client.receive_data(jframe(FrameType.WELCOME, 0, welcome), p.now)


def test_frame_header_of_other_major_is_refused() -> None:
    server = Connection(Side.SERVER, LinkSettings(), accept_streams=False, now=0.0)
    with pytest.raises(VersionUnsupported):
        server.receive_data(b"\x02" + hello_with()[1:], 0.0)


@pytest.mark.parametrize(
    "hello",
    [
        hello_with(None),
        hello_with(1.0),
        jframe(FrameType.HELLO, 0, {"version": "1.0"}),
        jframe(FrameType.HELLO, 0, {"version": "1.0", "settings": [1]}),
        hello_with(initial_window=10),
        hello_with(initial_window=2**31),
        hello_with(initial_window=True),
        hello_with(max_frame=1024),
        hello_with(max_frame=HARD_MAX_PAYLOAD + 1),
        hello_with(max_streams=0),
        hello_with(max_streams="10"),
        frame(FrameType.HELLO, 0, b"[]"),
        frame(FrameType.HELLO, 0, b"\xff"),
        frame(FrameType.OPEN, 1, b"{}"),
        frame(FrameType.PING, 0, b"12345678"),
        frame(FrameType.WELCOME, 0, b"{}"),
        frame(99, 0, b""),
    ],
)
def test_bad_hello_is_a_protocol_error(hello: bytes) -> None:
    server = Connection(Side.SERVER, LinkSettings(), accept_streams=False, now=0.0)
    with pytest.raises(ProtocolError):
        server.receive_data(hello, 0.0)
    assert server.state is LinkState.CLOSED
    server.receive_data(hello_with(), 1.0)  # a closed link ignores everything
    assert server.events() == []


def test_client_answers_ping_before_welcome() -> None:
    client = Connection(Side.CLIENT, LinkSettings(), accept_streams=True, now=0.0)
    client.send_hello(HELLO_INFO)
    client.data_to_send()
    client.receive_data(frame(FrameType.PING, 0, b"abcdefgh"), 0.0)
    (pong,) = decode_all(client.data_to_send())
    assert (pong.type, pong.flags, bytes(pong.payload)) == (FrameType.PING, FLAG_ACK, b"abcdefgh")


def test_client_refuses_anything_but_welcome_during_handshake() -> None:
    client = Connection(Side.CLIENT, LinkSettings(), accept_streams=True, now=0.0)
    client.send_hello(HELLO_INFO)
    with pytest.raises(ProtocolError, match="expected WELCOME"):
        client.receive_data(jframe(FrameType.OPEN, 2, HTTP_OPEN), 0.0)


def test_commands_before_the_handshake_are_local_misuse() -> None:
    p = Pair()
    with pytest.raises(InvalidState, match="not open"):
        p.server.open_stream(HTTP_OPEN)
    with pytest.raises(InvalidState):
        p.server.send_hello(HELLO_INFO)  # the server never sends HELLO
    with pytest.raises(InvalidState):
        p.server.send_welcome(WELCOME_INFO, p.now)  # not before HELLO
    assert not issubclass(InvalidState, CSCError)


def test_commands_on_a_closed_link_are_refused() -> None:
    p = Pair()
    p.handshake()
    p.server.close()
    with pytest.raises(ProtocolError, match="not open"):
        p.server.open_stream(HTTP_OPEN)


@pytest.mark.parametrize("ftype", [FrameType.HELLO, FrameType.WELCOME])
def test_second_handshake_frame_is_a_link_error(pair: Pair, ftype: FrameType) -> None:
    for side in (pair.client, pair.server):
        payload = {"version": VERSION, "settings": LinkSettings().to_wire()}
        with pytest.raises(ProtocolError, match="after the handshake"):
            side.receive_data(jframe(ftype, 0, payload), pair.now)


@pytest.mark.parametrize("sid", [0, 2, 3, 1000])
def test_unknown_frame_type_is_ignored(pair: Pair, sid: int) -> None:
    sid_ = pair.open()
    for side in (pair.client, pair.server):
        events, frames = pair.inject(side, frame(42, sid, b"future", flags=0xFF))
        assert (events, frames) == ([], [])
        assert side.state is LinkState.OPEN
    pair.server.send_data(sid_, b"still works")
    pair.pump()
    assert of_type(pair.take(pair.client), DataReceived) == [DataReceived(sid_, b"still works")]


# -- open / accept / reject ------------------------------------------------------------------------


def test_open_accept_and_exact_open_frame() -> None:
    # A 1.0 side on the link: heads are JSON both ways (docs/protocol.md §6, §6.1).
    pair = Pair(latency=0.01, server_settings=LinkSettings(protocol_minor=0))
    pair.handshake()
    assert not pair.client.binary_heads and not pair.server.binary_heads
    sid = pair.server.open_stream(HTTP_OPEN)
    assert sid == 2
    (open_frame,) = decode_all(pair.server.data_to_send())
    assert (open_frame.type, open_frame.flags, open_frame.stream_id) == (FrameType.OPEN, 0, 2)
    assert bytes(open_frame.payload) == encode_json(HTTP_OPEN)
    pair.client.receive_data(frame(FrameType.OPEN, 2, bytes(open_frame.payload)), pair.now)
    assert pair.client.events() == [StreamOpened(2, HTTP_OPEN)]
    assert pair.client.send_credit(2) == 0  # not accepted yet: nothing may be sent
    pair.client.accept_stream(2, HTTP_OK)
    (ok_frame,) = decode_all(pair.client.data_to_send())
    assert (ok_frame.flags, bytes(ok_frame.payload)) == (0, encode_json(HTTP_OK))
    pair.server.receive_data(frame(FrameType.OPEN_OK, 2, bytes(ok_frame.payload)), pair.now)
    assert pair.server.events() == [StreamAccepted(2, HTTP_OK)]
    assert pair.client.send_credit(2) == 256 * KiB
    assert pair.server.send_credit(2) == 256 * KiB


def test_server_stream_ids_are_even_and_increasing(pair: Pair) -> None:
    assert [pair.server.open_stream(HTTP_OPEN) for _ in range(4)] == [2, 4, 6, 8]
    pair.pump()
    assert [e.stream_id for e in of_type(pair.take(pair.client), StreamOpened)] == [2, 4, 6, 8]
    assert pair.client.active_streams == 4


def test_accept_twice_own_or_unknown_is_local_misuse(pair: Pair) -> None:
    sid = pair.open()
    with pytest.raises(InvalidState, match="open"):
        pair.client.accept_stream(sid, HTTP_OK)
    with pytest.raises(InvalidState, match="idle"):
        pair.client.accept_stream(99, HTTP_OK)
    with pytest.raises(InvalidState):
        pair.server.accept_stream(sid, HTTP_OK)  # own stream: nothing to accept
    assert not pair.client.has_output and not pair.server.has_output


def test_commands_on_a_stream_that_is_gone_are_no_ops(pair: Pair) -> None:
    sid = pair.open(accept=False)
    pair.server.reset_stream(sid, "cancelled")
    pair.pump()
    pair.client.accept_stream(sid, HTTP_OK)  # raced with the peer's RST
    pair.client.reject_stream(sid, "internal", "")
    pair.client.reset_stream(sid, "internal")
    pair.client.send_fin(sid)
    assert pair.client.send_data(sid, b"x") == 0
    assert not pair.client.has_output


def test_reject(pair: Pair) -> None:
    sid = pair.open(accept=False)
    pair.client.reject_stream(sid, "upstream_refused", "connection refused")
    assert sid not in pair.client.streams
    pair.pump()
    assert pair.take(pair.server) == [StreamRejected(sid, "upstream_refused", "connection refused")]
    assert sid not in pair.server.streams
    assert pair.server.window_total == pair.client.window_total == 0


def test_reject_after_accept_is_local_misuse(pair: Pair) -> None:
    sid = pair.open()
    with pytest.raises(InvalidState):
        pair.client.reject_stream(sid, "internal", "")
    assert not pair.client.has_output
    assert sid in pair.client.streams


def test_open_fail_message_is_truncated_on_receipt(pair: Pair) -> None:
    sid = pair.open(accept=False)
    payload = {"code": "upstream_error", "message": "x" * 5000}
    events, _ = pair.inject(pair.server, jframe(FrameType.OPEN_FAIL, sid, payload))
    assert events == [StreamRejected(sid, "upstream_error", "x" * 1000)]


def test_too_many_streams_local_limit_comes_from_peer_settings() -> None:
    p = Pair(client_settings=LinkSettings(max_streams=2))
    p.handshake()
    p.server.open_stream(HTTP_OPEN)
    p.server.open_stream(HTTP_OPEN)
    with pytest.raises(TooManyStreams):
        p.server.open_stream(HTTP_OPEN)


def test_remote_open_beyond_own_limit_gets_open_fail() -> None:
    p = Pair(client_settings=LinkSettings(max_streams=1))
    p.handshake()
    p.take(p.server)
    events, frames = p.inject(p.client, jframe(FrameType.OPEN, 2, HTTP_OPEN))
    assert events == [StreamOpened(2, HTTP_OPEN)]
    events, frames = p.inject(p.client, jframe(FrameType.OPEN, 4, HTTP_OPEN))
    assert events == []
    assert [(f.type, f.stream_id) for f in frames] == [(FrameType.OPEN_FAIL, 4)]
    assert bytes(frames[0].payload) == b'{"code":"too_many_streams","message":"stream limit"}'
    # the peer's early DATA for the refused stream is ignored, not a link error
    assert p.inject(p.client, frame(FrameType.DATA, 4, b"body")) == ([], [])


@pytest.mark.parametrize(
    ("side", "data", "match"),
    [
        ("client", jframe(FrameType.OPEN, 3, HTTP_OPEN), "invalid stream id"),  # wrong parity
        ("server", jframe(FrameType.OPEN, 2, HTTP_OPEN), "invalid stream id"),
        ("server", jframe(FrameType.OPEN, 1, HTTP_OPEN), "does not accept"),
        ("client", frame(FrameType.OPEN, 2, b"[]"), "JSON object"),
    ],
)
def test_bad_open_is_a_link_error(pair: Pair, side: str, data: bytes, match: str) -> None:
    conn = pair.client if side == "client" else pair.server
    with pytest.raises(ProtocolError, match=match):
        conn.receive_data(data, pair.now)
    assert conn.state is LinkState.CLOSED


def test_reused_or_decreasing_remote_id_is_a_link_error(pair: Pair) -> None:
    pair.inject(pair.client, jframe(FrameType.OPEN, 6, HTTP_OPEN))
    with pytest.raises(ProtocolError, match="invalid stream id 4"):
        pair.client.receive_data(jframe(FrameType.OPEN, 4, HTTP_OPEN), pair.now)


# -- data, FIN, RST ------------------------------------------------------------------------------


def test_data_both_ways_with_exact_frames(pair: Pair) -> None:
    sid = pair.open()
    assert pair.server.send_data(sid, b"request body") == 12
    (data,) = decode_all(pair.server.data_to_send())
    assert (data.type, data.flags, data.stream_id, bytes(data.payload)) == (
        FrameType.DATA,
        0,
        sid,
        b"request body",
    )
    pair.client.receive_data(frame(FrameType.DATA, sid, b"request body"), pair.now)
    assert pair.client.events() == [DataReceived(sid, b"request body")]
    assert pair.client.streams[sid].recv_buffered == 12
    assert pair.client.send_data(sid, b"hello", fin=True) == 5
    pair.pump()
    assert pair.take(pair.server) == [DataReceived(sid, b"hello"), StreamEnded(sid)]


def test_data_is_split_at_the_peers_max_frame() -> None:
    p = Pair(client_settings=LinkSettings(max_frame=16 * KiB))
    p.handshake()
    sid = p.open()
    assert p.server.send_data(sid, b"x" * (40 * KiB), fin=True) == 40 * KiB
    frames = decode_all(p.server.data_to_send())
    assert [len(f.payload) for f in frames] == [16 * KiB, 16 * KiB, 8 * KiB]
    assert [f.flags for f in frames] == [0, 0, FLAG_FIN]


def test_empty_data_with_fin_needs_no_credit(pair: Pair) -> None:
    sid = pair.open()
    pair.server.send_data(sid, b"x" * (256 * KiB))
    pair.server.data_to_send()
    assert pair.server.send_credit(sid) == 0
    assert pair.server.send_data(sid, b"", fin=True) == 0
    (fin,) = decode_all(pair.server.data_to_send())
    assert (fin.type, fin.flags, len(fin.payload)) == (FrameType.DATA, FLAG_FIN, 0)
    assert pair.server.streams[sid].local_fin


def test_partial_send_does_not_set_fin(pair: Pair) -> None:
    sid = pair.open()
    assert pair.server.send_data(sid, b"x" * (300 * KiB), fin=True) == 256 * KiB
    assert all(f.flags == 0 for f in decode_all(pair.server.data_to_send()))
    assert not pair.server.streams[sid].local_fin


def test_fin_half_close_server_then_client(pair: Pair) -> None:
    sid = pair.open()
    pair.server.send_fin(sid)
    (fin,) = decode_all(pair.server.data_to_send())
    assert (fin.type, fin.stream_id, bytes(fin.payload)) == (FrameType.FIN, sid, b"")
    pair.client.receive_data(frame(FrameType.FIN, sid), pair.now)
    assert pair.client.events() == [StreamEnded(sid)]
    assert pair.server.send_data(sid, b"more") == 0  # own half closed
    pair.server.send_fin(sid)  # idempotent
    assert not pair.server.has_output
    # the other direction still flows
    assert pair.client.send_data(sid, b"response") == 8
    pair.pump()
    assert pair.take(pair.server) == [DataReceived(sid, b"response")]
    pair.client.send_fin(sid)
    pair.pump()
    assert pair.take(pair.server) == [StreamEnded(sid)]
    assert sid not in pair.server.streams and sid not in pair.client.streams
    assert pair.server.window_total == pair.client.window_total == 0


def test_fin_half_close_client_then_server(pair: Pair) -> None:
    sid = pair.open()
    pair.client.send_data(sid, b"early response", fin=True)
    pair.pump()
    assert pair.take(pair.server) == [DataReceived(sid, b"early response"), StreamEnded(sid)]
    assert pair.server.send_data(sid, b"rest of the body") == 16
    pair.server.send_fin(sid)
    pair.pump()
    assert pair.take(pair.client) == [DataReceived(sid, b"rest of the body"), StreamEnded(sid)]
    assert not pair.server.streams and not pair.client.streams


def test_rst_from_either_side(pair: Pair) -> None:
    a, b = pair.open(), pair.open()
    pair.server.reset_stream(a, "cancelled", "client went away")
    (rst,) = decode_all(pair.server.data_to_send())
    assert bytes(rst.payload) == b'{"code":"cancelled","message":"client went away"}'
    pair.client.receive_data(frame(FrameType.RST, a, bytes(rst.payload)), pair.now)
    assert pair.client.events() == [StreamReset(a, "cancelled", "client went away", remote=True)]
    assert pair.client.send_data(a, b"late") == 0
    pair.client.reset_stream(b, "upstream_reset", "")
    pair.pump()
    assert pair.take(pair.server) == [StreamReset(b, "upstream_reset", "", remote=True)]
    assert pair.server.active_streams == pair.client.active_streams == 0
    pair.server.reset_stream(b, "internal")  # already gone: nothing
    assert not pair.server.has_output


def test_frames_in_flight_after_rst_are_ignored(pair: Pair) -> None:
    sid = pair.open()
    pair.client.send_data(sid, b"in flight", fin=True)
    pair.server.reset_stream(sid, "cancelled")
    pair.pump()  # both cross on the wire
    assert pair.take(pair.server) == []
    assert pair.take(pair.client) == [StreamReset(sid, "cancelled", "", remote=True)]
    for ftype in (FrameType.DATA, FrameType.WINDOW, FrameType.FIN, FrameType.RST):
        payload = {FrameType.WINDOW: encode_u32(5), FrameType.RST: b"{}"}.get(ftype, b"")
        assert pair.inject(pair.server, frame(ftype, sid, payload)) == ([], [])


def test_error_payloads_are_bounded_so_they_fit_a_frame() -> None:
    p = Pair(client_settings=LinkSettings(max_frame=16 * KiB))
    p.handshake()
    sid = p.open()
    p.server.reset_stream(sid, "internal", "\x00" * (100 * KiB))
    p.server.go_away("going_away", "é" * (100 * KiB))
    p.pump()  # the client must not see a frame above its max_frame
    events = p.take(p.client)
    assert of_type(events, StreamReset)[0].message == "\x00" * 1000
    assert of_type(events, GoAwayReceived)[0].message == "é" * 1000


def test_open_too_large_for_the_peer_is_refused_locally() -> None:
    p = Pair(client_settings=LinkSettings(max_frame=16 * KiB))
    p.handshake()
    huge = {**HTTP_OPEN, "headers": [["X-Big", "x" * (20 * KiB)]]}
    with pytest.raises(CSCError) as info:
        p.server.open_stream(huge)
    assert info.value.code == "headers_too_large"
    assert not p.server.has_output and not p.server.streams
    assert p.server.open_stream(HTTP_OPEN) == 2  # no id was burnt
    p.pump()
    with pytest.raises(CSCError) as info:  # the server's max_frame is 256 KiB
        p.client.accept_stream(2, {**HTTP_OK, "headers": [["X-Big", "x" * (300 * KiB)]]})
    assert info.value.code == "headers_too_large"
    assert not p.client.streams[2].accepted and not p.client.has_output
    p.client.reject_stream(2, "upstream_error", "response head too large")
    p.pump()
    assert p.take(p.server)[-1] == StreamRejected(2, "upstream_error", "response head too large")
    assert p.server.state is p.client.state is LinkState.OPEN


# -- GOAWAY ----------------------------------------------------------------------------------------


def test_goaway_from_server_stops_its_own_opens(pair: Pair) -> None:
    sid = pair.open()
    pair.server.go_away("going_away", "node draining")
    (goaway,) = decode_all(pair.server.data_to_send())
    assert bytes(goaway.payload) == (
        b'{"code":"going_away","message":"node draining","last_stream_id":0}'
    )
    pair.client.receive_data(frame(FrameType.GOAWAY, 0, bytes(goaway.payload)), pair.now)
    assert pair.client.events() == [GoAwayReceived(0, "going_away", "node draining")]
    assert pair.client.peer_going_away
    with pytest.raises(GoingAway):
        pair.server.open_stream(HTTP_OPEN)
    with pytest.raises(GoingAway):
        pair.client.open_stream(HTTP_OPEN)
    # existing streams drain normally
    pair.server.send_data(sid, b"last", fin=True)
    pair.pump()
    assert pair.take(pair.client) == [DataReceived(sid, b"last"), StreamEnded(sid)]
    pair.server.go_away()  # once only
    assert not pair.server.has_output


def test_goaway_from_client(pair: Pair) -> None:
    pair.client.go_away()
    pair.pump()
    assert pair.take(pair.server) == [GoAwayReceived(0, "going_away", "")]
    with pytest.raises(GoingAway) as info:
        pair.server.open_stream(HTTP_OPEN)
    assert info.value.spec.close_code == 1001


def test_open_racing_a_local_goaway_gets_open_fail(pair: Pair) -> None:
    pair.client.go_away("going_away", "agent stopping")
    sid = pair.server.open_stream(HTTP_OPEN)  # GOAWAY not yet seen by the server
    pair.pump()
    server_events = pair.take(pair.server)
    assert StreamRejected(sid, "going_away", "draining") in server_events
    assert of_type(server_events, GoAwayReceived)
    assert StreamOpened not in {type(e) for e in pair.take(pair.client)}
    assert not pair.server.streams and not pair.client.streams


def test_goaway_last_stream_id_is_the_highest_remote_id(pair: Pair) -> None:
    pair.open()
    pair.open()
    pair.client.go_away()
    (goaway,) = decode_all(pair.client.data_to_send())
    assert b'"last_stream_id":4' in bytes(goaway.payload)


@pytest.mark.parametrize(
    "payload",
    [b"{}", b'{"code":1}', b'{"code":"x","message":2}', b'{"code":"x","last_stream_id":"a"}'],
)
def test_bad_goaway_is_a_link_error(pair: Pair, payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        pair.client.receive_data(frame(FrameType.GOAWAY, 0, payload), pair.now)


# -- CLUSTER (1.2) ---------------------------------------------------------------------------------


def test_the_server_tells_a_1_2_client_the_cluster_size(pair: Pair) -> None:
    assert pair.server.minor == pair.client.minor == 2
    assert pair.server.send_cluster(3)
    (cluster,) = decode_all(pair.server.data_to_send())
    assert (cluster.type, cluster.flags, cluster.stream_id) == (FrameType.CLUSTER, 0, 0)
    assert bytes(cluster.payload) == b'{"cluster_nodes":3}'
    pair.client.receive_data(frame(FrameType.CLUSTER, 0, bytes(cluster.payload)), pair.now)
    assert pair.client.events() == [ClusterChanged(3)]
    sid = pair.open()  # streams carry on
    assert pair.client.stream_state(sid) is StreamState.OPEN


@pytest.mark.parametrize(("client_minor", "server_minor"), [(1, 2), (0, 2), (2, 1)])
def test_the_cluster_size_is_not_sent_to_a_side_older_than_1_2(
    client_minor: int, server_minor: int
) -> None:
    p = Pair(LinkSettings(protocol_minor=client_minor), LinkSettings(protocol_minor=server_minor))
    p.handshake()
    assert p.server.minor == p.client.minor == min(client_minor, server_minor)
    assert not p.server.send_cluster(3)
    assert not p.server.has_output


def test_a_1_1_client_ignores_a_cluster_frame() -> None:
    p = Pair(LinkSettings(protocol_minor=1))
    p.handshake()
    p.take(p.client)
    events, sent = p.inject(p.client, frame(FrameType.CLUSTER, 0, b'{"cluster_nodes":3}'))
    assert (events, sent) == ([], [])


def test_only_the_server_sends_the_cluster_size(pair: Pair) -> None:
    with pytest.raises(InvalidState):
        pair.client.send_cluster(2)
    with pytest.raises(ProtocolError, match="CLUSTER"):
        pair.server.receive_data(frame(FrameType.CLUSTER, 0, b'{"cluster_nodes":2}'), pair.now)


def test_no_cluster_size_before_welcome_or_after_close() -> None:
    p = Pair()
    p.client.send_hello(HELLO_INFO)
    p.step()
    assert not p.server.send_cluster(2)  # the WELCOME says it
    p.server.send_welcome(WELCOME_INFO, p.now)
    p.pump()
    p.server.close()
    assert not p.server.send_cluster(2)
    assert not p.server.has_output


@pytest.mark.parametrize(
    "payload",
    [
        b"{}",
        b"[3]",
        b"3",
        b'{"cluster_nodes":0}',
        b'{"cluster_nodes":-1}',
        b'{"cluster_nodes":true}',
        b'{"cluster_nodes":"3"}',
        b'{"cluster_nodes":3.0}',
        b'{"cluster_nodes":65536}',
    ],
)
def test_a_bad_cluster_size_is_a_link_error(pair: Pair, payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        pair.client.receive_data(frame(FrameType.CLUSTER, 0, payload), pair.now)


def test_a_cluster_frame_on_a_stream_is_a_link_error(pair: Pair) -> None:
    with pytest.raises(ProtocolError, match="stream id 0"):
        pair.client.receive_data(frame(FrameType.CLUSTER, 1, b'{"cluster_nodes":2}'), pair.now)


# -- ping, heartbeat, deadlines -------------------------------------------------------------------


def test_ping_pong_rtt_is_smoothed(pair: Pair) -> None:
    assert pair.server.rtt == pytest.approx(0.02)
    pair.server.ping(pair.now)
    out = b"".join(pair.server.data_to_send())
    (ping,) = decode_all([out])
    assert (ping.type, ping.flags, ping.stream_id, len(ping.payload)) == (FrameType.PING, 0, 0, 8)
    pair.client.receive_data(out, pair.now + 0.1)
    back = b"".join(pair.client.data_to_send())
    assert back == frame(FrameType.PING, 0, bytes(ping.payload), FLAG_ACK)
    pair.server.receive_data(back, pair.now + 0.2)
    (pong,) = pair.server.events()
    assert isinstance(pong, PongReceived) and pong.rtt == pytest.approx(0.2)
    assert pair.server.rtt == pytest.approx(0.875 * 0.02 + 0.125 * 0.2)


def test_unsolicited_or_stale_pong_is_ignored(pair: Pair) -> None:
    rtt = pair.server.rtt
    events, frames = pair.inject(pair.server, frame(FrameType.PING, 0, b"12345678", FLAG_ACK))
    assert (events, frames, pair.server.rtt) == ([], [], rtt)


def test_heartbeat_is_sent_when_due_and_silence_times_out() -> None:
    s = LinkSettings(heartbeat_interval=10.0, heartbeat_timeout=30.0)
    p = Pair(s, s)
    p.handshake()
    start = p.now
    assert p.server.next_deadline() == pytest.approx(start + 10)
    p.server.handle_timer(start + 5)
    assert not p.server.has_output
    p.server.handle_timer(start + 16)  # the client's PING of the handshake is 16 s old
    (ping,) = decode_all(p.server.data_to_send())
    assert ping.type == FrameType.PING and not ping.flags
    # the client is silent from now on
    assert p.server.next_deadline() == pytest.approx(start + 26)
    p.server.handle_timer(start + 26)
    p.server.data_to_send()
    assert p.server.next_deadline() == pytest.approx(start + 30)
    with pytest.raises(HeartbeatTimeout) as info:
        p.server.handle_timer(start + 30)
    assert info.value.spec.close_code == 4408
    assert p.server.state is LinkState.CLOSED


def test_any_received_bytes_keep_the_link_alive() -> None:
    s = LinkSettings(heartbeat_interval=10.0, heartbeat_timeout=30.0)
    p = Pair(s, s)
    p.handshake()
    for _ in range(10):
        p.now += 10
        p.server.handle_timer(p.now)
        p.client.handle_timer(p.now)
        p.pump()
    assert p.server.state is p.client.state is LinkState.OPEN


@given(
    interval=st.floats(0.5, 20),
    extra=st.floats(0.1, 40),
    waits=st.lists(st.sampled_from([0.0, 0.0, 0.001]) | st.floats(0, 50), max_size=8),
    handshake=st.booleans(),
)
@settings(max_examples=150, deadline=None)
def test_next_deadline_is_in_the_future_after_handle_timer(
    interval: float, extra: float, waits: list[float], handshake: bool
) -> None:
    """A timer loop ``sleep(next_deadline() - now); handle_timer(now)`` never spins."""
    s = LinkSettings(heartbeat_interval=interval, heartbeat_timeout=interval + extra)
    p = Pair(s, s)
    if handshake:
        p.handshake()
    conn = p.server
    now = p.now
    for wait in waits:
        now = max(now, conn.next_deadline()) + wait  # wake up at the deadline, or late
        try:
            conn.handle_timer(now)
        except HeartbeatTimeout:
            return
        assert conn.next_deadline() > now
        conn.data_to_send()


# -- flow control ----------------------------------------------------------------------------------


def test_sender_never_exceeds_the_window_and_credit_follows_consumption(pair: Pair) -> None:
    sid = pair.open()
    body = b"b" * MiB
    assert pair.server.send_data(sid, body) == 256 * KiB
    assert pair.server.send_data(sid, body) == 0
    assert pair.server.send_credit(sid) == 0
    pair.pump()
    received = sum(len(e.data) for e in of_type(pair.take(pair.client), DataReceived))
    assert received == 256 * KiB
    pair.client.consumed(sid, 100 * KiB, pair.now)
    assert not pair.client.has_output  # below half the window: no update yet
    pair.client.consumed(sid, 28 * KiB, pair.now)
    (window,) = decode_all(pair.client.data_to_send())
    assert (window.type, window.stream_id, bytes(window.payload)) == (
        FrameType.WINDOW,
        sid,
        encode_u32(128 * KiB),
    )
    pair.server.receive_data(frame(FrameType.WINDOW, sid, encode_u32(128 * KiB)), pair.now)
    assert pair.server.events() == [SendCreditAvailable(sid)]
    assert pair.server.send_credit(sid) == 128 * KiB


def test_consumed_for_unknown_stream_or_nothing_is_a_no_op(pair: Pair) -> None:
    sid = pair.open()
    pair.client.consumed(999, 10, pair.now)
    pair.client.consumed(sid, 0, pair.now)
    pair.client.consumed(sid, -5, pair.now)
    assert not pair.client.has_output


def test_no_credit_after_the_peer_finished(pair: Pair) -> None:
    sid = pair.open()
    pair.server.send_data(sid, b"x" * (256 * KiB), fin=True)
    pair.pump()
    pair.client.consumed(sid, 256 * KiB, pair.now)
    assert not pair.client.has_output


def test_data_beyond_the_window_resets_only_that_stream(pair: Pair) -> None:
    a, b = pair.open(), pair.open()
    pair.inject(pair.client, frame(FrameType.DATA, a, b"x" * (200 * KiB)))
    events, frames = pair.inject(pair.client, frame(FrameType.DATA, a, b"x" * (57 * KiB)))
    assert events == [
        StreamReset(
            a, "flow_control", f"{57 * KiB} bytes beyond a window of {56 * KiB}", remote=False
        )
    ]
    assert [(f.type, f.stream_id) for f in frames] == [(FrameType.RST, a)]
    assert b'"code":"flow_control"' in bytes(frames[0].payload)
    assert ERRORS["flow_control"].close_code == 4400
    assert pair.client.state is LinkState.OPEN
    assert a not in pair.client.streams
    # more data for the reset stream is ignored; the other stream is unaffected
    assert pair.inject(pair.client, frame(FrameType.DATA, a, b"x")) == ([], [])
    events, _ = pair.inject(pair.client, frame(FrameType.DATA, b, b"y" * (256 * KiB)))
    assert events == [DataReceived(b, b"y" * (256 * KiB))]


def test_window_beyond_the_window_is_reset_and_not_a_link_error(pair: Pair) -> None:
    a, b = pair.open(), pair.open()
    room = 2**31 - 1 - 256 * KiB
    events, _ = pair.inject(pair.server, frame(FrameType.WINDOW, a, encode_u32(room)))
    assert events == [SendCreditAvailable(a)]
    assert pair.server.send_credit(a) == 2**31 - 1
    events, frames = pair.inject(pair.server, frame(FrameType.WINDOW, a, encode_u32(1)))
    assert of_type(events, StreamReset) == [
        StreamReset(a, "flow_control", "invalid WINDOW of 1", remote=False)
    ]
    assert [f.type for f in frames] == [FrameType.RST]
    events, frames = pair.inject(pair.server, frame(FrameType.WINDOW, b, encode_u32(0)))
    assert of_type(events, StreamReset)[0].code == "flow_control"
    assert pair.server.state is LinkState.OPEN


@pytest.mark.parametrize(
    "ftype",
    [
        FrameType.DATA,
        FrameType.WINDOW,
        FrameType.FIN,
        FrameType.RST,
        FrameType.OPEN_OK,
        FrameType.OPEN_FAIL,
    ],
)
@pytest.mark.parametrize(
    ("side", "sid"), [("client", 2), ("client", 1), ("server", 2), ("server", 1), ("server", 3)]
)
def test_frames_for_never_opened_streams_are_link_errors(
    pair: Pair, ftype: FrameType, side: str, sid: int
) -> None:
    conn = pair.client if side == "client" else pair.server
    payload = {FrameType.WINDOW: encode_u32(1), FrameType.FIN: b""}.get(ftype, b'{"code":"x"}')
    with pytest.raises(ProtocolError, match="never opened"):
        conn.receive_data(frame(ftype, sid, payload), pair.now)
    assert conn.state is LinkState.CLOSED


def test_link_error_is_typed_and_maps_to_4400(pair: Pair) -> None:
    with pytest.raises(FrameTooLarge) as info:
        pair.client.receive_data(frame(FrameType.DATA, 2, b"x" * (256 * KiB + 1)), pair.now)
    assert info.value.spec.close_code == 4400


# -- window auto-tuning ----------------------------------------------------------------------------


def stream_download(p: Pair, sid: int, total: int, *, think: float = 0.0) -> list[int]:
    """Server sends ``total`` bytes as fast as credit allows; the client consumes on arrival
    after ``think`` seconds. Returns the client's receive window after every update."""
    sent = received = 0
    windows = [p.client.streams[sid].recv_window]
    while received < total:
        if sent < total:
            sent += p.server.send_data(sid, b"z" * min(total - sent, p.server.send_credit(sid)))
        assert p.step() or sent == received
        for event in p.take(p.client):
            if isinstance(event, DataReceived):
                received += len(event.data)
                p.now += think
                p.client.consumed(sid, len(event.data), p.now)
        stream = p.client.streams[sid]
        if stream.recv_window != windows[-1]:
            windows.append(stream.recv_window)
        assert (
            stream.recv_remaining + stream.recv_buffered + stream.recv_unacked == stream.recv_window
        )
        assert p.server.streams[sid].send_credit >= 0
    return windows


def tuned(**kw: Any) -> LinkSettings:
    base = {"initial_window": 64 * KiB, "max_window": MiB, "max_frame": 16 * KiB}
    return LinkSettings(**{**base, **kw})


def test_fast_consumer_doubles_the_window_up_to_max_window() -> None:
    p = Pair(tuned(), tuned(), latency=0.02)
    p.handshake()
    sid = p.open()
    windows = stream_download(p, sid, 8 * MiB)
    # the window only ever doubles (several doublings may fall between two observations)
    assert windows[0] == 64 * KiB and windows[-1] == MiB
    assert windows == sorted(set(windows))
    assert all(w // (64 * KiB) & (w // (64 * KiB) - 1) == 0 for w in windows)
    assert p.client.window_total == MiB


def test_slow_consumer_keeps_the_initial_window() -> None:
    p = Pair(tuned(), tuned(), latency=0.02)
    p.handshake()
    sid = p.open()
    assert stream_download(p, sid, 2 * MiB, think=0.05) == [64 * KiB]  # > 2 x RTT per update


def test_no_growth_without_an_rtt_sample() -> None:
    p = Pair(tuned(), tuned(), latency=0.02)
    p.handshake()
    sid = p.open()
    p.client.rtt = None
    assert stream_download(p, sid, MiB) == [64 * KiB]


def test_growth_is_bounded_by_the_session_budget() -> None:
    p = Pair(tuned(session_budget=256 * KiB), tuned(), latency=0.02)
    p.handshake()
    a, b = p.open(), p.open()
    stream_download(p, a, 4 * MiB)
    assert p.client.window_total == 256 * KiB
    assert p.client.streams[a].recv_window == 192 * KiB
    stream_download(p, b, 2 * MiB)
    assert p.client.streams[b].recv_window == 64 * KiB
    assert p.client.window_total == 256 * KiB


def test_new_streams_after_growth_still_get_the_initial_window() -> None:
    """Σ windows <= budget + (live - 1) * initial (docs/protocol.md §5), not max(budget, live *
    initial): credit granted to a grown window is not taken back when new streams open."""
    p = Pair(tuned(session_budget=256 * KiB), tuned(), latency=0.02)
    p.handshake()
    a = p.open()
    stream_download(p, a, 4 * MiB)
    ids = [p.open() for _ in range(3)]
    assert [p.client.streams[i].recv_window for i in ids] == [64 * KiB] * 3
    assert p.client.window_total == 256 * KiB + 3 * 64 * KiB
    extra = sum(s.recv_window - 64 * KiB for s in p.client.streams.values())
    assert extra <= 256 * KiB


def test_growth_of_links_on_one_pool_stays_within_it() -> None:
    """Two links (two sessions of one tenant) on one pool: together they grow their windows by
    no more than the pool allows, although each link's own budget would allow more; the pool
    gets back what a stream held when it ends, and all of it when a link closes."""
    pool = GrowthPool(256 * KiB)
    links = [Pair(tuned(session_budget=4 * MiB), tuned(), latency=0.02) for _ in range(2)]
    for p in links:
        p.handshake()
        p.client.pool = pool
    first = [links[0].open(), links[0].open()]
    for sid in first:
        stream_download(links[0], sid, 4 * MiB)
    assert pool.held == 256 * KiB == links[0].client.window_total - 2 * 64 * KiB
    other = links[1].open()
    assert stream_download(links[1], other, 2 * MiB) == [64 * KiB]  # the pool is spent
    p = links[0]
    p.server.send_fin(first[0])
    p.client.send_fin(first[0])
    p.pump()
    assert pool.held == p.client.window_total - 64 * KiB < 256 * KiB
    assert stream_download(links[1], other, 4 * MiB)[-1] > 64 * KiB  # room again: it grows
    p.client.close()
    links[1].client.close()
    assert pool.held == 0


def test_a_pool_bounds_its_children_through_its_parent() -> None:
    node = GrowthPool(100)
    a, b = GrowthPool(80, node), GrowthPool(80, node)
    a.take(70)
    assert (a.room(), b.room(), node.room()) == (10, 30, 30)
    b.take(30)
    assert (a.room(), b.room(), node.held) == (0, 0, 100)
    a.give(70)
    assert (a.room(), b.room(), node.held) == (70, 50, 30)


def test_window_returns_to_the_budget_when_a_stream_ends() -> None:
    p = Pair(tuned(), tuned(), latency=0.02)
    p.handshake()
    sid = p.open()
    stream_download(p, sid, 4 * MiB)
    p.server.send_fin(sid)
    p.client.send_fin(sid)
    p.pump()
    assert p.client.window_total == 0


# -- state x input sweep ---------------------------------------------------------------------------

SID = 2  # the stream under test; the server (CSC) opens it, the client (agent) accepts it


def _state_setup(state: str) -> Pair:
    p = Pair(latency=0.01)
    p.handshake()
    if state == "idle":
        return p
    p.server.open_stream(HTTP_OPEN)
    p.pump()
    if state == "rejected":
        p.client.reject_stream(SID, "upstream_refused", "")
    elif state != "opening":
        p.client.accept_stream(SID, HTTP_OK)
    if state in ("half_closed_client", "closed"):
        p.client.send_fin(SID)
    if state in ("half_closed_server", "closed"):
        p.server.send_fin(SID)
    if state == "reset":
        p.server.reset_stream(SID, "cancelled")
    p.pump()
    p.take(p.client)
    p.take(p.server)
    return p


STATES = [
    "idle",
    "opening",
    "open",
    "half_closed_client",
    "half_closed_server",
    "closed",
    "reset",
    "rejected",
]

INPUTS: dict[str, bytes] = {
    "OPEN": jframe(FrameType.OPEN, SID, HTTP_OPEN),
    "OPEN_OK": jframe(FrameType.OPEN_OK, SID, HTTP_OK),
    "OPEN_FAIL": jframe(FrameType.OPEN_FAIL, SID, {"code": "upstream_refused", "message": ""}),
    "DATA": frame(FrameType.DATA, SID, b"x"),
    "DATA+FIN": frame(FrameType.DATA, SID, b"x", FLAG_FIN),
    "WINDOW": frame(FrameType.WINDOW, SID, encode_u32(1)),
    "FIN": frame(FrameType.FIN, SID),
    "RST": jframe(FrameType.RST, SID, {"code": "cancelled", "message": ""}),
    "RST(bad)": frame(FrameType.RST, SID, b"{"),
    "PING": frame(FrameType.PING, 0, b"12345678"),
    "GOAWAY": jframe(FrameType.GOAWAY, 0, {"code": "going_away", "message": ""}),
    "HELLO": jframe(FrameType.HELLO, 0, {"version": VERSION}),
    "type 77": frame(77, SID, b"?"),
}


def outcome(p: Pair, conn: Connection, data: bytes) -> str:
    """``link:<code>``, ``rst:<code>``, ``ignored``, or what was processed (events, frames)."""
    try:
        conn.receive_data(data, p.now)
    except CSCError as exc:
        assert conn.state is LinkState.CLOSED
        return f"link:{exc.code}"
    events = conn.events()
    frames = decode_all(conn.data_to_send())
    local_resets = [e for e in events if isinstance(e, StreamReset) and not e.remote]
    if local_resets:
        assert [(f.type, f.stream_id) for f in frames] == [(FrameType.RST, SID)]
        assert SID not in conn.streams
        return f"rst:{local_resets[0].code}"
    parts = [type(e).__name__ for e in events] + [f"sent {FrameType(f.type).name}" for f in frames]
    return "+".join(parts) or "ignored"


# Expected outcome of each input (rows) in each state of stream 2 (columns), for the side that
# accepted the stream (the client, i.e. the agent) and the side that opened it (the server).
# Columns: idle, opening, open, half_closed_client, half_closed_server, closed, reset, rejected.
_NEVER = "link:protocol_error"
_LINK = "link:protocol_error"
_PING = "sent PING"
ACCEPTOR: dict[str, tuple[str, ...]] = {}
OPENER: dict[str, tuple[str, ...]] = {}


def _row(table: dict[str, tuple[str, ...]], name: str, *cells: str) -> None:
    assert len(cells) == len(STATES)
    table[name] = cells


_D, _E, _DE = "DataReceived", "StreamEnded", "DataReceived+StreamEnded"
_R, _C = "StreamReset", "SendCreditAvailable"
_I = "ignored"
# fmt: off
#                              idle    opening        open       hc_client  hc_server           closed rst rejected
_row(ACCEPTOR, "OPEN",      "StreamOpened", _LINK,   _LINK,     _LINK,     _LINK,              _LINK, _LINK, _LINK)
_row(ACCEPTOR, "OPEN_OK",      _NEVER, _LINK,        _LINK,     _LINK,     _LINK,              _I, _I, _I)
_row(ACCEPTOR, "OPEN_FAIL",    _NEVER, _LINK,        _LINK,     _LINK,     _LINK,              _I, _I, _I)
_row(ACCEPTOR, "DATA",         _NEVER, _D,           _D,        _D,        "rst:protocol_error", _I, _I, _I)
_row(ACCEPTOR, "DATA+FIN",     _NEVER, _DE,          _DE,       _DE,       "rst:protocol_error", _I, _I, _I)
_row(ACCEPTOR, "WINDOW",       _NEVER, _C,           _C,        _C,        _C,                 _I, _I, _I)
_row(ACCEPTOR, "FIN",          _NEVER, _E,           _E,        _E,        "rst:protocol_error", _I, _I, _I)
_row(ACCEPTOR, "RST",          _NEVER, _R,           _R,        _R,        _R,                 _I, _I, _I)
_row(ACCEPTOR, "RST(bad)",     _NEVER, _LINK,        _LINK,     _LINK,     _LINK,              _I, _I, _I)
_row(ACCEPTOR, "PING",         _PING, _PING,         _PING,     _PING,     _PING,              _PING, _PING, _PING)
_row(ACCEPTOR, "GOAWAY",       *["GoAwayReceived"] * 8)
_row(ACCEPTOR, "HELLO",        *[_LINK] * 8)
_row(ACCEPTOR, "type 77",      *[_I] * 8)

_row(OPENER, "OPEN",           *[_LINK] * 8)
_row(OPENER, "OPEN_OK",        _NEVER, "StreamAccepted", _LINK, _LINK,   _LINK,              _I, _I, _I)
_row(OPENER, "OPEN_FAIL",      _NEVER, "StreamRejected", _LINK, _LINK,   _LINK,              _I, _I, _I)
_row(OPENER, "DATA",           _NEVER, "rst:protocol_error", _D, "rst:protocol_error", _D,   _I, _I, _I)
_row(OPENER, "DATA+FIN",       _NEVER, "rst:protocol_error", _DE, "rst:protocol_error", _DE, _I, _I, _I)
_row(OPENER, "WINDOW",         _NEVER, _C,           _C,        _C,        _C,                 _I, _I, _I)
_row(OPENER, "FIN",            _NEVER, _E,           _E,        "rst:protocol_error", _E,    _I, _I, _I)
_row(OPENER, "RST",            _NEVER, _R,           _R,        _R,        _R,                 _I, _I, _I)
_row(OPENER, "RST(bad)",       _NEVER, _LINK,        _LINK,     _LINK,     _LINK,              _I, _I, _I)
_row(OPENER, "PING",           *[_PING] * 8)
_row(OPENER, "GOAWAY",         *["GoAwayReceived"] * 8)
_row(OPENER, "HELLO",          *[_LINK] * 8)
_row(OPENER, "type 77",        *[_I] * 8)
# fmt: on


# The sweep's states as each role's StreamState (the opener's FIN is the server's).
_SS = StreamState
SWEEP_STATES: dict[str, tuple[StreamState, ...]] = {
    "acceptor": (
        _SS.IDLE,
        _SS.OPEN_RECEIVED,
        _SS.OPEN,
        _SS.HALF_CLOSED_LOCAL,
        _SS.HALF_CLOSED_REMOTE,
        _SS.CLOSED,
        _SS.CLOSED,
        _SS.CLOSED,
    ),
    "opener": (
        _SS.IDLE,
        _SS.OPEN_SENT,
        _SS.OPEN,
        _SS.HALF_CLOSED_REMOTE,
        _SS.HALF_CLOSED_LOCAL,
        _SS.CLOSED,
        _SS.CLOSED,
        _SS.CLOSED,
    ),
}
#: Inputs that are one stream frame (the OPEN's id parity is checked before the table).
FRAME_INPUTS = {
    "OPEN": StreamInput.RECV_OPEN,
    "OPEN_OK": StreamInput.RECV_OPEN_OK,
    "OPEN_FAIL": StreamInput.RECV_OPEN_FAIL,
    "DATA": StreamInput.RECV_DATA,
    "WINDOW": StreamInput.RECV_WINDOW,
    "FIN": StreamInput.RECV_FIN,
    "RST": StreamInput.RECV_RST,
}


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("name", list(INPUTS))
@pytest.mark.parametrize("role", ["acceptor", "opener"])
def test_state_input_sweep(role: str, state: str, name: str) -> None:
    p = _state_setup(state)
    conn = p.client if role == "acceptor" else p.server
    table = ACCEPTOR if role == "acceptor" else OPENER
    before = conn.stream_state(SID)
    assert before is SWEEP_STATES[role][STATES.index(state)]
    got = outcome(p, conn, INPUTS[name])
    assert got == table[name][STATES.index(state)]
    # the outcome is the one the multiplexer's own transition table gives
    event = FRAME_INPUTS.get(name)
    if event is not None and not (role == "opener" and event is StreamInput.RECV_OPEN):
        expected = transition(before, event)
        if expected is Fault.LINK:
            assert got.startswith("link:")
        elif expected is Fault.STREAM:
            assert got == "rst:protocol_error"
        else:
            assert not got.startswith(("link:", "rst:"))
            assert conn.stream_state(SID) is expected
    if not got.startswith("link:"):  # the link carries on
        assert conn.state is LinkState.OPEN
        assert outcome(p, conn, INPUTS["PING"]) == "sent PING"


# -- fuzzing a live link ---------------------------------------------------------------------------


def _live_pair() -> Pair:
    p = Pair(LinkSettings(max_frame=16 * KiB), LinkSettings(max_frame=16 * KiB), latency=0.01)
    p.handshake()
    for accept, fin in ((True, False), (False, False), (True, True)):
        sid = p.open(accept=accept)
        if fin:
            p.server.send_fin(sid)
            p.pump()
    p.server.reset_stream(p.server.open_stream(HTTP_OPEN), "cancelled")
    p.pump()
    p.take(p.client)
    p.take(p.server)
    return p


json_payloads = st.sampled_from(
    [
        b"{}",
        b'{"code":"x","message":"y"}',
        b'{"code":1}',
        encode_json(HTTP_OPEN),
        encode_json({"version": "1.0", "settings": LinkSettings().to_wire()}),
        b"[" * 5000,
        b"1" * 5000,
        b"\xff",
    ]
)
_LINK_TYPES = {FrameType.HELLO, FrameType.WELCOME, FrameType.GOAWAY, FrameType.PING}


@st.composite
def fuzz_frames(draw: st.DrawFn) -> bytes:
    """Mostly well-formed headers (so the multiplexer, not the codec, sees the frame) carrying
    hostile payloads; sometimes anything at all."""
    if draw(st.integers(0, 9)) == 0:
        header = struct.pack(
            "!BBBBII",
            draw(st.sampled_from([1, 1, 0, 2])),
            draw(st.integers(0, 255)),
            draw(st.integers(0, 255)),
            draw(st.sampled_from([0, 0, 1])),
            draw(st.integers(0, 2**32 - 1)),
            0,
        )
        payload = draw(st.binary(max_size=40))
        return header[:8] + struct.pack("!I", len(payload)) + payload
    ftype = draw(st.sampled_from(list(FrameType)) | st.integers(12, 255))
    if ftype in _LINK_TYPES:
        sid = 0
    else:
        sid = draw(st.sampled_from([2, 4, 6, 8, 10, 12, 1, 3]) | st.integers(0, 2**32 - 1))
    flags = draw(st.sampled_from([0, 0, 0, 1]))
    if ftype == FrameType.WINDOW:
        payload = draw(st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**32 - 1]).map(encode_u32))
    elif ftype == FrameType.PING:
        payload = draw(st.binary(min_size=8, max_size=8))
    elif ftype == FrameType.FIN:
        payload = b""
    else:
        payload = draw(json_payloads | st.binary(max_size=40))
    return encode_frame(ftype, flags, sid, payload)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(fuzz_frames(), max_size=8),
    junk=st.binary(max_size=64),
    cuts=st.lists(st.integers(0, 2000), max_size=5),
    to_client=st.booleans(),
)
def test_live_link_raises_only_typed_errors(
    frames: list[bytes], junk: bytes, cuts: list[int], to_client: bool
) -> None:
    p = _live_pair()
    conn = p.client if to_client else p.server
    data = b"".join(frames) + junk
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    try:
        for a, b in pairwise(points):
            conn.receive_data(data[a:b], p.now)
            conn.events()
            conn.data_to_send()
    except CSCError as exc:
        assert exc.code in ERRORS
        assert conn.state is LinkState.CLOSED
    else:
        assert conn.state is LinkState.OPEN
    for s in conn.streams.values():
        assert s.send_credit >= 0 and s.recv_remaining >= 0


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), to_client=st.booleans(), handshaken=st.booleans())
def test_arbitrary_bytes_raise_only_typed_errors(
    data: bytes, to_client: bool, handshaken: bool
) -> None:
    p = Pair()
    if handshaken:
        p.handshake()
    else:
        p.client.send_hello(HELLO_INFO)
    conn = p.client if to_client else p.server
    try:
        conn.receive_data(data, p.now)
    except CSCError as exc:
        assert exc.code in ERRORS


# -- the state machine -----------------------------------------------------------------------------

SM_SETTINGS = LinkSettings(
    initial_window=4 * KiB,
    max_window=64 * KiB,
    session_budget=24 * KiB,
    max_frame=16 * KiB,
    max_streams=6,
    heartbeat_interval=0.05,
    heartbeat_timeout=1e9,
)
PATTERN = bytes(i % 251 for i in range(64 * KiB))
#: Growth pools of the state machine: each side's, and the one both sides' are under.
SM_POOL = (12 * KiB, 16 * KiB)


class LinkMachine(RuleBasedStateMachine):
    """Many streams on one link under random commands, deliveries split anywhere, and time."""

    streams = Bundle("streams")

    def __init__(self) -> None:
        super().__init__()
        self.p = Pair(SM_SETTINGS, SM_SETTINGS, latency=0.005)
        self.p.handshake()
        # both sides draw on pools smaller than their budget, under one they share
        self.node = GrowthPool(SM_POOL[1])
        self.p.client.pool = GrowthPool(SM_POOL[0], self.node)
        self.p.server.pool = GrowthPool(SM_POOL[0], self.node)
        self.sent: dict[tuple[str, int], bytearray] = {}
        self.got: dict[tuple[str, int], bytearray] = {}
        self.ended: set[tuple[str, int]] = set()

    def conn(self, name: str) -> Connection:
        return self.p.server if name == "server" else self.p.client

    # commands

    @rule(target=streams)
    def open(self) -> Any:
        try:
            return self.p.server.open_stream(HTTP_OPEN)
        except (TooManyStreams, GoingAway):
            return multiple()

    def misuse(self, conn: Connection, sid: int, event: StreamInput) -> bool:
        """Whether the transition table forbids ``event`` on ``sid`` (the command must then
        raise InvalidState and queue nothing)."""
        return transition(conn.stream_state(sid), event) is Fault.MISUSE

    @rule(sid=streams, accept=st.booleans())
    def answer(self, sid: int, accept: bool) -> None:
        conn = self.p.client
        event = StreamInput.ACCEPT if accept else StreamInput.REJECT
        misuse = self.misuse(conn, sid, event)
        with pytest.raises(InvalidState) if misuse else contextlib.nullcontext():
            if accept:
                conn.accept_stream(sid, HTTP_OK)
            else:
                conn.reject_stream(sid, "upstream_refused", "no")

    @rule(
        sid=streams,
        sender=st.sampled_from(["server", "client"]),
        size=st.integers(0, 20 * KiB),
        fin=st.booleans(),
    )
    def send(self, sid: int, sender: str, size: int, fin: bool) -> None:
        conn = self.conn(sender)
        if self.misuse(conn, sid, StreamInput.SEND_DATA):
            with pytest.raises(InvalidState):
                conn.send_data(sid, b"x")
            return
        sent = self.sent.setdefault((sender, sid), bytearray())
        start = len(sent) % 251
        data = PATTERN[start : start + size]
        taken = conn.send_data(sid, data, fin=fin)
        assert 0 <= taken <= size
        sent += data[:taken]

    @rule(sid=streams, sender=st.sampled_from(["server", "client"]))
    def fin(self, sid: int, sender: str) -> None:
        conn = self.conn(sender)
        with (
            pytest.raises(InvalidState)
            if self.misuse(conn, sid, StreamInput.SEND_FIN)
            else (contextlib.nullcontext())
        ):
            conn.send_fin(sid)

    @rule(sid=streams, by=st.sampled_from(["server", "client"]))
    def reset(self, sid: int, by: str) -> None:
        conn = self.conn(by)
        with (
            pytest.raises(InvalidState)
            if self.misuse(conn, sid, StreamInput.SEND_RST)
            else (contextlib.nullcontext())
        ):
            conn.reset_stream(sid, "cancelled", "test")

    @rule(sid=streams, by=st.sampled_from(["server", "client"]), size=st.integers(1, 16 * KiB))
    def consume(self, sid: int, by: str, size: int) -> None:
        conn = self.conn(by)
        stream = conn.streams.get(sid)
        if stream is not None and stream.recv_buffered:
            conn.consumed(sid, min(size, stream.recv_buffered), self.p.now)

    @rule(by=st.sampled_from(["server", "client"]))
    def consume_everything(self, by: str) -> None:
        conn = self.conn(by)
        for sid, stream in list(conn.streams.items()):
            if stream.recv_buffered:
                conn.consumed(sid, stream.recv_buffered, self.p.now)

    @precondition(lambda self: not self.p.client.local_going_away)
    @rule()
    def client_goes_away(self) -> None:
        self.p.client.go_away()

    @rule(
        sid=streams,
        sender=st.sampled_from(["server", "client"]),
        rounds=st.integers(1, 12),
        size=st.integers(1, 64 * KiB),
    )
    def busy(self, sid: int, sender: str, rounds: int, size: int) -> None:
        """A stream whose consumer keeps up: the case auto-tuning is for (§5)."""
        receiver = "client" if sender == "server" else "server"
        for _ in range(rounds):
            self.send(sid, sender, size, fin=False)
            self.settle()
            self.consume_everything(receiver)

    @rule(dt=st.sampled_from([0.001, 0.01, 0.1]))
    def tick(self, dt: float) -> None:
        self.p.now += dt
        self.p.server.handle_timer(self.p.now)
        self.p.client.handle_timer(self.p.now)

    @rule(cuts=st.lists(st.integers(0, 200 * KiB), max_size=4))
    def deliver(self, cuts: list[int]) -> None:
        outs = [b"".join(c.data_to_send()) for c in (self.p.client, self.p.server)]
        self.p.now += self.p.latency
        for data, dst in zip(outs, (self.p.server, self.p.client), strict=True):
            points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
            for a, b in pairwise(points):
                dst.receive_data(data[a:b], self.p.now)
        self.collect()

    @rule()
    def settle(self) -> None:
        for _ in range(50):
            if not self.p.step():
                break
            self.collect()

    def collect(self) -> None:
        for name, conn, events in (
            ("client", self.p.client, self.p.take(self.p.client)),
            ("server", self.p.server, self.p.take(self.p.server)),
        ):
            peer = "server" if name == "client" else "client"
            for event in events:
                if isinstance(event, DataReceived):
                    self.got.setdefault((peer, event.stream_id), bytearray()).extend(event.data)
                elif isinstance(event, StreamEnded):
                    self.ended.add((peer, event.stream_id))
                elif isinstance(event, StreamReset):
                    assert event.remote, f"{name} reset a stream of a well-behaved peer: {event}"
            assert conn.state is LinkState.OPEN

    # invariants

    @invariant()
    def windows_and_credit(self) -> None:
        s = SM_SETTINGS
        for conn in (self.p.client, self.p.server):
            live = conn.streams.values()
            for st_ in live:
                assert st_.send_credit >= 0
                assert st_.recv_remaining >= 0
                held = st_.recv_remaining + st_.recv_buffered + st_.recv_unacked
                if st_.remote_fin:  # consumed bytes are no longer credited
                    assert held <= st_.recv_window
                else:
                    assert held == st_.recv_window
                assert s.initial_window <= st_.recv_window <= s.max_window
            total = sum(st_.recv_window for st_ in live)
            assert conn.window_total == total
            extra = sum(st_.recv_window - s.initial_window for st_ in live)
            assert extra <= max(s.session_budget - s.initial_window, 0)
            assert total <= s.session_budget + max(len(live) - 1, 0) * s.initial_window
            assert conn.pool is not None
            assert conn.pool.held == extra <= conn.pool.budget
        assert self.node.held == self.p.client.pool.held + self.p.server.pool.held  # type: ignore[union-attr]
        assert self.node.held <= self.node.budget

    @invariant()
    def data_in_order_and_complete(self) -> None:
        for key, got in self.got.items():
            sent = self.sent.get(key, bytearray())
            assert got == sent[: len(got)], f"stream {key}: bytes out of order or corrupted"
        for key in self.ended:
            assert self.got.get(key, bytearray()) == self.sent.get(key, bytearray())


TestLinkMachine = LinkMachine.TestCase
TestLinkMachine.settings = settings(
    max_examples=120,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
