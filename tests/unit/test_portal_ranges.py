"""Byte ranges and If-Range for package downloads (pure functions, property-tested)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portal.ranges import ByteRange, RangeNotSatisfiable, if_range_allows, parse_range

ETAG = '"' + "a" * 64 + '"'


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-", 10, ByteRange(0, 9)),
        ("bytes=4-", 10, ByteRange(4, 9)),
        ("bytes=9-", 10, ByteRange(9, 9)),
        ("bytes=2-5", 10, ByteRange(2, 5)),
        ("bytes=2-500", 10, ByteRange(2, 9)),
        ("bytes=-3", 10, ByteRange(7, 9)),
        ("bytes=-30", 10, ByteRange(0, 9)),
        (" Bytes = 1-2 ", 10, ByteRange(1, 2)),
        (None, 10, None),
        ("", 10, None),
        ("items=0-", 10, None),
        ("bytes=0-1,3-4", 10, None),
        ("bytes=5-2", 10, None),
        ("bytes=-", 10, None),
        ("bytes=a-", 10, None),
        ("bytes=1-2-3", 10, None),
        ("bytes=" + "9" * 30 + "-", 10, None),
    ],
)
def test_parse_range(header: str | None, size: int, expected: ByteRange | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"),
    [("bytes=10-", 10), ("bytes=11-20", 10), ("bytes=-0", 10), ("bytes=0-", 0), ("bytes=-5", 0)],
)
def test_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, size)


def test_content_range() -> None:
    assert ByteRange(4, 9).content_range(10) == "bytes 4-9/10"
    assert ByteRange(4, 9).length == 6


@given(st.integers(0, 10**12), st.integers(0, 10**12), st.one_of(st.none(), st.integers(0, 10**12)))
def test_any_answer_lies_inside_the_file(size: int, first: int, last: int | None) -> None:
    header = f"bytes={first}-" + ("" if last is None else str(last))
    try:
        got = parse_range(header, size)
    except RangeNotSatisfiable:
        assert first >= size
        return
    if got is None:
        assert last is not None and last < first
        return
    assert 0 <= got.start == first <= got.end < size
    assert got.end == (size - 1 if last is None else min(last, size - 1))


@given(st.text(max_size=40), st.integers(0, 1000))
def test_never_raises_anything_else(header: str, size: int) -> None:
    try:
        got = parse_range(header, size)
    except RangeNotSatisfiable:
        return
    assert got is None or 0 <= got.start <= got.end < size


def test_if_range() -> None:
    assert if_range_allows(None, ETAG)
    assert if_range_allows(ETAG, ETAG)
    assert if_range_allows(f" {ETAG} ", ETAG)
    assert not if_range_allows('"other"', ETAG)
    assert not if_range_allows("W/" + ETAG, ETAG)
    assert not if_range_allows("Tue, 15 Nov 1994 08:12:31 GMT", ETAG)
