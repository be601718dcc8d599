"""Spreading the agent's sessions over distinct CSC nodes: pure policy, no I/O, no clock.

A CSC cluster sits behind a plain load balancer, so where a new session lands is chance. The
WELCOME names the node (``node``) and, in a cluster, how many live nodes accept agents
(``cluster_nodes``; absent means one); a node of protocol 1.2 or later also tells each later
change of that count (CLUSTER). The agent wants its N sessions on as many distinct nodes
as the cluster has, so that losing one node never takes the tenant offline. The design:

1. **Re-dial a duplicate at once.** When a session comes up on a node that another live
   session of this agent already holds, and the WELCOME's ``cluster_nodes`` is larger than the
   number of distinct nodes the agent's live sessions hold, the slot sends GOAWAY on the new
   session (before it opens any stream, so the CSC stops routing to it), closes it (1001) and
   dials again after a short jittered delay (:attr:`SpreadPolicy.redial_min` …
   ``redial_max``), not the reconnect backoff. At most :attr:`SpreadPolicy.max_redials` times
   in a row.
2. **Then keep it.** After that many, the slot keeps the duplicate: being connected beats
   being spread. Any kept session resets the count.
3. **Move it later, make-before-break.** A slot holding a duplicate dials a replacement about
   every :attr:`SpreadPolicy.move_interval` (jittered ±25 %), and at once when the cluster
   grows, while the cluster's size (:class:`ClusterView`) is larger than the distinct nodes
   held. Nodes of protocol 1.2 or later tell their sessions each change of their count (the
   CLUSTER frame), so a node that joins, or returns after a rolling restart, is known at
   once, and a cluster that shrank stops the moves. If the replacement lands on a node no
   other session holds, it takes over and the duplicate drains (GOAWAY, its streams finish,
   then it closes); otherwise the replacement is closed and the duplicate keeps serving.

Sessions draining after a GOAWAY (either side's) do not count as live: they are going away.
Without a ``node`` in the WELCOME, or with ``cluster_nodes`` absent or 1, nothing changes.

With ``sessions = auto`` the agent also chooses N: :func:`auto_sessions`, one per node of the
cluster, so that through a plain load balancer every node holds a session of the tenant and no
request needs forwarding to another node. It adds sessions as soon as the cluster grows, and
lets the extra ones go (GOAWAY, drained) once it has been smaller for
:attr:`SpreadPolicy.shrink_after`: a rolling restart, which takes each node out for a while,
costs no session.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class SpreadPolicy:
    """Timing of re-dials and moves (seconds)."""

    redial_min: float = 0.05
    redial_max: float = 0.25
    max_redials: int = 8
    move_interval: float = 30.0
    #: ``sessions = auto``: how long the cluster must have been smaller before sessions go
    shrink_after: float = 300.0

    def __post_init__(self) -> None:
        if not 0 <= self.redial_min <= self.redial_max:
            raise ValueError("need 0 <= redial_min <= redial_max")
        if self.max_redials < 0 or self.move_interval <= 0 or self.shrink_after <= 0:
            raise ValueError("need max_redials >= 0, move_interval > 0 and shrink_after > 0")

    def redial_delay(self, rand: float) -> float:
        """The pause before re-dialling a duplicate; ``rand`` is uniform in [0, 1)."""
        return self.redial_min + rand * (self.redial_max - self.redial_min)

    def move_delay(self, rand: float) -> float:
        """The pause before the next attempt to move a kept duplicate (interval ±25 %)."""
        return self.move_interval * (0.75 + rand / 2)


def welcome_node(welcome: Mapping[str, Any]) -> str | None:
    """The node id a WELCOME names, or None when it names none."""
    node = welcome.get("node")
    return node if isinstance(node, str) and node else None


def welcome_cluster_nodes(welcome: Mapping[str, Any]) -> int:
    """The WELCOME's ``cluster_nodes``: a positive integer, else 1 (a single node)."""
    count = welcome.get("cluster_nodes")
    if isinstance(count, int) and not isinstance(count, bool) and count > 1:
        return count
    return 1


def is_duplicate(node: str | None, others: Iterable[str | None], cluster_nodes: int) -> bool:
    """Whether a session on ``node`` should move: another live session (``others``: their
    nodes) holds ``node`` and the cluster has more nodes than the distinct nodes held."""
    held = {n for n in others if n is not None}
    return node is not None and node in held and cluster_nodes > len(held)


class Verdict(enum.Enum):
    KEEP = "keep"  # on a node of its own, or nothing to gain: serve it
    REDIAL = "redial"  # a duplicate: close it and dial again after redial_delay
    KEEP_DUPLICATE = "keep_duplicate"  # re-dialled enough: serve it, move it later


@dataclass(slots=True)
class SlotSpread:
    """One slot's count of re-dials in a row."""

    policy: SpreadPolicy
    redials: int = 0

    def on_session_up(
        self, node: str | None, others: Iterable[str | None], cluster_nodes: int
    ) -> Verdict:
        if not is_duplicate(node, others, cluster_nodes):
            self.redials = 0
            return Verdict.KEEP
        if self.redials < self.policy.max_redials:
            self.redials += 1
            return Verdict.REDIAL
        self.redials = 0
        return Verdict.KEEP_DUPLICATE


@dataclass(slots=True)
class ClusterView:
    """What the agent knows of the cluster's size (its live nodes that take agents).

    A node of protocol 1.2 or later tells each session its count in the WELCOME and again,
    in a CLUSTER frame, whenever the count changes. The size is the largest count the live
    sessions on such nodes were last told: nodes agree within a heartbeat, and the largest,
    so that one node's stale count never hides a node that joined; it shrinks once they all
    say so. While no session is live it is the last size known.

    An older node says its count only in the WELCOME. After a rolling restart every session
    may sit on the node that stayed up, whose WELCOMEs said one node, and the restarted
    node's return is told to no one; so the largest count such a WELCOME reported stays in
    the size (:attr:`older`) for the agent's life, as before 1.2.
    """

    #: the largest ``cluster_nodes`` of a WELCOME from a node that tells no change (< 1.2)
    older: int = 1
    #: the size the live sessions on nodes of 1.2 or later gave last
    last: int = 1

    def saw(self, welcome: Mapping[str, Any], *, announces: bool) -> int:
        """Record a WELCOME (``announces``: its node tells changes); return its count."""
        count = welcome_cluster_nodes(welcome)
        if not announces:
            self.older = max(self.older, count)
        return count

    def update(self, told: Iterable[int]) -> int:
        """The size now; ``told``: the count each live session on a node that tells changes
        was given last."""
        counts = list(told)
        if counts:
            self.last = max(counts)
        return max(self.last, self.older)


def auto_sessions(largest: int, ceiling: int, least: int) -> int:
    """The sessions ``sessions = auto`` wants: one per node of the largest cluster seen
    (``largest``), at least ``least``, at most ``ceiling`` (the most an agent holds, or fewer
    once the tenant's session limit refused a session)."""
    return max(least, min(largest, ceiling))


def replacement_is_better(
    new_node: str | None, old_node: str | None, others: Iterable[str | None]
) -> bool:
    """Whether a replacement on ``new_node`` should take over from the duplicate on
    ``old_node``; ``others`` are the nodes of the live sessions other than these two."""
    return new_node is not None and new_node != old_node and new_node not in set(others)
