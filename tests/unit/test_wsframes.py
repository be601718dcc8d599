"""csc/relay/wsframes.py: the CSC's WebSocket frame reader, by example and fuzzed over any chunking."""

from __future__ import annotations

import itertools
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csc.relay.wsframes import (
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Control,
    FrameError,
    FrameReader,
    close_payload,
    frame_head,
    parse_close,
)


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0
) -> bytes:
    """One client frame, built independently of the reader (RFC 6455 §5.2)."""
    first = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head = bytes((first, bit | n))
    elif n < 65536:
        head = bytes((first, bit | 126)) + struct.pack("!H", n)
    else:
        head = bytes((first, bit | 127)) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def read_all(reader: FrameReader, chunks: list[bytes]) -> list[bytes | Control]:
    return [item for chunk in chunks for item in reader.feed(chunk)]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# a message: fragments of a binary message, each possibly followed by a control frame
_fragment = st.binary(max_size=300)
_control = st.one_of(
    st.none(),
    st.tuples(st.sampled_from([OP_PING, OP_PONG]), st.binary(max_size=125)),
)
_message = st.lists(st.tuples(_fragment, _control), min_size=1, max_size=4)


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(_message, max_size=6),
    big=st.booleans(),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
)
def test_any_chunking_yields_the_payloads_and_controls_in_order(
    messages: list[list[tuple[bytes, tuple[int, bytes] | None]]], big: bool, cuts: list[int]
) -> None:
    wire = bytearray()
    expected_stream = bytearray()
    expected_controls: list[Control] = []
    if big:  # a frame with a 64-bit length, gathered from many chunks
        payload = os.urandom(70_000)
        wire += client_frame(OP_BINARY, payload)
        expected_stream += payload
    for fragments in messages:
        for i, (data, control) in enumerate(fragments):
            last = i == len(fragments) - 1
            wire += client_frame(OP_BINARY if i == 0 else OP_CONT, data, fin=last)
            expected_stream += data
            if control is not None:
                wire += client_frame(control[0], control[1])
                expected_controls.append(Control(*control))
    reader = FrameReader(max_size=100_000)
    items = read_all(reader, split(bytes(wire), cuts))
    assert b"".join(i for i in items if isinstance(i, bytes)) == bytes(expected_stream)
    assert [i for i in items if isinstance(i, Control)] == expected_controls
    assert all(i for i in items if isinstance(i, bytes))  # no empty payloads


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_arbitrary_bytes_either_decode_or_raise_a_frame_error(data: bytes, cuts: list[int]) -> None:
    reader = FrameReader(max_size=1000)
    try:
        read_all(reader, split(data, cuts))
    except FrameError as err:
        assert err.code in (CLOSE_PROTOCOL_ERROR, CLOSE_TOO_BIG)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (client_frame(OP_BINARY, b"x", mask=False), CLOSE_PROTOCOL_ERROR),
        (client_frame(OP_BINARY, b"x", rsv=0x40), CLOSE_PROTOCOL_ERROR),
        (client_frame(0x3, b"x"), CLOSE_PROTOCOL_ERROR),
        (client_frame(OP_PING, b"x" * 126), CLOSE_PROTOCOL_ERROR),
        (client_frame(OP_PING, b"x", fin=False), CLOSE_PROTOCOL_ERROR),
        (client_frame(OP_CONT, b"x"), CLOSE_PROTOCOL_ERROR),
        (
            client_frame(OP_BINARY, b"x", fin=False) + client_frame(OP_BINARY, b"y"),
            CLOSE_PROTOCOL_ERROR,
        ),
        (client_frame(OP_BINARY, b"x" * 101), CLOSE_TOO_BIG),
        (
            client_frame(OP_BINARY, b"x" * 60, fin=False) + client_frame(OP_CONT, b"y" * 41),
            CLOSE_TOO_BIG,
        ),
    ],
)
def test_rule_breaking_frames_raise_with_their_close_code(frame: bytes, code: int) -> None:
    with pytest.raises(FrameError) as raised:
        read_all(FrameReader(max_size=100), [frame])
    assert raised.value.code == code


def test_an_oversize_message_is_refused_from_its_head_alone() -> None:
    head = client_frame(OP_BINARY, b"x" * 70_000)[:14]
    with pytest.raises(FrameError) as raised:
        read_all(FrameReader(max_size=65_536), [head])
    assert raised.value.code == CLOSE_TOO_BIG


def test_text_is_reported_without_its_payload() -> None:
    items = read_all(FrameReader(100), [client_frame(OP_TEXT, b"hello")])
    assert items == [Control(OP_TEXT, b"")]
    fragmented = client_frame(OP_TEXT, b"he", fin=False) + client_frame(OP_CONT, b"llo")
    items = read_all(FrameReader(100), [fragmented])
    assert items == [Control(OP_TEXT, b""), Control(OP_TEXT, b"")]


def test_server_frames_and_close_payloads() -> None:
    assert frame_head(5) == b"\x82\x05"
    assert frame_head(300) == b"\x82\x7e\x01\x2c"
    assert frame_head(70_000) == b"\x82\x7f" + struct.pack("!Q", 70_000)
    assert frame_head(2, OP_CLOSE) == b"\x88\x02"
    payload = close_payload(1009, "é" * 100)
    assert len(payload) <= 125
    code, reason = parse_close(payload)
    assert code == 1009 and set(reason) == {"é"}
    assert parse_close(b"") == (1005, "")
