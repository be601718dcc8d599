"""Binary stream heads (shared/protocol/heads.py, docs/protocol.md §6.1): exact bytes, the heads
that stay JSON, the negotiation between 1.0 and 1.1 sides of a link, and the forwarded head of a
peer link (§9). The property tests are tests/fuzz/test_binary_heads.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from csc.cluster.peerstream import BINARY_HEAD, PeerStream, decode_head, encode_head
from shared.errors import HeadersTooLarge, ProtocolError
from shared.headers import header_pairs
from shared.protocol import Connection, FrameType, LinkSettings, Side, StreamAccepted, StreamOpened
from shared.protocol.codec import FLAG_BINARY, encode_frame, encode_json
from shared.protocol.heads import decode_answer, decode_open, encode_answer, encode_open
from shared.protocol.settings import peer_minor
from shared.validpairs import ValidPairs
from tests.unit.test_mux import Pair, decode_all
from tests.unit.test_peer_stream import FakeInner

REQUEST: dict[str, Any] = {
    "kind": "http",
    "alias": "acme@example.com",
    "client": "198.51.100.7:50312",
    "request_id": "r-1",
    "method": "POST",
    "target": "/enrol?x=1",
    "headers": [("Content-Type", "application/json"), ("X-A", "é ☃")],
    "body": True,
}
RESPONSE: dict[str, Any] = {"status": 200, "reason": "OK", "headers": [("Content-Length", "5")]}
TCP: dict[str, Any] = {"kind": "tcp", "alias": "a@b.c", "client": "[::1]:5", "request_id": "r-2"}


def plain(head: dict[str, Any]) -> dict[str, Any]:
    """A head with its header pairs as lists, as JSON gives them and binary gives tuples."""
    if "headers" not in head:
        return head
    return {**head, "headers": [list(pair) for pair in head["headers"]]}


def test_exact_bytes_of_each_layout() -> None:
    assert encode_open(REQUEST) == (
        b"\x01\x01\x00\x00\x00\x02acme@example.com\x00198.51.100.7:50312\x00r-1\x00POST\x00"
        b"/enrol?x=1\x00Content-Type\x00application/json\x00X-A\x00" + "é ☃".encode() + b"\x00"
    )
    assert encode_answer(RESPONSE) == b"\x02\x00\x00\xc8\x00\x01OK\x00Content-Length\x005\x00"
    assert encode_open(TCP) == b"\x03\x00\x00\x00\x00\x00a@b.c\x00[::1]:5\x00r-2\x00"
    forwarded = {**REQUEST, "tenant": "acme", "body": False}
    assert encode_open(forwarded) == (
        b"\x01\x02\x00\x00\x00\x02acme@example.com\x00198.51.100.7:50312\x00r-1\x00POST\x00"
        b"/enrol?x=1\x00acme\x00Content-Type\x00application/json\x00X-A\x00"
        + "é ☃".encode()
        + b"\x00"
    )
    assert encode_open({**TCP, "tenant": "t"}) == (
        b"\x03\x02\x00\x00\x00\x00a@b.c\x00[::1]:5\x00r-2\x00t\x00"
    )


@pytest.mark.parametrize(
    "head", [REQUEST, TCP, {**REQUEST, "tenant": "acme"}, {**TCP, "tenant": ""}]
)
def test_open_heads_round_trip(head: dict[str, Any]) -> None:
    payload = encode_open(head)
    assert payload is not None
    decoded = decode_open(memoryview(payload))
    assert decoded == head
    if "headers" in decoded:
        assert type(decoded["headers"]) is ValidPairs
        assert header_pairs(decoded["headers"]) is decoded["headers"]


def test_answer_head_round_trips() -> None:
    payload = encode_answer(RESPONSE)
    assert payload is not None
    assert decode_answer(payload) == RESPONSE
    assert decode_answer(encode_answer({**RESPONSE, "reason": "", "headers": []}) or b"") == {
        "status": 200,
        "reason": "",
        "headers": [],
    }


@pytest.mark.parametrize(
    "change",
    [
        {"extra": 1},
        {"kind": "udp"},
        {"body": 1},
        {"method": ""},
        {"method": "G T"},
        {"target": "/a\r\nX: y"},
        {"client": "a\x00b"},
        {"alias": 7},
        {"headers": [("a b", "c")]},
        {"headers": [("", "c")]},
        {"headers": [("A", "c\nd")]},
        {"headers": [("A", "c\x00")]},
        {"headers": [("A", "b", "c")]},
        {"headers": [("A", 1)]},
        {"headers": (("A", "b"),)},
        {"headers": [("A", "\ud800")]},
        {"tenant": 5},
    ],
)
def test_a_request_head_outside_the_layout_stays_json(change: dict[str, Any]) -> None:
    assert encode_open({**REQUEST, **change}) is None


@pytest.mark.parametrize(
    "head",
    [
        {**RESPONSE, "status": 99},
        {**RESPONSE, "status": 1000},
        {**RESPONSE, "status": True},
        {**RESPONSE, "status": "200"},
        {**RESPONSE, "reason": None},
        {**RESPONSE, "reason": "O\rK"},
        {**RESPONSE, "node": "A"},
        {"node": "A"},
        {},
        {"unprocessed": True},
    ],
)
def test_an_answer_outside_the_layout_stays_json(head: dict[str, Any]) -> None:
    assert encode_answer(head) is None


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x01\x00\x00\x00\x00",
        b"\x09\x00\x00\x00\x00\x00",  # unknown layout
        b"\x02\x00\x00\xc8\x00\x00OK\x00",  # a response layout in an OPEN
        b"\x03\x04\x00\x00\x00\x00a\x00b\x00c\x00",  # undefined flag
        b"\x03\x00\x00\x01\x00\x00a\x00b\x00c\x00",  # a status in an OPEN
        b"\x03\x00\x00\x00\x00\x01a\x00b\x00c\x00",  # headers in a TCP OPEN
        b"\x03\x00\x00\x00\x00\x00a\x00b\x00c",  # no final NUL
        b"\x03\x00\x00\x00\x00\x00a\x00b\x00",  # a field missing
        b"\x03\x02\x00\x00\x00\x00a\x00b\x00c\x00",  # its tenant missing
        b"\x01\x00\x00\x00\x00\x00a\x00b\x00c\x00GET\x00",  # no target
        b"\x01\x00\x00\x00\x00\x00a\x00b\x00c\x00\x00/\x00",  # empty method
        b"\x01\x00\x00\x00\x00\x00a\x00b\x00c\x00G T\x00/\x00",  # method not a token
        b"\x01\x00\x00\x00\x00\x01a\x00b\x00c\x00GET\x00/\x00",  # a header missing
        b"\x01\x00\x00\x00\x00\x01a\x00b\x00c\x00GET\x00/\x00A:\x00v\x00",  # name not a token
        b"\x01\x00\x00\x00\x00\x01a\x00b\x00c\x00GET\x00/\x00A\x00v\r\x00",  # CR in a value
        b"\x01\x00\x00\x00\x00\x00a\x00b\x00c\x00GET\x00/\n\x00",  # LF in the target
        b"\x01\x00\x00\x00\x00\x00\xff\x00b\x00c\x00GET\x00/\x00",  # not UTF-8
    ],
)
def test_malformed_open_heads_are_protocol_errors(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_open(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x02\x00\x00\x63\x00\x00OK\x00",  # status 99
        b"\x02\x00\x03\xe8\x00\x00OK\x00",  # status 1000
        b"\x02\x01\x00\xc8\x00\x00OK\x00",  # a flag
        b"\x02\x00\x00\xc8\x00\x00",  # no reason field
        b"\x01\x00\x00\xc8\x00\x00OK\x00",  # a request layout in an OPEN_OK
        b"\x02\x00\x00\xc8\x00\x01OK\x00A\x00",  # a value missing
    ],
)
def test_malformed_answer_heads_are_protocol_errors(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_answer(payload)


@pytest.mark.parametrize(
    ("version", "minor"),
    [("1.0", 0), ("1.1", 1), ("1.7", 7), ("1", 0), ("1.", 0), ("1.x", 0), ("1.\u0661", 0)],
)
def test_peer_minor(version: str, minor: int) -> None:
    assert peer_minor({"version": version}) == minor


# -- negotiation on a link --------------------------------------------------------------------


def _pair(client_minor: int, server_minor: int) -> Pair:
    pair = Pair(
        LinkSettings(protocol_minor=client_minor), LinkSettings(protocol_minor=server_minor)
    )
    pair.handshake()
    pair.take(pair.client)
    pair.take(pair.server)
    return pair


@pytest.mark.parametrize(("client", "server"), [(1, 1), (0, 1), (1, 0), (0, 0), (2, 1)])
def test_heads_are_binary_only_when_both_sides_speak_1_1(client: int, server: int) -> None:
    pair = _pair(client, server)
    binary = min(client, server) >= 1
    assert pair.client.binary_heads is pair.server.binary_heads is binary
    sid = pair.server.open_stream(REQUEST)
    (opened,) = decode_all(pair.server.data_to_send())
    assert opened.flags == (FLAG_BINARY if binary else 0)
    assert bytes(opened.payload) == (encode_open(REQUEST) if binary else encode_json(REQUEST))
    pair.client.receive_data(
        encode_frame(FrameType.OPEN, opened.flags, sid, bytes(opened.payload)), 0
    )
    (event,) = pair.client.events()
    assert isinstance(event, StreamOpened)
    assert (event.stream_id, plain(event.info)) == (sid, plain(REQUEST))
    pair.client.accept_stream(sid, RESPONSE)
    (answer,) = decode_all(pair.client.data_to_send())
    assert answer.flags == (FLAG_BINARY if binary else 0)
    pair.server.receive_data(
        encode_frame(FrameType.OPEN_OK, answer.flags, sid, bytes(answer.payload)), 0
    )
    (accepted,) = pair.server.events()
    assert isinstance(accepted, StreamAccepted)
    assert (accepted.stream_id, plain(accepted.info)) == (sid, plain(RESPONSE))
    # a binary head is kept as it came (a relay passes it on), as bytes of its own
    assert accepted.binary == (bytes(answer.payload) if binary else None)
    assert accepted.binary is None or type(accepted.binary) is bytes


def test_a_head_outside_the_layout_goes_as_json_on_a_1_1_link() -> None:
    pair = _pair(1, 1)
    info = {**REQUEST, "x-later": [1]}  # a member a later minor might add
    sid = pair.server.open_stream(info)
    (opened,) = decode_all(pair.server.data_to_send())
    assert (opened.flags, bytes(opened.payload)) == (0, encode_json(info))
    pair.client.receive_data(encode_frame(FrameType.OPEN, 0, sid, bytes(opened.payload)), 0)
    assert pair.client.events() == [StreamOpened(sid, plain(info))]
    pair.client.accept_stream(sid, {})  # a TCP stream's answer
    (answer,) = decode_all(pair.client.data_to_send())
    assert (answer.flags, bytes(answer.payload)) == (0, b"{}")


@pytest.mark.parametrize(("client", "server"), [(0, 1), (1, 0), (0, 0)])
def test_a_binary_head_to_or_from_a_1_0_side_ends_the_link(client: int, server: int) -> None:
    pair = _pair(client, server)
    payload = encode_open(REQUEST)
    assert payload is not None
    with pytest.raises(ProtocolError):
        pair.client.receive_data(encode_frame(FrameType.OPEN, FLAG_BINARY, 2, payload), 0)
    assert pair.client.state.value == "closed"


def test_a_malformed_binary_open_ends_the_link() -> None:
    pair = _pair(1, 1)
    with pytest.raises(ProtocolError, match="binary OPEN"):
        pair.client.receive_data(encode_frame(FrameType.OPEN, FLAG_BINARY, 2, b"\x01junk"), 0)
    assert pair.client.state.value == "closed"


def test_a_malformed_binary_open_ok_ends_the_link() -> None:
    pair = _pair(1, 1)
    sid = pair.server.open_stream(REQUEST)
    pair.server.data_to_send()
    with pytest.raises(ProtocolError, match="binary OPEN_OK"):
        pair.server.receive_data(encode_frame(FrameType.OPEN_OK, FLAG_BINARY, sid, b"\x02"), 0)


def test_a_binary_head_too_large_for_the_peer_is_refused_locally() -> None:
    pair = _pair(1, 1)
    big = {**REQUEST, "headers": [("X-Big", "v" * (256 * 1024))]}
    with pytest.raises(HeadersTooLarge):
        pair.server.open_stream(big)
    assert pair.server.data_to_send() == []
    assert isinstance(pair.server, Connection) and pair.server.side is Side.SERVER


# -- the forwarded head of a peer link (§9) ----------------------------------------------------


def test_forwarded_head_is_binary_only_on_a_1_1_link() -> None:
    binary = encode_head(RESPONSE, binary=True)
    assert int.from_bytes(binary[:4], "big") & BINARY_HEAD
    assert decode_head(binary[4:], True, True) == RESPONSE
    assert encode_head(RESPONSE) == encode_head(RESPONSE, binary=False)
    assert encode_head({"node": "A"}, binary=True) == encode_head({"node": "A"})
    assert decode_head(encode_head({}, binary=True)[4:], False, True) == {}
    with pytest.raises(ProtocolError):
        decode_head(binary[4:], True, False)  # a 1.0 link never carries it
    with pytest.raises(ProtocolError):
        decode_head(b"\x02", True, True)


@pytest.mark.parametrize("agent_minor", [1, 0])
@pytest.mark.parametrize("head", [REQUEST, {**REQUEST, "body": False, "headers": []}, TCP])
def test_a_relaying_node_passes_a_forwarded_open_on_without_decoding_it(
    head: dict[str, Any], agent_minor: int
) -> None:
    """B→A→agent: A (``pass_opens``) only peeks at B's OPEN; the agent gets the same head as
    if A had decoded it, dropped its tenant and encoded it again (JSON for a 1.0 agent)."""
    peer, agent = _pair(1, 1), _pair(1, agent_minor)
    peer.client.pass_opens = True  # A accepts B's streams on the client side of this pair
    sid = peer.server.open_stream({**head, "tenant": "acme"})
    (opened,) = decode_all(peer.server.data_to_send())
    peer.client.receive_data(
        encode_frame(FrameType.OPEN, opened.flags, sid, bytes(opened.payload)), 0
    )
    (event,) = peer.client.events()
    assert isinstance(event, StreamOpened)
    assert (event.info["alias"], event.info["tenant"], event.info["kind"]) == (
        head["alias"],
        "acme",
        head["kind"],
    )
    assert "headers" not in event.info  # not decoded
    relayed = agent.server.open_stream({k: v for k, v in event.info.items() if k != "tenant"})
    (sent,) = decode_all(agent.server.data_to_send())
    agent.client.receive_data(
        encode_frame(FrameType.OPEN, sent.flags, relayed, bytes(sent.payload)), 0
    )
    (got,) = agent.client.events()
    assert isinstance(got, StreamOpened)
    assert plain(got.info) == plain(head)
    assert sent.flags == (FLAG_BINARY if agent_minor else 0)


def test_peer_stream_reads_a_binary_head_and_refuses_it_on_a_1_0_link() -> None:
    async def run(link_binary: bool) -> dict[str, Any] | ProtocolError:
        inner = FakeInner([encode_head(RESPONSE, binary=True) + b"hello"])
        inner.link.conn.binary_heads = link_binary
        stream = PeerStream(inner, "A")  # type: ignore[arg-type]
        try:
            head = await stream.opened
        except ProtocolError as err:
            assert isinstance(inner.reset_with, ProtocolError)
            return err
        assert await stream.read() == b"hello"
        stream.finish()
        return head

    assert asyncio.run(run(True)) == RESPONSE
    assert isinstance(asyncio.run(run(False)), ProtocolError)
