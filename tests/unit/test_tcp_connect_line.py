"""The TCP ingress's ``CONNECT`` line reader (csc/relay/tcp_ingress.py) over arbitrary bytes and
chunking: an alias or a documented ``bad_request``, never another exception, never more read
than the line."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csc.relay.tcp_ingress import MAX_LINE, READ_LIMIT, _read_alias, parse_connect_line
from shared.errors import BadRequest


async def _read(chunks: list[bytes], eof: bool) -> tuple[str | BadRequest, bytes]:
    reader = asyncio.StreamReader(limit=READ_LIMIT)
    for chunk in chunks:
        reader.feed_data(chunk)
    if eof:
        reader.feed_eof()
    try:
        got: str | BadRequest = await _read_alias(reader, 0.05)
    except BadRequest as err:
        got = err
    rest = bytes(reader._buffer)  # type: ignore[attr-defined]
    assert reader._limit == READ_LIMIT  # type: ignore[attr-defined]  # restored
    return got, rest


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=64),
            st.sampled_from([b"CONNECT ", b"acme@example.com", b"\r\n", b"\n", b" ", b"\xff"]),
            st.binary(min_size=MAX_LINE - 8, max_size=MAX_LINE + 8),
        ),
        max_size=12,
    ),
    st.booleans(),
)
def test_only_an_alias_or_bad_request_comes_out(chunks: list[bytes], eof: bool) -> None:
    got, rest = asyncio.run(_read(chunks, eof))
    data = b"".join(chunks)
    if isinstance(got, str):
        line_end = data.index(b"\n") + 1
        assert line_end <= MAX_LINE
        assert rest == data[line_end:]  # nothing beyond the line was taken
        assert got == parse_connect_line(data[:line_end])
        assert got and got == got.strip()
    else:
        assert got.code == "bad_request"
        end = data.find(b"\n")
        if 0 <= end < MAX_LINE:  # a complete line within the limit: it was not CONNECT <alias>
            with pytest.raises(BadRequest):
                parse_connect_line(data[: end + 1])


@given(st.binary(max_size=2 * MAX_LINE))
def test_parse_connect_line_raises_only_bad_request(line: bytes) -> None:
    try:
        alias = parse_connect_line(line)
    except BadRequest:
        return
    assert line.startswith(b"CONNECT ") and alias


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b"CONNECT acme@example.com\r\n"], "acme@example.com"),
        ([b"CONN", b"ECT  a@b.c ", b"\n", b"rest"], "a@b.c"),
        ([b"x" * (MAX_LINE + 1)], "longer than"),
        ([b"CONNECT " + b"a" * MAX_LINE + b"\n"], "longer than"),
        ([b"CONNECT a"], "no CONNECT line"),
    ],
)
def test_examples(chunks: list[bytes], expected: str) -> None:
    got, _ = asyncio.run(_read(chunks, eof=False))
    assert expected in (got if isinstance(got, str) else got.message)
