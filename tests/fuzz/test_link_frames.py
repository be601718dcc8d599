"""Fuzz target: the agent-link frame codec and the multiplexer fed hostile frame sequences.

A hostile agent (or a hostile CSC, seen from the agent) controls every byte of the link.
Checks: ``FrameDecoder.feed`` raises only ``ProtocolError`` (and its subclasses) or
``VersionUnsupported``, and never buffers more than one frame header plus ``max_payload``; a
live ``Connection`` raises only ``CSCError`` subclasses with a code of the error table, closes
itself when it does, keeps every window non-negative, never holds more streams than it allows,
and its memory stays bounded by its windows however many bytes arrive.
"""

from __future__ import annotations

import struct
from itertools import pairwise
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from shared.errors import ERRORS, CSCError, FrameTooLarge, ProtocolError, VersionUnsupported
from shared.protocol import Connection, FrameDecoder, FrameType, LinkSettings, LinkState, Side
from shared.protocol.codec import (
    HEADER_SIZE,
    LINK_TYPES,
    encode_frame,
    encode_json,
    encode_u32,
)
from tests.fuzz.budget import KiB, MiB, fuzz, only, peak_memory

CODEC_ERRORS = (ProtocolError, VersionUnsupported)
MAX_PAYLOAD = 64 * KiB


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in pairwise(points)]


# -- the codec ----------------------------------------------------------------------------------

headers = st.builds(
    struct.Struct("!BBBBII").pack,
    st.sampled_from([1, 1, 1, 0, 2, 255]),
    st.integers(0, 15) | st.integers(0, 255),
    st.sampled_from([0, 1, 2, 0x80, 0xFF]),
    st.sampled_from([0, 0, 0, 1]),
    st.sampled_from([0, 1, 2, 3, 2**31, 2**32 - 1]),
    st.sampled_from([0, 4, 8, 16, MAX_PAYLOAD, MAX_PAYLOAD + 1, 2**32 - 1]) | st.integers(0, 64),
)
link_bytes = st.lists(st.tuples(headers, st.binary(max_size=64)), max_size=8).map(
    lambda parts: b"".join(h + p for h, p in parts)
) | st.binary(max_size=512)


@fuzz(400)
@given(data=link_bytes, cuts=st.lists(st.integers(0, 1024), max_size=12))
def test_decoder_raises_only_protocol_errors_and_buffers_at_most_one_frame(
    data: bytes, cuts: list[int]
) -> None:
    decoder = FrameDecoder(MAX_PAYLOAD)
    for chunk in cut(data, cuts):
        try:
            frames = decoder.feed(chunk)
        except CODEC_ERRORS:
            return
        assert decoder.buffered < HEADER_SIZE + MAX_PAYLOAD
        for frame in frames:
            assert len(frame.payload) <= MAX_PAYLOAD
            if frame.type in FrameType.__members__.values():
                assert (frame.stream_id == 0) == (frame.type in LINK_TYPES)


def test_a_declared_length_beyond_the_limit_is_refused_before_any_payload_arrives() -> None:
    decoder = FrameDecoder(MAX_PAYLOAD)
    header = struct.pack("!BBBBII", 1, FrameType.DATA, 0, 0, 2, 2**32 - 1)
    assert isinstance(only(CODEC_ERRORS, decoder.feed, header), FrameTooLarge)
    assert decoder.buffered == 0


def test_decoder_memory_stays_bounded_over_a_long_stream_in_odd_chunks() -> None:
    """8 MiB of frames in misaligned chunks: the peak depends on the chunk and frame sizes
    only, never on how much went through."""
    frame = encode_frame(FrameType.DATA, 0, 2, b"x" * (MAX_PAYLOAD - 100))
    stream = frame * (8 * MiB // len(frame))
    chunk = 50_000

    def run() -> int:
        decoder = FrameDecoder(MAX_PAYLOAD)
        count = 0
        for pos in range(0, len(stream), chunk):
            count += len(decoder.feed(stream[pos : pos + chunk]))
        return count

    count, peak = peak_memory(run)
    assert count == len(stream) // len(frame)
    assert peak < 4 * (chunk + MAX_PAYLOAD + HEADER_SIZE), peak


# -- the multiplexer ----------------------------------------------------------------------------

SETTINGS = LinkSettings(initial_window=16 * KiB, max_frame=16 * KiB, max_streams=4)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
heads = st.fixed_dictionaries(
    {},
    optional={
        "alias": st.sampled_from(["acme@example.com", "", "x" * 300]) | st.integers(),
        "kind": st.sampled_from(["http", "tcp", "udp"]),
        "method": st.sampled_from(["GET", "POST", "", "G T"]),
        "target": st.sampled_from(["/", "/a?b", "x", "/\r\n"]),
        "headers": st.lists(st.lists(st.text(max_size=6), max_size=3), max_size=3) | json_values,
        "status": st.integers(0, 1000) | json_values,
        "code": st.sampled_from(sorted(ERRORS)) | json_values,
        "message": st.text(max_size=30) | json_values,
        "last_stream_id": st.integers(-1, 2**33) | json_values,
        "settings": json_values,
        "version": st.sampled_from(["1.0", "1.9", "2.0", "", "1"]) | json_values,
    },
)
payloads = (
    heads.map(encode_json)
    | json_values.map(lambda v: encode_json({"v": v})[5:-1])
    | st.binary(max_size=40)
    | st.just(b"[" * 5000)
)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    ftype = draw(st.sampled_from(list(FrameType)) | st.integers(12, 20))
    if ftype in LINK_TYPES:
        sid = 0
    else:
        sid = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 10, 12]) | st.integers(0, 2**32 - 1))
    flags = draw(st.sampled_from([0, 0, 1]))
    if ftype == FrameType.WINDOW:
        payload = encode_u32(draw(st.sampled_from([0, 1, 4096, 2**31 - 1, 2**31, 2**32 - 1])))
    elif ftype == FrameType.PING:
        payload = draw(st.binary(min_size=8, max_size=8))
    elif ftype == FrameType.FIN:
        payload = b""
    elif ftype == FrameType.DATA:
        payload = b"d" * draw(st.sampled_from([0, 1, 100, 8 * KiB, 16 * KiB]))
    else:
        payload = draw(payloads)
    return encode_frame(ftype, flags, sid, payload)


def live_pair() -> tuple[Connection, Connection]:
    """An agent (CLIENT, accepts streams) and a CSC (SERVER) after their handshake; the CSC has
    opened two streams, one of them accepted."""
    agent = Connection(Side.CLIENT, SETTINGS, accept_streams=True, now=0.0)
    csc = Connection(Side.SERVER, SETTINGS, accept_streams=False, now=0.0)
    agent.send_hello({"agent": {"name": "fuzz", "version": "0"}})
    pump(agent, csc)
    csc.send_welcome({"node": "n1"}, 0.0)
    pump(csc, agent)
    for accept in (True, False):
        sid = csc.open_stream({"kind": "tcp", "alias": "acme@example.com"})
        pump(csc, agent)
        if accept:
            agent.accept_stream(sid, {})
            pump(agent, csc)
    agent.events()
    csc.events()
    return agent, csc


def pump(src: Connection, dst: Connection) -> None:
    for chunk in src.data_to_send():
        dst.receive_data(bytes(chunk), 0.0)


def check_feed(conn: Connection, data: bytes, cuts: list[int]) -> None:
    try:
        for chunk in cut(data, cuts):
            conn.receive_data(chunk, 1.0)
            conn.events()
            conn.data_to_send()
    except CSCError as exc:  # anything else fails the test
        assert exc.code in ERRORS
        assert conn.state is LinkState.CLOSED
        return
    assert conn.state is LinkState.OPEN
    assert len(conn.streams) <= 2 * SETTINGS.max_streams
    for stream in conn.streams.values():
        assert stream.send_credit >= 0
        assert 0 <= stream.recv_remaining <= SETTINGS.max_window


@fuzz(300)
@given(
    sequence=st.lists(frames(), max_size=10),
    junk=st.binary(max_size=24),
    cuts=st.lists(st.integers(0, 40 * KiB), max_size=4),
    to_agent=st.booleans(),
)
def test_mux_fed_arbitrary_frames_raises_only_typed_errors(
    sequence: list[bytes], junk: bytes, cuts: list[int], to_agent: bool
) -> None:
    agent, csc = live_pair()
    check_feed(agent if to_agent else csc, b"".join(sequence) + junk, cuts)


@fuzz(100)
@given(payload=payloads, to_agent=st.booleans(), ftype=st.sampled_from([1, 2, 11]))
def test_mux_handshake_with_arbitrary_payloads_raises_only_typed_errors(
    payload: bytes, to_agent: bool, ftype: int
) -> None:
    agent = Connection(Side.CLIENT, SETTINGS, accept_streams=True, now=0.0)
    csc = Connection(Side.SERVER, SETTINGS, accept_streams=False, now=0.0)
    agent.send_hello({})
    conn = agent if to_agent else csc
    if ftype == FrameType.PING:
        payload = (payload + bytes(8))[:8]
    try:
        conn.receive_data(encode_frame(ftype, 0, 0, payload), 0.0)
    except CSCError as exc:
        assert exc.code in ERRORS
        assert conn.state is LinkState.CLOSED


def test_mux_memory_is_bounded_by_its_windows_under_a_flood() -> None:
    """A hostile CSC opens streams past the limit and floods them with DATA no one consumes:
    the agent refuses the extra streams, resets the overrun ones, and its memory does not grow
    with the bytes sent (here 8 MiB)."""
    agent, _ = live_pair()
    opens = b"".join(
        encode_frame(FrameType.OPEN, 0, sid, encode_json({"kind": "tcp"}))
        for sid in range(10, 10 + 2 * 64, 2)
    )
    data = b"".join(
        encode_frame(FrameType.DATA, 0, sid, b"d" * (16 * KiB)) for sid in range(10, 20, 2)
    )

    def flood() -> dict[int, Any]:
        agent.receive_data(opens, 1.0)
        agent.events()
        agent.data_to_send()
        for _ in range(8 * MiB // len(data)):
            agent.receive_data(data, 1.0)
            agent.events()
            agent.data_to_send()
        return dict(agent.streams)

    streams, peak = peak_memory(flood)
    assert agent.state is LinkState.OPEN
    assert len([s for s in streams.values() if not s.local]) <= SETTINGS.max_streams
    assert peak < 2 * len(data) + 256 * KiB, peak
