"""Bounded JSON bodies: the depth scan ignores brackets in strings, refusals are BadJson."""

from __future__ import annotations

import pytest

from portal.jsonbody import BadJson, check_text, nesting_depth, parse_json_body


@pytest.mark.parametrize(
    ("raw", "depth"),
    [
        (b"1", 0),
        (b"{}", 1),
        (b'{"a": [1, {"b": []}]}', 4),
        (b'{"a": "[[[[{{{{"}', 1),
        (b'{"a": "\\"[[["}', 1),
        (b"[" * 50_000, 50_000),
    ],
)
def test_nesting_depth(raw: bytes, depth: int) -> None:
    assert nesting_depth(raw) == depth


@pytest.mark.parametrize(
    "raw", [b"[" * 30_000 + b"]" * 30_000, b"x" * 101, b"{", b"\xff", b'"\\ud800'], ids=repr
)
def test_refusals_are_bad_json(raw: bytes) -> None:
    with pytest.raises(BadJson):
        parse_json_body(raw, max_bytes=100_000 if raw[:1] != b"x" else 100, max_depth=4)


def test_within_bounds_decodes() -> None:
    assert parse_json_body(b'{"a": ["[["]}', max_bytes=100, max_depth=2) == {"a": ["[["]}


@pytest.mark.parametrize(
    ("value", "printable"), [("\ud800", False), ("a\x00", False), ("a\n", True)]
)
def test_check_text_refuses(value: str, printable: bool) -> None:
    with pytest.raises(BadJson):
        check_text(value, "user", printable=printable)
