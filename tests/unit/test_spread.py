"""Spreading sessions over CSC nodes: the pure policy of tenant_agent/spread.py, no sleeping."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tenant_agent.spread import (
    ClusterView,
    SlotSpread,
    SpreadPolicy,
    Verdict,
    auto_sessions,
    is_duplicate,
    replacement_is_better,
    welcome_cluster_nodes,
    welcome_node,
)


def test_welcome_fields() -> None:
    assert welcome_node({"node": "csc-1"}) == "csc-1"
    assert welcome_node({}) is None
    assert welcome_node({"node": ""}) is None
    assert welcome_node({"node": 7}) is None
    assert welcome_cluster_nodes({}) == 1
    assert welcome_cluster_nodes({"cluster_nodes": 3}) == 3
    for odd in (True, 0, -2, "3", 2.0, None):
        assert welcome_cluster_nodes({"cluster_nodes": odd}) == 1


@pytest.mark.parametrize(
    ("node", "others", "cluster", "expected"),
    [
        ("a", [], 2, False),  # the first session
        ("b", ["a"], 2, False),  # a node of its own
        ("a", ["a"], 2, True),  # a second session on a, b unused
        ("a", ["a"], 1, False),  # one node: nothing to gain
        ("a", ["a", "b"], 2, False),  # three sessions on two nodes: one must share
        ("a", ["a", "b"], 3, True),
        ("a", ["a", "a"], 2, True),
        (None, ["a"], 2, False),  # a WELCOME without a node
        ("a", [None], 2, False),
    ],
)
def test_is_duplicate(
    node: str | None, others: list[str | None], cluster: int, expected: bool
) -> None:
    assert is_duplicate(node, others, cluster) is expected


def test_redials_up_to_the_bound_then_keeps_the_duplicate() -> None:
    spread = SlotSpread(SpreadPolicy(max_redials=3))
    verdicts = [spread.on_session_up("a", ["a"], 2) for _ in range(5)]
    assert verdicts == [Verdict.REDIAL] * 3 + [Verdict.KEEP_DUPLICATE, Verdict.REDIAL]


def test_a_kept_session_resets_the_count() -> None:
    spread = SlotSpread(SpreadPolicy(max_redials=2))
    assert spread.on_session_up("a", ["a"], 2) is Verdict.REDIAL
    assert spread.on_session_up("b", ["a"], 2) is Verdict.KEEP
    assert spread.redials == 0
    assert spread.on_session_up("a", ["a"], 2) is Verdict.REDIAL


def test_single_node_never_redials() -> None:
    spread = SlotSpread(SpreadPolicy())
    assert all(spread.on_session_up("a", ["a"], 1) is Verdict.KEEP for _ in range(20))


def test_zero_redials_keeps_at_once() -> None:
    spread = SlotSpread(SpreadPolicy(max_redials=0))
    assert spread.on_session_up("a", ["a"], 2) is Verdict.KEEP_DUPLICATE


@given(st.floats(0, 1, exclude_max=True))
def test_delays_stay_in_their_ranges(rand: float) -> None:
    policy = SpreadPolicy()
    assert 0.05 <= policy.redial_delay(rand) <= 0.25
    assert 22.5 <= policy.move_delay(rand) <= 37.5


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="redial_min"):
        SpreadPolicy(redial_min=1.0, redial_max=0.5)
    with pytest.raises(ValueError, match="move_interval"):
        SpreadPolicy(move_interval=0)
    with pytest.raises(ValueError, match="max_redials"):
        SpreadPolicy(max_redials=-1)


def test_cluster_view_of_older_nodes_remembers_the_largest_size() -> None:
    """Nodes before 1.2 say their count only in WELCOME: the largest one stays."""
    view = ClusterView()
    assert view.update([]) == 1  # no cluster seen yet
    assert not is_duplicate("a", ["a"], view.update([]))
    assert view.saw({"cluster_nodes": 2}, announces=False) == 2
    # a rolling restart: the node that stayed up says it is alone, both sessions land there
    assert view.saw({"cluster_nodes": 1}, announces=False) == 1
    assert view.update([]) == 2
    assert is_duplicate("a", ["a"], view.update([]))
    assert not is_duplicate("a", ["b"], view.update([]))
    assert not is_duplicate("a", ["a", "b"], view.update([]))  # as spread as two nodes allow


def test_cluster_view_of_announcing_nodes_follows_their_count() -> None:
    """Nodes of 1.2 tell every change: the size is the largest count the live sessions were
    last told, the last one known while none is live, and it shrinks with the cluster."""
    view = ClusterView()
    assert view.saw({"cluster_nodes": 3}, announces=True) == 3
    assert view.update([3, 3]) == 3
    assert view.update([3, 2]) == 3  # one node has not seen the change yet: the largest
    assert view.update([2, 2]) == 2  # the cluster shrank
    assert view.update([]) == 2  # no live session: the last size known
    assert view.update([4]) == 4  # grown, told on one session


def test_cluster_view_of_a_cluster_being_upgraded_keeps_the_older_nodes_largest() -> None:
    view = ClusterView()
    view.saw({"cluster_nodes": 3}, announces=False)
    assert view.update([2]) == 3  # the older node is never told of the change


def test_replacement_takes_over_only_on_a_node_of_its_own() -> None:
    # the duplicate on a is being replaced; the other live session is on a
    assert replacement_is_better("b", "a", ["a"])
    assert not replacement_is_better("a", "a", ["a"])
    assert not replacement_is_better(None, "a", ["a"])
    assert replacement_is_better("c", "a", ["a", "b"])
    # the other session moved meanwhile: a second session on a is no gain
    assert not replacement_is_better("a", "a", ["b"])


def test_auto_sessions_one_per_node_within_bounds() -> None:
    assert auto_sessions(1, 16, 2) == 2  # a single node: the least
    assert auto_sessions(3, 16, 2) == 3
    assert auto_sessions(40, 16, 2) == 16  # never more than an agent holds
    assert auto_sessions(5, 3, 2) == 3  # the tenant's session limit refused the fourth
    assert auto_sessions(5, 1, 2) == 2  # but never fewer than it started with
