"""Fuzz target: the OPEN_OK response head as the CSC parses it (``csc.relay.http_ingress._parse_head``).

A hostile agent writes the head: ``status``, ``reason`` and ``headers``. Checks: the parser
returns a status in 100..999, a reason without CR/LF, no hop-by-hop header and a non-negative
length, or raises ``UpstreamError`` (502 "the agent sent an invalid response head"); nothing
else escapes.

A Content-Length that is not ASCII digits (``"²"``, other scripts' digits such as ``"١٢"``, more
than 19 digits) is an invalid head: ``int()`` would raise on some and misread others.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csc.relay.http_ingress import _parse_head
from shared.errors import UpstreamError
from shared.headers import HOP_BY_HOP
from tests.fuzz.budget import fuzz

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
ascii_lengths = st.sampled_from(["0", "12", " 12", "-1", "1e3", "0x10", "", "1" * 19])
headers = st.lists(
    st.tuples(
        st.sampled_from(["Content-Length", "Connection", "Transfer-Encoding", "X-A", "a:b", ""])
        | st.text(max_size=6),
        ascii_lengths | st.text(alphabet=st.characters(max_codepoint=127), max_size=8),
    ).map(list),
    max_size=5,
)
heads = st.fixed_dictionaries(
    {},
    optional={
        "status": st.integers(-1, 1001) | json_values,
        "reason": st.sampled_from(["OK", "a\r\nb", ""]) | json_values,
        "headers": headers | json_values,
    },
)


def check(head: dict[str, Any]) -> None:
    try:
        status, reason, fields, length = _parse_head(head)
    except UpstreamError:
        return
    assert 100 <= status <= 999
    assert reason is None or ("\r" not in reason and "\n" not in reason)
    assert not {name.lower() for name, _ in fields} & HOP_BY_HOP
    assert "content-length" not in {name.lower() for name, _ in fields}
    assert length is None or length >= 0


@fuzz(400)
@given(head=heads)
def test_open_ok_head_is_parsed_or_refused_as_upstream_error(head: dict[str, Any]) -> None:
    check(head)


@pytest.mark.parametrize("value", ["\u00b2", "1" * 5000, "\u0661\u0662"])
def test_open_ok_content_length_must_be_ascii_digits(value: str) -> None:
    try:
        _, _, _, length = _parse_head({"status": 200, "headers": [["Content-Length", value]]})
    except UpstreamError:
        return
    assert length is None  # not a length: the CSC must not frame the body by it
