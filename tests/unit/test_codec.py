"""Frame codec of the agent link (docs/protocol.md §2): exact bytes, round trips, typed errors."""

from __future__ import annotations

import re
import struct
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import (
    ERRORS,
    CSCError,
    FrameTooLarge,
    ProtocolError,
    VersionUnsupported,
)
from shared.protocol import VERSION, Frame, FrameDecoder, FrameType, encode_frame
from shared.protocol.codec import (
    FLAG_ACK,
    FLAG_FIN,
    HARD_MAX_PAYLOAD,
    HEADER_SIZE,
    MAX_STREAM_ID,
    decode_json,
    decode_u32,
    encode_header,
    encode_json,
    encode_u32,
)

MAX = 4096
HEADER = struct.Struct("!BBBBII")

# The spec restated (docs/protocol.md §2), independently of the codec's private tables.
LINK_TYPES = {
    FrameType.HELLO,
    FrameType.WELCOME,
    FrameType.GOAWAY,
    FrameType.PING,
    FrameType.CLUSTER,
}
ALLOWED_FLAGS = {t: 0 for t in FrameType} | {
    FrameType.DATA: 0x01,
    FrameType.PING: 0x01,
    FrameType.OPEN: 0x01,  # binary head (1.1)
    FrameType.OPEN_OK: 0x01,
}
FIXED_SIZES = {FrameType.WINDOW: 4, FrameType.PING: 8, FrameType.FIN: 0}


def raw(version: int, ftype: int, flags: int, reserved: int, sid: int, length: int) -> bytes:
    return HEADER.pack(version, ftype, flags, reserved, sid, length)


def as_tuples(frames: list[Frame]) -> list[tuple[int, int, int, bytes]]:
    return [(f.type, f.flags, f.stream_id, bytes(f.payload)) for f in frames]


# -- exact byte vectors ------------------------------------------------------------------------


def test_version_string() -> None:
    assert VERSION == "1.2"
    assert HEADER_SIZE == 12


@pytest.mark.parametrize(
    ("ftype", "value"),
    [
        (FrameType.HELLO, 1),
        (FrameType.WELCOME, 2),
        (FrameType.OPEN, 3),
        (FrameType.OPEN_OK, 4),
        (FrameType.OPEN_FAIL, 5),
        (FrameType.DATA, 6),
        (FrameType.WINDOW, 7),
        (FrameType.FIN, 8),
        (FrameType.RST, 9),
        (FrameType.GOAWAY, 10),
        (FrameType.PING, 11),
        (FrameType.CLUSTER, 12),
    ],
)
def test_type_numbers_are_stable(ftype: FrameType, value: int) -> None:
    assert int(ftype) == value


def test_flag_values() -> None:
    assert FLAG_FIN == 0x01
    assert FLAG_ACK == 0x01


@pytest.mark.parametrize(
    ("frame", "hexbytes"),
    [
        (
            encode_frame(FrameType.DATA, FLAG_FIN, 1, b"hi"),
            "01 06 01 00 00000001 00000002 6869",
        ),
        (encode_frame(FrameType.DATA, 0, 2, b""), "01 06 00 00 00000002 00000000"),
        (
            encode_frame(FrameType.WINDOW, 0, 0x01020304, encode_u32(0x40000)),
            "01 07 00 00 01020304 00000004 00040000",
        ),
        (encode_frame(FrameType.FIN, 0, 0xFFFFFFFF, b""), "01 08 00 00 ffffffff 00000000"),
        (
            encode_frame(FrameType.PING, FLAG_ACK, 0, b"\x00\x01\x02\x03\x04\x05\x06\x07"),
            "01 0b 01 00 00000000 00000008 0001020304050607",
        ),
        (
            encode_frame(FrameType.HELLO, 0, 0, b'{"a":1}'),
            "01 01 00 00 00000000 00000007 7b2261223a317d",
        ),
        (
            encode_frame(FrameType.RST, 0, 6, b"{}"),
            "01 09 00 00 00000006 00000002 7b7d",
        ),
    ],
)
def test_encode_exact_bytes(frame: bytes, hexbytes: str) -> None:
    assert frame == bytes.fromhex(hexbytes.replace(" ", ""))


def test_encode_header_matches_encode_frame() -> None:
    payload = b"x" * 300
    assert encode_header(FrameType.DATA, 0, 9, 300) + payload == encode_frame(
        FrameType.DATA, 0, 9, payload
    )


def test_u32_helpers() -> None:
    assert encode_u32(1) == b"\x00\x00\x00\x01"
    assert encode_u32(2**32 - 1) == b"\xff\xff\xff\xff"
    assert decode_u32(memoryview(b"\x00\x04\x00\x00")) == 0x40000


def test_json_is_compact_utf8() -> None:
    assert encode_json({"alias": "ä@x", "n": [1, 2]}) == '{"alias":"ä@x","n":[1,2]}'.encode()
    assert decode_json(memoryview(b'{"a":"\xc3\xa4"}'), "X") == {"a": "ä"}


def test_decode_exact_bytes() -> None:
    data = bytes.fromhex(
        "01 06 01 00 00000001 00000002 6869"  # DATA+FIN stream 1 "hi"
        "01 08 00 00 00000003 00000000"  # FIN stream 3
        "01 07 00"  # the start of a third frame (fromhex skips spaces)
    )
    decoder = FrameDecoder(MAX)
    assert as_tuples(decoder.feed(data)) == [(6, 1, 1, b"hi"), (8, 0, 3, b"")]
    assert decoder.buffered == 3


def test_payloads_are_zero_copy_views() -> None:
    data = encode_frame(FrameType.DATA, 0, 1, b"abc")
    (frame,) = FrameDecoder(MAX).feed(data)
    assert isinstance(frame.payload, memoryview)
    assert frame.payload.obj is data


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_feed_accepts_buffer_types(kind: type) -> None:
    data = encode_frame(FrameType.DATA, 0, 1, b"abc") * 2
    decoder = FrameDecoder(MAX)
    first = decoder.feed(kind(data[:5]))
    rest = decoder.feed(kind(data[5:]))
    assert first == []
    assert as_tuples(rest) == [(6, 0, 1, b"abc")] * 2


def test_partial_frames_are_buffered() -> None:
    data = encode_frame(FrameType.DATA, 0, 1, b"abcdef")
    decoder = FrameDecoder(MAX)
    assert decoder.feed(data[:3]) == []
    assert decoder.buffered == 3
    assert decoder.feed(data[3:14]) == []
    assert decoder.buffered == 14
    assert as_tuples(decoder.feed(data[14:])) == [(6, 0, 1, b"abcdef")]
    assert decoder.buffered == 0


def test_mutating_input_after_buffering_does_not_corrupt_frames() -> None:
    decoder = FrameDecoder(MAX)
    chunk = bytearray(encode_frame(FrameType.DATA, 0, 1, b"abcdef"))
    decoder.feed(chunk[:15])
    tail = bytearray(chunk[15:])
    (frame,) = decoder.feed(tail)
    tail[:] = b"zzz"
    assert bytes(frame.payload) == b"abcdef"


@pytest.mark.parametrize("bad", [0, -1, HARD_MAX_PAYLOAD + 1])
def test_decoder_rejects_bad_max_payload(bad: int) -> None:
    with pytest.raises(ValueError):
        FrameDecoder(bad)


def test_payload_of_exactly_max_is_accepted() -> None:
    (frame,) = FrameDecoder(MAX).feed(encode_frame(FrameType.DATA, 0, 1, b"x" * MAX))
    assert len(frame.payload) == MAX


def test_too_large_is_detected_from_the_header_alone() -> None:
    decoder = FrameDecoder(MAX)
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(raw(1, FrameType.DATA, 0, 0, 1, MAX + 1))
    assert info.value.code == "frame_too_large"
    assert isinstance(info.value, ProtocolError)


def test_unknown_type_is_returned_raw() -> None:
    data = raw(1, 200, 0xFF, 0, 0, 3) + b"new" + raw(1, 13, 0, 0, 7, 0)
    assert as_tuples(FrameDecoder(MAX).feed(data)) == [(200, 0xFF, 0, b"new"), (13, 0, 7, b"")]


def test_unknown_type_still_respects_max_payload() -> None:
    with pytest.raises(FrameTooLarge):
        FrameDecoder(MAX).feed(raw(1, 200, 0, 0, 0, MAX + 1))


# -- invalid headers -----------------------------------------------------------------------------


def _invalid_headers() -> list[tuple[str, bytes, type[CSCError]]]:
    cases: list[tuple[str, bytes, type[CSCError]]] = []
    for version in (0, 2, 255):
        cases.append((f"version {version}", raw(version, 6, 0, 0, 1, 0), VersionUnsupported))
    for reserved in (1, 0x80, 0xFF):
        cases.append((f"reserved {reserved}", raw(1, 6, 0, reserved, 1, 0), ProtocolError))
    cases.append(("too large", raw(1, 3, 0, 0, 1, MAX + 1), FrameTooLarge))
    cases.append(("too large link", raw(1, 1, 0, 0, 0, 2**32 - 1), FrameTooLarge))
    for ftype in FrameType:
        size = FIXED_SIZES.get(ftype, 0)
        good_sid = 0 if ftype in LINK_TYPES else 1
        for flag in (0x01, 0x02, 0x80, 0xFF):
            if flag & ~ALLOWED_FLAGS[ftype]:
                header = raw(1, ftype, flag, 0, good_sid, size)
                cases.append((f"{ftype.name} flags {flag:#x}", header, ProtocolError))
        bad_sid = 5 if ftype in LINK_TYPES else 0
        cases.append(
            (f"{ftype.name} sid {bad_sid}", raw(1, ftype, 0, 0, bad_sid, size), ProtocolError)
        )
    for ftype, size in FIXED_SIZES.items():
        sid = 0 if ftype in LINK_TYPES else 1
        for wrong in (size + 1, max(size - 1, 0) if size else 1, 100):
            if wrong != size:
                header = raw(1, ftype, 0, 0, sid, wrong)
                cases.append((f"{ftype.name} size {wrong}", header, ProtocolError))
    return cases


INVALID = _invalid_headers()


@pytest.mark.parametrize(("header", "error"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_header_raises_typed_error(header: bytes, error: type[CSCError]) -> None:
    # Header first, then the payload it announces: the error must come from the header alone
    # or, at the latest, once the whole frame is there.
    decoder = FrameDecoder(MAX)
    length = HEADER.unpack(header)[5]
    with pytest.raises(CSCError) as info:
        decoder.feed(header)
        decoder.feed(b"\x00" * min(length, MAX + 1))
    assert type(info.value) is error
    assert info.value.code in ERRORS


def test_version_error_says_what_to_do() -> None:
    with pytest.raises(VersionUnsupported, match=r"version 2.*speaks 1\.x"):
        FrameDecoder(MAX).feed(raw(2, 1, 0, 0, 0, 0))


def test_error_after_good_frames_in_same_chunk() -> None:
    data = encode_frame(FrameType.DATA, 0, 1, b"ok") + raw(1, FrameType.DATA, 0, 1, 1, 0)
    with pytest.raises(ProtocolError, match="reserved"):
        FrameDecoder(MAX).feed(data)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'"str"',
        b"null",
        b"\xff\xfe\x00",
        b'{"a": "\xc3"}',
        b"1" * 5000,  # int digit limit: ValueError, not JSONDecodeError
        b'{"n": ' + b"9" * 5000 + b"}",
        b"[" * 100_000,  # nesting: RecursionError
        b'{"a":' * 50_000,
    ],
    ids=lambda p: repr(p[:12]),
)
def test_decode_json_rejects_with_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="OPEN payload"):
        decode_json(memoryview(payload), "OPEN")


# -- properties ----------------------------------------------------------------------------------


@st.composite
def valid_frames(draw: st.DrawFn) -> tuple[int, int, int, bytes]:
    ftype: int = draw(st.sampled_from(list(FrameType)) | st.integers(13, 255))
    if ftype in FrameType.__members__.values():
        known = FrameType(ftype)
        flags = draw(st.sampled_from(sorted({0, ALLOWED_FLAGS[known]})))
        sid = 0 if known in LINK_TYPES else draw(st.integers(1, MAX_STREAM_ID))
        size = FIXED_SIZES.get(known)
        payload = draw(st.binary(min_size=size or 0, max_size=size if size is not None else 200))
    else:
        flags = draw(st.integers(0, 255))
        sid = draw(st.integers(0, MAX_STREAM_ID))
        payload = draw(st.binary(max_size=200))
    return ftype, flags, sid, payload


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in pairwise(points)]


@settings(max_examples=300, deadline=None)
@given(
    frames=st.lists(valid_frames(), max_size=12),
    cuts=st.lists(st.integers(0, 10_000), max_size=30),
    kind=st.sampled_from([bytes, bytearray, memoryview]),
)
def test_round_trip_under_arbitrary_chunking(
    frames: list[tuple[int, int, int, bytes]], cuts: list[int], kind: type
) -> None:
    data = b"".join(encode_frame(*f) for f in frames)
    decoder = FrameDecoder(HARD_MAX_PAYLOAD)
    out: list[Frame] = []
    for chunk in chunked(data, cuts):
        out += decoder.feed(kind(chunk))
    assert as_tuples(out) == frames
    assert decoder.buffered == 0


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(valid_frames(), min_size=1, max_size=6))
def test_byte_at_a_time(frames: list[tuple[int, int, int, bytes]]) -> None:
    data = b"".join(encode_frame(*f) for f in frames)
    decoder = FrameDecoder(HARD_MAX_PAYLOAD)
    out: list[Frame] = []
    for i in range(len(data)):
        out += decoder.feed(data[i : i + 1])
    assert as_tuples(out) == frames


def assert_only_typed_errors(decoder: FrameDecoder, chunks: list[bytes]) -> None:
    try:
        for chunk in chunks:
            decoder.feed(chunk)
    except (ProtocolError, VersionUnsupported):
        pass  # anything else (struct.error, ValueError, IndexError...) fails the test


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_arbitrary_bytes_raise_only_typed_errors(data: bytes, cuts: list[int]) -> None:
    assert_only_typed_errors(FrameDecoder(64), chunked(data, cuts))


plausible_headers = st.builds(
    raw,
    st.sampled_from([1, 1, 1, 0, 2]),
    st.integers(0, 15) | st.integers(0, 255),
    st.sampled_from([0, 0, 1, 2, 0x80]),
    st.sampled_from([0, 0, 0, 1]),
    st.sampled_from([0, 1, 2, 3, 2**32 - 1]),
    st.integers(0, 80),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts=st.lists(st.tuples(plausible_headers, st.binary(max_size=80)), max_size=6),
    cuts=st.lists(st.integers(0, 600), max_size=6),
)
def test_plausible_headers_raise_only_typed_errors(
    parts: list[tuple[bytes, bytes]], cuts: list[int]
) -> None:
    data = b"".join(h + p for h, p in parts)
    assert_only_typed_errors(FrameDecoder(64), chunked(data, cuts))


@settings(max_examples=300, deadline=None)
@given(frame=valid_frames(), index=st.integers(0, HEADER_SIZE - 1), value=st.integers(0, 255))
def test_one_corrupted_header_byte_decodes_or_raises_typed(
    frame: tuple[int, int, int, bytes], index: int, value: int
) -> None:
    data = bytearray(encode_frame(*frame))
    data[index] = value
    decoder = FrameDecoder(1024)
    try:
        frames = decoder.feed(bytes(data))
    except (ProtocolError, VersionUnsupported):
        return
    for f in frames:  # whatever got through obeys the header invariants
        if f.type in FrameType.__members__.values():
            known = FrameType(f.type)
            assert not f.flags & ~ALLOWED_FLAGS[known]
            assert (f.stream_id == 0) == (known in LINK_TYPES)
            assert FIXED_SIZES.get(known, len(f.payload)) == len(f.payload)


# -- the close-code table of docs/protocol.md §8 ------------------------------------------------


def test_protocol_doc_close_codes_match_errors_table() -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
    text = doc.read_text()
    section = text.split("## 8.", 1)[1]
    rows = re.findall(r"^\|\s*(\d{4})\s*\|([^|]*)\|", section, flags=re.M)
    documented = {int(code): set(re.findall(r"`([a-z_]+)`", codes)) for code, codes in rows}
    expected: dict[int, set[str]] = {}
    for spec in ERRORS.values():
        expected.setdefault(spec.close_code, set()).add(spec.code)
    assert documented == expected
