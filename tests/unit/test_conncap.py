"""csc/relay/conncap.py's counts against a model, over any sequence of accepts, switches to an
agent link and closes."""

from __future__ import annotations

import logging
from collections import Counter
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csc import server
from csc.relay.conncap import LOW_NODE_BOUND, MAX_LINGERING, ConnectionCounts
from shared.config import AUTO
from shared.errors import NodeFull, TooManyConnections

IPS = ["192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2", "::ffff:192.0.2.1"]
#: the address each of IPS is counted by (the two IPv6 ones share a /64, the mapped one is IPv4)
KEY = {0: 0, 1: 1, 2: 2, 3: 2, 4: 0}

ops = st.lists(
    st.one_of(
        st.tuples(st.just("accept"), st.integers(0, len(IPS) - 1)),
        st.tuples(st.just("leave"), st.integers(0, 30)),
        st.tuples(st.just("close"), st.integers(0, 30)),
    ),
    max_size=80,
)


@given(ops, st.integers(1, 4), st.one_of(st.none(), st.integers(1, 8)))
def test_counts_follow_the_connections(
    steps: list[tuple[str, int]], cap: int, node_cap: int | None
) -> None:
    refused: list[tuple[str, str]] = []
    counts = ConnectionCounts(cap, node_cap, lambda listener, why: refused.append((listener, why)))
    #: open connections: (address index, key or None once it left its address)
    open_: list[tuple[int, str | None]] = []
    for op, n in steps:
        if op == "accept":
            address = KEY[n]
            per_address = sum(1 for a, k in open_ if a == address and k is not None)
            got = counts.take(IPS[n], "http")
            if node_cap is not None and len(open_) >= node_cap:
                assert isinstance(got, NodeFull)
                assert refused[-1] == ("http", "node_connections")
            elif per_address >= cap:
                assert isinstance(got, TooManyConnections)
                assert refused[-1] == ("http", "client_connections")
            else:
                assert isinstance(got, str)
                open_.append((address, got))
        elif open_:
            i = n % len(open_)
            address, key = open_[i]
            if op == "leave" and key is not None:
                counts.leave(key)
                open_[i] = (address, None)
            elif op == "close":
                counts.close(key)
                del open_[i]
        assert counts.total == len(open_)
        live = Counter(a for a, k in open_ if k is not None)
        assert counts.addresses == len(live)  # no address kept at 0
        for index, ip in enumerate(IPS):
            assert counts.held(ip) == live[KEY[index]]


def test_lingering_is_bounded() -> None:
    counts = ConnectionCounts(1, 1)
    for _ in range(MAX_LINGERING):
        assert counts.may_linger()
    assert not counts.may_linger()
    assert counts.lingering == MAX_LINGERING


@pytest.mark.parametrize(
    ("node_cap", "warned"), [(None, False), (448, True), (LOW_NODE_BOUND, False)]
)
def test_the_start_up_log_warns_only_of_a_low_bound(
    node_cap: int | None, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """``auto`` with an unlimited open-file limit has no bound, which is no reason to warn."""
    state = SimpleNamespace(
        connections=ConnectionCounts(1024, node_cap), config=SimpleNamespace(max_connections=AUTO)
    )
    with caplog.at_level(logging.INFO, logger="csc"):
        server._log_connection_bounds(state)  # type: ignore[arg-type]
    bound = "no bound" if node_cap is None else f"at most {node_cap}"
    assert f"public and TCP listeners: {bound}; per client address: at most 1024" in caplog.text
    assert ("leaves this node" in caplog.text) is warned
