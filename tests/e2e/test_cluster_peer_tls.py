"""Real ``csc serve`` processes (uvloop) link over TLS by default, and a node started with
``CSC_PEER_TLS=false`` among them links to none, each side saying why in its log
(csc/cluster/peertls.py; docs/operations.md "Running a cluster")."""

from __future__ import annotations

from tests.support.cluster import ClusterProcs
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

ALIAS = "acme@example.com"


def _log(node: CscProc) -> str:
    return node.stderr_path.read_text() + node.stdout_path.read_text()


def test_nodes_link_over_tls_and_a_plain_node_is_refused_with_a_reason(
    procs: ProcFactory,
    upstream_proc: UpstreamProc,
    redis_single: RedisTopology,
    postgres_url: str,
) -> None:
    cluster = ClusterProcs(procs, redis_single.url, postgres_url)
    a = cluster.start_node("A")
    b = cluster.start_node("B")
    plain = cluster.start_node("P", env={"CSC_PEER_TLS": "false"})
    procs.agent(a.http_url, cluster.token("acme", ALIAS), upstream_proc.http_url, sessions=1)
    for node in (b, plain):
        wait_alias_online(node.http_url, ALIAS)
    status, _, body = http_request(tunnel_url(b.http_url, ALIAS, "/bytes/1000"))
    assert status == 200 and len(body) == 1000
    assert "peer link to node A" in _log(b) and "up (TLSv1.3)" in _log(b)
    status, _, _ = http_request(tunnel_url(plain.http_url, ALIAS, "/bytes/1000"))
    assert status == 503  # portal_offline: the only node with the agent refused the link

    def said_why() -> bool:
        return "is peer_tls the same on every node?" in _log(
            plain
        ) and "peer link refused: TLS handshake failed" in _log(a)

    wait_until(said_why, 10, message="both nodes log why they did not link")
