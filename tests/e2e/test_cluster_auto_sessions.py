"""An agent with ``sessions = auto`` behind a plain load balancer holds one session on each
node of a three-node cluster, so every request is served by the node it reached: none is
forwarded to another node; and when a fourth node joins, it holds one there too (real ``csc
serve`` processes, Redis, PostgreSQL and HAProxy)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from tests.support.cluster import ClusterProcs, admin_sessions
from tests.support.haproxy import HaproxyProc
from tests.support.procs import (
    CscProc,
    ProcFactory,
    UpstreamProc,
    http_request,
    tunnel_url,
    wait_alias_online,
    wait_until,
)
from tests.support.redis import RedisTopology
from tests.support.upstream import SMALL_BODY

ALIAS = "acme@example.com"
NODES = ("A", "B", "C")
REQUESTS = 60


def _active_nodes(node: CscProc, token: str) -> list[str]:
    return sorted(v["node"] for v in admin_sessions(node, token) if v.get("state") == "active")


def _wait_one_session_on_each(node: CscProc, token: str, names: Sequence[str]) -> None:
    wait_until(
        lambda: _active_nodes(node, token) == sorted(names),
        30,
        0.1,
        message=f"one active session on each of {', '.join(names)}",
    )


def _lookups(node: CscProc, result: str) -> float:
    status, _, body = http_request(node.metrics_url)
    assert status == 200
    found = re.search(rf'^csc_route_lookups_total{{result="{result}"}} (\S+)$', body.decode(), re.M)
    assert found is not None, body[:500]
    return float(found.group(1))


def test_auto_sessions_put_one_session_on_each_node_and_nothing_is_forwarded(
    procs: ProcFactory,
    upstream_proc: UpstreamProc,
    redis_single: RedisTopology,
    postgres_url: str,
    haproxy: Callable[..., HaproxyProc],
) -> None:
    cluster = ClusterProcs(procs, redis_single.url, postgres_url)
    for name in NODES:
        cluster.start_node(name)
    lb = haproxy([cluster.nodes[name].ready["http"] for name in NODES])
    for name in NODES:
        lb.wait_backend_state(cluster.nodes[name].ready["http"], "UP")
    agent = procs.agent(
        lb.http_url, cluster.token("acme", ALIAS), upstream_proc.http_url, sessions="auto"
    )
    for name in NODES:
        wait_alias_online(cluster.nodes[name].http_url, ALIAS)
    a = cluster.nodes["A"]
    _wait_one_session_on_each(a, cluster.admin_token, NODES)
    assert "3 sessions (sessions = auto)" in "".join(agent.logs())
    before = {name: _lookups(cluster.nodes[name], "remote") for name in NODES}
    for i in range(REQUESTS):  # round robin over the three nodes
        status, _, body = http_request(tunnel_url(lb.http_url, ALIAS, f"/small?i={i}"))
        assert (status, body) == (200, SMALL_BODY)
    assert {name: _lookups(cluster.nodes[name], "remote") for name in NODES} == before
    assert sum(_lookups(cluster.nodes[name], "local") for name in NODES) >= REQUESTS

    # a fourth node joins: the nodes tell the agent's sessions (CLUSTER, protocol 1.2) and it
    # adds a session there at once; its WELCOMEs alone had said three nodes for good
    cluster.start_node("D")
    every = (*NODES, "D")
    lb.set_backends([cluster.nodes[name].ready["http"] for name in every])
    lb.wait_backend_state(cluster.nodes["D"].ready["http"], "UP")
    _wait_one_session_on_each(a, cluster.admin_token, every)
    assert "4 sessions (sessions = auto)" in "".join(agent.logs())
