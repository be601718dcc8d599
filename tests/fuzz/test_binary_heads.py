"""Fuzz target: binary stream heads (shared/protocol/heads.py, docs/protocol.md §6.1).

Checks: every head of the binary layouts (any token names, any text without CR, LF, NUL or
surrogates) survives encode and decode unchanged; an arbitrary head either stays JSON (the
encoder returns None) or round-trips; arbitrary bytes, truncations and byte flips of valid heads
decode to a head or raise ``ProtocolError`` only (a truncation always raises); a 1.1 side that
gets any binary OPEN payload opens a stream or ends the link with ``ProtocolError``, nothing
else; a relaying node's peek at a forwarded OPEN gives its alias and tenant and, byte for byte,
the OPEN the agent would get from the head without its tenant, and arbitrary bytes give that
or None, never an exception.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from shared.errors import ProtocolError
from shared.headers import header_pairs
from shared.protocol import FrameType, LinkSettings, StreamOpened
from shared.protocol.codec import FLAG_BINARY, encode_frame
from shared.protocol.heads import (
    RAW_OPEN,
    decode_answer,
    decode_open,
    encode_answer,
    encode_open,
    peek_open,
)
from tests.fuzz.budget import fuzz, only
from tests.unit.test_mux import Pair

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
tokens = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=12)
texts = st.text(
    alphabet=st.characters(blacklist_characters="\r\n\x00", blacklist_categories=("Cs",)),
    max_size=20,
)
pairs = st.lists(st.tuples(tokens, texts), max_size=8)
requests = st.fixed_dictionaries(
    {
        "kind": st.just("http"),
        "alias": texts,
        "client": texts,
        "request_id": texts,
        "method": tokens,
        "target": texts,
        "headers": pairs,
        "body": st.booleans(),
    },
    optional={"tenant": texts},
)
tcps = st.fixed_dictionaries(
    {"kind": st.just("tcp"), "alias": texts, "client": texts, "request_id": texts},
    optional={"tenant": texts},
)
responses = st.fixed_dictionaries(
    {"status": st.integers(100, 999), "reason": texts, "headers": pairs}
)
anything = st.none() | st.booleans() | st.integers() | st.text(max_size=6) | st.lists(texts)
#: valid heads with one member replaced, removed or added
mutated = st.tuples(
    requests | tcps | responses,
    st.sampled_from(["kind", "method", "status", "headers", "body", "reason", "extra", "tenant"]),
    anything | st.lists(st.lists(st.text(max_size=4), max_size=3), max_size=3),
)


@fuzz(300)
@given(head=requests | tcps)
def test_open_heads_round_trip(head: dict[str, Any]) -> None:
    payload = encode_open(head)
    assert payload is not None
    decoded = decode_open(payload)
    assert decoded == head
    if "headers" in decoded:
        assert header_pairs(decoded["headers"]) == head["headers"]


@fuzz(300)
@given(head=responses)
def test_answer_heads_round_trip(head: dict[str, Any]) -> None:
    payload = encode_answer(head)
    assert payload is not None
    assert decode_answer(payload) == head


@fuzz(400)
@given(case=mutated)
def test_any_head_stays_json_or_round_trips(case: tuple[dict[str, Any], str, Any]) -> None:
    head, key, value = case
    head = (
        {**head, key: value} if value is not None else {k: v for k, v in head.items() if k != key}
    )
    for encode, decode in ((encode_open, decode_open), (encode_answer, decode_answer)):
        payload = encode(head)
        if payload is None:
            continue
        decoded = decode(payload)
        plain = (
            {**head, "headers": [tuple(p) for p in head["headers"]]} if "headers" in head else head
        )
        assert decoded == plain


@fuzz(500)
@given(data=st.binary(max_size=80))
def test_arbitrary_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    only((ProtocolError,), decode_open, data)
    only((ProtocolError,), decode_answer, data)
    # with a valid prefix, so that the fields themselves are fuzzed
    for prefix in (b"\x01\x01\x00\x00\x00\x01", b"\x03\x02\x00\x00\x00\x00"):
        only((ProtocolError,), decode_open, prefix + data)
    only((ProtocolError,), decode_answer, b"\x02\x00\x00\xc8\x00\x01" + data)


@fuzz(300)
@given(head=requests | tcps | responses, cut=st.integers(0, 10_000))
def test_every_truncation_is_a_protocol_error(head: dict[str, Any], cut: int) -> None:
    decode = decode_answer if "status" in head else decode_open
    payload = (encode_answer if "status" in head else encode_open)(head)
    assert payload is not None
    error = only((ProtocolError,), decode, payload[: cut % len(payload)])
    assert isinstance(error, ProtocolError)


@fuzz(300)
@given(head=requests | tcps | responses, at=st.integers(0, 10_000), byte=st.integers(0, 255))
def test_a_flipped_byte_decodes_or_raises_protocol_error(
    head: dict[str, Any], at: int, byte: int
) -> None:
    decode = decode_answer if "status" in head else decode_open
    payload = bytearray((encode_answer if "status" in head else encode_open)(head) or b"")
    payload[at % len(payload)] = byte
    only((ProtocolError,), decode, bytes(payload))


@fuzz(200)
@given(data=st.binary(max_size=60) | requests.map(lambda h: encode_open(h) or b""))
def test_a_1_1_side_opens_a_stream_or_ends_the_link(data: bytes) -> None:
    pair = Pair(LinkSettings(), LinkSettings())
    pair.handshake()
    pair.take(pair.client)
    error = only(
        (ProtocolError,),
        pair.client.receive_data,
        encode_frame(FrameType.OPEN, FLAG_BINARY, 2, data),
        pair.now,
    )
    if error is None:
        (event,) = pair.client.events()
        assert isinstance(event, StreamOpened)
    else:
        assert pair.client.state.value == "closed"


@fuzz(300)
@given(head=requests | tcps, tenant=texts)
def test_a_peek_at_a_forwarded_open_passes_on_the_agents_bytes(
    head: dict[str, Any], tenant: str
) -> None:
    forwarded = {**head, "tenant": tenant}
    payload = encode_open(forwarded)
    assert payload is not None
    peeked = peek_open(memoryview(payload))
    assert peeked is not None
    assert (peeked["kind"], peeked["alias"], peeked["tenant"]) == (
        head["kind"],
        head["alias"],
        tenant,
    )
    assert peeked["body"] is bool(head.get("body", False))
    without = {k: v for k, v in head.items() if k != "tenant"}
    assert peeked[RAW_OPEN] == encode_open(without)
    assert encode_open(peeked) == peeked[RAW_OPEN]  # sent on as it is
    # an OPEN without a tenant (an agent's own) is not peeked at
    assert peek_open(encode_open(without) or b"") is None


@fuzz(500)
@given(data=st.binary(max_size=80))
def test_a_peek_at_arbitrary_bytes_gives_fields_or_none(data: bytes) -> None:
    for prefix in (b"", b"\x01\x03\x00\x00\x00\x01", b"\x03\x02\x00\x00\x00\x00"):
        peeked = peek_open(prefix + data)  # never raises
        if peeked is not None:
            assert isinstance(peeked["alias"], str) and isinstance(peeked["tenant"], str)
            assert type(peeked[RAW_OPEN]) is bytes
