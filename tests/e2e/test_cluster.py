"""Real ``csc serve`` processes as one cluster (Redis + PostgreSQL): streams reach an agent on
any node through any other node."""

from __future__ import annotations

import socket

from tests.support.cluster import ClusterProcs
from tests.support.procs import (
    ProcFactory,
    UpstreamProc,
    http_request,
    tunnel_url,
    wait_alias_online,
)
from tests.support.redis import RedisTopology

ALIAS = "acme@example.com"


def test_three_nodes_http_and_tcp_through_c_reach_the_agent_on_a(
    procs: ProcFactory,
    upstream_proc: UpstreamProc,
    redis_single: RedisTopology,
    postgres_url: str,
) -> None:
    cluster = ClusterProcs(procs, redis_single.url, postgres_url)
    a = cluster.start_node("A")
    cluster.start_node("B")
    c = cluster.start_node("C")
    assert a.ready["peer"] and a.ready["node"] == "A"
    token = cluster.token("acme", ALIAS)
    host, port = upstream_proc.tcp_echo_addr
    procs.agent(
        a.http_url, token, upstream_proc.http_url, tcp_upstream=f"{host}:{port}", sessions=1
    )
    wait_alias_online(c.http_url, ALIAS)
    status, _, body = http_request(tunnel_url(c.http_url, ALIAS, "/bytes/100000"))
    assert status == 200 and len(body) == 100000
    with socket.create_connection(c.tcp_addr, timeout=10) as sock:
        sock.sendall(f"CONNECT {ALIAS}\r\n".encode())
        reader = sock.makefile("rb")
        assert reader.readline() == b"OK\r\n"
        sock.sendall(b"hello cluster")
        assert reader.read(len(b"hello cluster")) == b"hello cluster"
