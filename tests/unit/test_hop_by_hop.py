"""shared.headers.strip_hop_by_hop: RFC 9110 §7.6.1 hop-by-hop fields and the fields a
Connection header names are dropped; everything else is kept, in order, unchanged."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shared.headers import HOP_BY_HOP, strip_hop_by_hop

names = st.sampled_from(
    ["Connection", "connection", "X-A", "x-a", "Keep-Alive", "Host", "TE", "X-B"]
)
values = st.sampled_from(["x-a", "X-B, keep-alive", "close", "", " x-b ,te", "v"])


def test_examples() -> None:
    headers = [("Host", "h"), ("Connection", "X-Trace, close"), ("x-trace", "1"), ("TE", "t")]
    assert strip_hop_by_hop(headers) == [("Host", "h")]
    assert strip_hop_by_hop([("X-A", "1"), ("x-a", "2")]) == [("X-A", "1"), ("x-a", "2")]
    assert strip_hop_by_hop([]) == []


@given(st.lists(st.tuples(names, values), max_size=8))
def test_drops_exactly_the_hop_by_hop_fields(headers: list[tuple[str, str]]) -> None:
    named = set()
    for name, value in headers:
        if name.lower() == "connection":
            named |= {token.strip().lower() for token in value.split(",")}
    kept = strip_hop_by_hop(iter(headers))  # any iterable
    assert kept == [(n, v) for n, v in headers if n.lower() not in HOP_BY_HOP | named]
