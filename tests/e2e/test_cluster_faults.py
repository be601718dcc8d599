"""A three-node cluster of real processes under load and faults.

Real ``csc serve`` nodes share one Redis server and one PostgreSQL database
(:class:`tests.support.cluster.ClusterProcs`); a real HAProxy sits in front of them where the
agent must be able to reach more than one node through one URL.

* An 8 MiB TCP echo, then a 1 GiB download, through C→A→agent arrive intact while every
  node's peak RSS stays under 150 MiB (the small HTTP/TCP round trip through C is
  tests/e2e/test_cluster.py).
* SIGKILL of a node holding one of the agent's two sessions: requests through the other two
  nodes keep succeeding; only requests a surviving node had already forwarded to the killed one
  may fail.
* SIGKILL of the node holding a single-session agent: requests succeed again within the agent's
  backoff + 2 s, and the node's routes are gone from Redis within the lease.
* A tenant's request rate holds across three nodes: admitted <= rate * t + burst.

Invariants: request loops only record (start, end, outcome); every bound below is computed from
those records after the fact, and every deadline is scaled (``scaled()``).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import redis

from csc.cluster.routes import LOOKUP_TTL
from tests.support.cluster import ClusterProcs, admin_sessions
from tests.support.haproxy import HaproxyProc
from tests.support.procs import (
    CscProc,
    ProcFactory,
    UpstreamProc,
    http_request,
    scaled,
    tunnel_url,
    wait_alias_online,
    wait_until,
)
from tests.support.redis import RedisTopology
from tests.support.upstream import body_pieces, expected_sha256

ALIAS = "acme@example.com"
TENANT = "acme"
MiB = 1024 * 1024
GiB = 1024 * MiB
DOWNLOAD = 1 * GiB
TCP_ECHO = 8 * MiB
RSS_LIMIT = 150 * MiB
#: The agent's reconnect pace in the kill tests (CSC_AGENT_BACKOFF_*), in seconds.
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 0.5
LEASE = 3.0


# --- helpers ---------------------------------------------------------------------------------


def start_three(procs: ProcFactory, redis_url: str, database_url: str) -> ClusterProcs:
    cluster = ClusterProcs(procs, redis_url, database_url, lease=f"{LEASE:g}s")
    for name in ("n1", "n2", "n3"):
        cluster.start_node(name)
    return cluster


def admin(node: CscProc, token: str, method: str, path: str, body: Any = None) -> Any:
    """One admin API call; its JSON answer (asserting a 2xx status)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    status, _, raw = http_request(
        f"{node.admin_url}/v1/admin{path}", method, data, headers, timeout=10.0
    )
    assert 200 <= status < 300, f"{method} {path}: HTTP {status} {raw[:300]!r}"
    return json.loads(raw)


def session_nodes(node: CscProc, token: str) -> list[str]:
    """The nodes of the tenant's active sessions, as ``GET /v1/admin/sessions`` lists them."""
    views = admin_sessions(node, token, TENANT)
    return sorted(v["node"] for v in views if v.get("state") == "active")


def agent_behind(haproxy: Any, cluster: ClusterProcs) -> HaproxyProc:
    """HAProxy in front of every node's HTTP port, all of them UP."""
    proxy: HaproxyProc = haproxy([n.ready["http"] for n in cluster.nodes.values()])
    for i in range(len(cluster.nodes)):
        proxy.wait_backend_state(f"n{i}", "UP")
    return proxy


@dataclass(frozen=True)
class Outcome:
    loop: str
    started: float
    ended: float
    ok: bool
    detail: str


@dataclass(eq=False)
class RequestLoop:
    """Small requests one after another to ``url`` in a thread, each outcome recorded."""

    name: str
    url: str
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"loop-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(scaled(30))

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                status, _, body = http_request(self.url, timeout=10.0)
                ok, detail = status == 200 and bool(body), f"HTTP {status} {body[:120]!r}"
            except OSError as exc:
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            self.outcomes.append(Outcome(self.name, started, time.monotonic(), ok, detail))

    def successes_after(self, moment: float) -> int:
        return sum(1 for o in list(self.outcomes) if o.ok and o.started >= moment)

    def longest_gap(self, since: float) -> float:
        """The longest time between consecutive successes' ends (or ``since``) after ``since``."""
        ends = [since] + [o.ended for o in self.outcomes if o.ok and o.ended >= since]
        return max((b - a for a, b in itertools.pairwise(ends)), default=float("inf"))


@pytest.fixture
def loops() -> Iterator[list[RequestLoop]]:
    started: list[RequestLoop] = []
    yield started
    for loop in started:
        loop.stop()


def run_loops(loops: list[RequestLoop], targets: dict[str, CscProc], per_node: int) -> None:
    for name, node in targets.items():
        for i in range(per_node):
            loop = RequestLoop(f"{name}.{i}", tunnel_url(node.http_url, ALIAS, "/small"))
            loops.append(loop)
            loop.start()


def wait_successes(loops: list[RequestLoop], after: float, count: int, timeout: float) -> None:
    wait_until(
        lambda: all(loop.successes_after(after) >= count for loop in loops),
        timeout,
        message=f"{count} successes per loop after t={after:.2f}",
    )


# --- 1. a big download and a TCP echo through C→A, in bounded memory --------------------------


async def _download(url: str) -> tuple[int, str, float]:
    started = time.monotonic()
    digest, total = hashlib.sha256(), 0
    timeout = aiohttp.ClientTimeout(total=scaled(180))
    async with aiohttp.ClientSession(timeout=timeout) as http, http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_length == DOWNLOAD
        async for chunk in resp.content.iter_chunked(MiB):
            digest.update(chunk)
            total += len(chunk)
    return total, digest.hexdigest(), time.monotonic() - started


def _tcp_echo(addr: tuple[str, int], n: int) -> tuple[int, str]:
    """``CONNECT``, then send ``n`` generated bytes from a thread while hashing the echo."""
    with socket.create_connection(addr, timeout=scaled(60)) as sock:
        sock.sendall(f"CONNECT {ALIAS}\r\n".encode())
        reader = sock.makefile("rb")
        assert reader.readline() == b"OK\r\n"

        def send() -> None:
            for piece in body_pieces(n, MiB):
                sock.sendall(piece)

        sender = threading.Thread(target=send, name="tcp-echo-send", daemon=True)
        sender.start()
        digest, total = hashlib.sha256(), 0
        while total < n:
            chunk = reader.read1(min(MiB, n - total))
            if not chunk:
                break
            digest.update(chunk)
            total += len(chunk)
        sender.join(scaled(60))
    return total, digest.hexdigest()


@pytest.mark.slow
async def test_1gib_download_and_tcp_echo_through_c_to_a_in_bounded_memory(
    procs: ProcFactory,
    upstream_proc: UpstreamProc,
    redis_single: RedisTopology,
    postgres_url: str,
) -> None:
    cluster = ClusterProcs(procs, redis_single.url, postgres_url)
    a, b, c = (cluster.start_node(name) for name in "ABC")
    host, port = upstream_proc.tcp_echo_addr
    agent = procs.agent(
        a.http_url, cluster.token(TENANT, ALIAS), upstream_proc.http_url,
        tcp_upstream=f"{host}:{port}", sessions=1,
    )  # fmt: skip
    wait_alias_online(c.http_url, ALIAS)
    echoed, echo_sha = await asyncio.to_thread(_tcp_echo, c.tcp_addr, TCP_ECHO)
    got, sha, seconds = await _download(tunnel_url(c.http_url, ALIAS, f"/bytes/{DOWNLOAD}"))
    peaks = {name: node.peak_rss() for name, node in cluster.nodes.items()}
    peaks["agent"] = agent.peak_rss()
    print(
        f"\n1 GiB C->A in {seconds:.1f} s ({DOWNLOAD / MiB / seconds:.0f} MiB/s); peak RSS: "
        + ", ".join(f"{name} {peak / MiB:.0f} MiB" for name, peak in peaks.items())
    )
    assert (got, sha) == (DOWNLOAD, expected_sha256(DOWNLOAD))
    assert (echoed, echo_sha) == (TCP_ECHO, expected_sha256(TCP_ECHO))
    assert all(node.running for node in (a, b, c))
    for name, peak in peaks.items():
        assert peak < RSS_LIMIT, f"{name} peak RSS {peak / MiB:.0f} MiB"


# --- 2. SIGKILL of a node holding one of two sessions -----------------------------------------


def place_agent(
    procs: ProcFactory, haproxy: Any, cluster: ClusterProcs, upstream: UpstreamProc, sessions: int
) -> list[str]:
    """An agent dialling HAProxy (in front of every node) with ``sessions`` sessions and a
    short backoff; returns the nodes of its sessions once they are on ``sessions`` distinct
    nodes (the agent spreads them itself: tenant_agent/spread.py)."""
    proxy = agent_behind(haproxy, cluster)
    env = {
        "CSC_AGENT_BACKOFF_INITIAL": f"{BACKOFF_INITIAL}s",
        "CSC_AGENT_BACKOFF_MAX": f"{BACKOFF_MAX}s",
    }
    procs.agent(
        proxy.http_url, cluster.token(TENANT, ALIAS), upstream.http_url,
        sessions=sessions, env=env,
    )  # fmt: skip
    any_node = next(iter(cluster.nodes.values()))
    token = cluster.admin_token

    def spread() -> list[str] | None:
        nodes = session_nodes(any_node, token)
        return nodes if len(nodes) == sessions == len(set(nodes)) else None

    placed: list[str] = wait_until(spread, 30, 0.1, message="agent sessions on distinct nodes")
    for node in cluster.nodes.values():
        wait_alias_online(node.http_url, ALIAS)
    return placed


@pytest.mark.slow
def test_sigkill_of_a_node_holding_one_of_two_sessions_costs_only_its_inflight_streams(
    procs: ProcFactory,
    upstream_proc: UpstreamProc,
    redis_single: RedisTopology,
    postgres_url: str,
    haproxy: Any,
    loops: list[RequestLoop],
) -> None:
    """Sessions on A and B (whichever nodes the agent picked are named so), steady requests
    through B and C, SIGKILL A. B serves from its own session and never forwards; C forwards
    to A or B, and a forward that A cannot admit (its link is down, the dial is refused) is
    tried on B at once. So the only requests that may fail are those C had already forwarded
    to A and A had admitted when it died: each loop through C sends one request at a time, so
    at most one per C loop, and each of them started before the kill completed."""
    cluster = start_three(procs, redis_single.url, postgres_url)
    held = place_agent(procs, haproxy, cluster, upstream_proc, sessions=2)
    a, b = (cluster.nodes[name] for name in held)
    (c_name,) = set(cluster.nodes) - set(held)
    c = cluster.nodes[c_name]
    per_node = 2
    run_loops(loops, {"B": b, "C": c}, per_node)
    wait_successes(loops, time.monotonic(), 10, 20)

    kill_sent = time.monotonic()
    a.kill()
    a.wait(10)
    kill_done = time.monotonic()
    # past A's lease, the directories' re-reads and a re-dial of the lost session
    wait_successes(loops, kill_done + LEASE + 1.0, 5, LEASE + 20)
    for loop in loops:
        loop.stop()

    outcomes = [o for loop in loops for o in loop.outcomes]
    after = [o for o in outcomes if o.ended >= kill_sent]
    failed = [o for o in outcomes if not o.ok]
    gaps = {loop.name: loop.longest_gap(kill_sent) for loop in loops}
    print(
        f"\nkilled {held[0]} (sessions on {held}); {len(after)} requests after the kill, "
        f"{len(failed)} failed: {[(o.loop, o.detail[:60]) for o in failed]}; longest gap "
        + ", ".join(f"{name} {gap * 1000:.0f} ms" for name, gap in gaps.items())
    )
    assert not [o for o in failed if o.loop.startswith("B")], "B has a local session"
    assert all(o.started < kill_done and o.ended >= kill_sent for o in failed), failed
    assert len(failed) <= per_node, failed
    for name, gap in gaps.items():  # a liveness bound: "without a gap"
        assert gap < scaled(3.0), f"loop {name}: no success for {gap:.2f} s after the kill"


# --- 3. SIGKILL of the node holding a single-session agent ------------------------------------


def route_state(r: redis.Redis, prefix: str, node: str) -> dict[str, Any]:
    """What Redis holds of ``node``'s route for ALIAS: its route field, its lease, its
    directory entry (keys as in csc/cluster/routes.py)."""
    nodes_key = f"{{{prefix}:nodes}}"
    return {
        "route": r.hget(f"{prefix}:r:{{{ALIAS}}}", node),
        "lease": r.get(f"{nodes_key}:lease:{node}"),
        "directory": r.hget(nodes_key, node),
    }


@pytest.mark.slow
def test_sigkill_of_the_node_of_a_single_session_agent(
    procs: ProcFactory,
    upstream_proc: UpstreamProc,
    redis_single: RedisTopology,
    postgres_url: str,
    haproxy: Any,
    loops: list[RequestLoop],
) -> None:
    """Requests through B and C succeed again within the agent's backoff + 2 s, and A's route
    is void within the lease (its lease key, the only thing that makes a route entry count,
    expires) and its route field and directory entry are removed soon after."""
    cluster = start_three(procs, redis_single.url, postgres_url)
    (a_name,) = place_agent(procs, haproxy, cluster, upstream_proc, sessions=1)
    a = cluster.nodes[a_name]
    others = {name: node for name, node in cluster.nodes.items() if name != a_name}
    r = redis.Redis.from_url(redis_single.url)
    try:
        before = route_state(r, cluster.prefix, a_name)
        assert before["route"] is not None and before["lease"] == before["route"], before
        run_loops(loops, others, 1)
        wait_successes(loops, time.monotonic(), 10, 20)

        kill_sent = time.monotonic()
        a.kill()
        a.wait(10)
        void = wait_until(
            lambda: route_state(r, cluster.prefix, a_name)["lease"] is None and time.monotonic(),
            LEASE + 5,
            0.02,
            message="A's lease gone",
        )
        wait_successes(loops, kill_sent, 1, BACKOFF_MAX + 20)
        recovered = {
            loop.name: min(o.ended for o in loop.outcomes if o.ok and o.started >= kill_sent)
            for loop in loops
        }
        gone = wait_until(
            lambda: (
                route_state(r, cluster.prefix, a_name) == dict.fromkeys(before) and time.monotonic()
            ),
            LEASE + 10,
            0.02,
            message="A's route field and directory entry removed",
        )
        settled = time.monotonic()
        wait_successes(loops, settled, 5, 20)
    finally:
        r.close()
    for loop in loops:
        loop.stop()
    late_failures = [
        o for loop in loops for o in loop.outcomes if o.started >= settled and not o.ok
    ]
    print(
        f"\nkilled {a_name}: requests succeed again after "
        + ", ".join(f"{name} {t - kill_sent:.2f} s" for name, t in recovered.items())
        + f"; lease gone after {void - kill_sent:.2f} s, route field and directory entry "
        f"removed after {gone - kill_sent:.2f} s (lease {LEASE:g} s)"
    )
    for name, t in recovered.items():
        assert t - kill_sent < scaled(BACKOFF_MAX + 2.0), f"{name}: {t - kill_sent:.2f} s"
    assert void - kill_sent <= scaled(LEASE + 0.5)
    # the field itself goes lazily: once the lease expired, the next directory read (every
    # lease/3, +10 % jitter) of a node without a local session, then its next lookup (cached
    # for LOOKUP_TTL) deletes it; the loop through that node keeps looking up
    assert gone - kill_sent <= scaled(LEASE + 1.1 * LEASE / 3 + LOOKUP_TTL + 0.5)
    assert not late_failures, late_failures


# --- 4. a tenant's request rate across three nodes --------------------------------------------


@pytest.mark.slow
def test_tenant_rate_limit_holds_across_three_nodes(
    procs: ProcFactory,
    upstream_proc: UpstreamProc,
    redis_single: RedisTopology,
    postgres_url: str,
) -> None:
    """Set ``max_request_rate`` N through one node's admin API, then offer far more than N/s
    spread evenly over the three nodes: over the measured interval t the cluster admits at
    most N*t + burst (burst = one second's worth, csc/relay/limits.py ``burst_for``); a per-node
    limit would admit about three times as many."""
    rate = 10.0
    burst = max(1.0, rate)
    cluster = start_three(procs, redis_single.url, postgres_url)
    a = cluster.nodes["n1"]
    procs.agent(a.http_url, cluster.token(TENANT, ALIAS), upstream_proc.http_url, sessions=1)
    for node in cluster.nodes.values():
        wait_alias_online(node.http_url, ALIAS)
    answer = admin(
        cluster.nodes["n2"], cluster.admin_token, "PATCH", f"/tenants/{TENANT}",
        {"limits": {"max_request_rate": rate}},
    )  # fmt: skip
    assert answer["limits"]["max_request_rate"] == rate, answer

    counts: dict[str, dict[int, int]] = {name: {} for name in cluster.nodes}
    lock = threading.Lock()
    stop = threading.Event()

    def hammer(name: str, url: str) -> None:
        while not stop.is_set():
            status, _, _ = http_request(url, timeout=10.0)
            with lock:
                counts[name][status] = counts[name].get(status, 0) + 1

    def run(seconds: float) -> tuple[float, float]:
        for name in counts:
            counts[name].clear()
        stop.clear()
        threads = [
            threading.Thread(target=hammer, args=(name, tunnel_url(node.http_url, ALIAS, "/small")))
            for name, node in cluster.nodes.items()
            for _ in range(2)
        ]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        wait_until(lambda: time.monotonic() - began >= seconds, seconds + 5, 0.05)
        stop.set()
        for thread in threads:
            thread.join(scaled(20))
        return began, time.monotonic()

    # every node applies the limit (the change reaches the others through pub/sub): each
    # answers 429 once the shared bucket is empty
    wait_until(
        lambda: run(0.5) and all(c.get(429) for c in counts.values()),
        20,
        message="every node enforcing the rate",
    )
    began, ended = run(4.0)
    elapsed = ended - began
    admitted = sum(c.get(200, 0) for c in counts.values())
    limited = sum(c.get(429, 0) for c in counts.values())
    other = {
        name: {s: n for s, n in c.items() if s not in (200, 429)} for name, c in counts.items()
    }
    print(
        f"\nrate {rate:g}/s over {elapsed:.2f} s: admitted {admitted} (bound "
        f"{rate * elapsed + burst:.0f}), limited {limited}; per node {counts}"
    )
    assert not any(other.values()), other
    assert admitted <= rate * elapsed + burst
    assert all(c.get(200) for c in counts.values()), "every node admitted some"
    assert limited > admitted, "the offered load was well above the rate"
