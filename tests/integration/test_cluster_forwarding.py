"""Two CSC nodes in one event loop sharing a real Redis (single server, Sentinel and Cluster):
streams for an alias whose agent is on node A, arriving at node B, are forwarded over the peer
link B→A (csc/cluster/)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

import csc.cluster.node as cluster_node
from csc.cluster import peer, routes
from csc.cluster.node import Cluster
from csc.cluster.routes import NodeInfo
from csc.config import CSCConfig
from csc.relay import routing
from csc.relay.limits import SESSIONS, STREAMS, burst_for
from csc.server import Node, running_node
from csc.store import Store
from csc.tenants import Actor, TenantUpdate
from shared import resolve_sig
from shared.config import Secret
from shared.errors import AuthFailed
from tenant_agent.agent import Agent
from tests.support.attacks import Yielder, raw_agents
from tests.support.inproc import ALIAS, agent_config, make_token
from tests.support.procs import async_wait_until, scaled
from tests.support.redis import RedisTopology
from tests.support.upstream import UpstreamServer

CLUSTER_KEY = Secret("k" * 40)


@pytest.fixture
def redis_url(redis_topology: RedisTopology) -> str:
    """Every test here runs against a single server, Sentinel and Cluster in turn."""
    return redis_topology.url


def node_config(state_dir: Path, redis_url: str, prefix: str, **over: Any) -> CSCConfig:
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "tcp_listen": "127.0.0.1:0",
        "admin_listen": None,
        "metrics_listen": None,
        "state_dir": state_dir,
        "redis_url": Secret(redis_url),
        "redis_prefix": prefix,
        "peer_listen": "127.0.0.1:0",
        "cluster_key": CLUSTER_KEY,
        "route_lease": 1.5,
        **over,
    }
    return CSCConfig(**values)


@contextlib.asynccontextmanager
async def two_nodes(
    tmp_path: Path, redis_url: str, **over: Any
) -> AsyncIterator[tuple[Node, Node, str]]:
    state_dir = tmp_path / "state"
    token = make_token(state_dir, "acme", [ALIAS])
    prefix = "t" + os.urandom(4).hex()
    # a hang anywhere (test body or the nodes' stop) fails with the awaiting frame in the
    # traceback, long before the suite's per-test timeout
    async with (
        asyncio.timeout(scaled(60)),
        running_node(node_config(state_dir, redis_url, prefix, node_id="A", **over)) as a,
        running_node(node_config(state_dir, redis_url, prefix, node_id="B", **over)) as b,
    ):
        yield a, b, token


@contextlib.asynccontextmanager
async def agent_on(node: Node, token: str, upstream: UpstreamServer) -> AsyncIterator[Agent]:
    agent = Agent(agent_config(f"http://{node.http_address}", token, upstream, sessions=1))
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        agent.stop()
        await asyncio.wait_for(task, scaled(30))


async def _status(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as resp:
        await resp.read()
        return resp.status


async def _signed_alike(http: aiohttp.ClientSession, *nodes: Node) -> None:
    """Every node signs the resolve answer with the cluster's one key."""
    key = nodes[0].state.resolve_key
    assert key is not None
    for node in nodes:
        async with http.get(f"http://{node.http_address}/v1/resolve/{ALIAS}") as resp:
            body = await resp.json()
        name, contact = body["tenant"]["name"], body["tenant"]["contact"]
        assert resolve_sig.verify(
            key.public_key(), body["signature"], ALIAS, name, contact, body["tunnel"]
        ), node.state.node_id


async def test_http_and_tcp_through_b_reach_the_agent_on_a(
    tmp_path: Path, redis_url: str, upstream: UpstreamServer
) -> None:
    async with two_nodes(tmp_path, redis_url) as (a, b, token):
        async with agent_on(a, token, upstream), aiohttp.ClientSession() as http:
            b_url = f"http://{b.http_address}"

            async def online() -> bool:
                return await _status(http, f"{b_url}/v1/resolve/{ALIAS}") == 200

            await async_wait_until(online, 10, message="alias online through B")
            await _signed_alike(http, a, b)
            async with http.get(f"{b_url}/t/{ALIAS}/bytes/300000") as resp:
                body = await resp.read()
                assert resp.status == 200
                assert len(body) == 300000
            payload = os.urandom(700_000)
            async with http.post(f"{b_url}/t/{ALIAS}/echo/up", data=payload) as resp:
                assert resp.status == 200
                echo = await resp.json()
                assert echo["body_sha256"] == hashlib.sha256(payload).hexdigest()
            assert b.state.cluster is not None
            assert b.state.cluster.stats.lookups["remote"] >= 2
            host, _, port = (b.tcp_address or "").rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"CONNECT {ALIAS}\r\n".encode())
            assert await reader.readline() == b"OK\r\n"
            writer.write(b"ping through the peer link")
            await writer.drain()
            echoed = await reader.readexactly(len(b"ping through the peer link"))
            assert echoed == b"ping through the peer link"
            writer.close()
        # the agent is gone: B answers portal_offline once A withdrew the route
        async with aiohttp.ClientSession() as http:

            async def offline() -> bool:
                return await _status(http, f"http://{b.http_address}/v1/resolve/{ALIAS}") == 503

            await async_wait_until(offline, 10, message="alias offline through B")


async def test_tenant_rate_limit_holds_across_nodes(
    tmp_path: Path, redis_url: str, upstream: UpstreamServer
) -> None:
    """max_request_rate is the whole cluster's: requests spread over two nodes (agent on A,
    so B forwards) are admitted at most ``rate * t + burst`` times in all."""
    rate = 10.0
    async with two_nodes(tmp_path, redis_url) as (a, b, token):
        store = Store(tmp_path / "state")
        try:
            store.update_tenant(
                "acme", TenantUpdate(limits={"max_request_rate": rate}), Actor("t", "local")
            )
        finally:
            store.close()
        for node in (a, b):
            node.state.registry.refresh(force=True)
        async with agent_on(a, token, upstream), aiohttp.ClientSession() as http:
            urls = [f"http://{n.http_address}/t/{ALIAS}/small" for n in (a, b)]

            async def online() -> bool:
                return await _status(http, f"http://{b.http_address}/v1/resolve/{ALIAS}") == 200

            await async_wait_until(online, 10, message="alias online through B")
            loop = asyncio.get_running_loop()
            admitted = refused = 0
            started = loop.time()
            for i in range(120):
                status = await _status(http, urls[i % 2])
                assert status in (200, 429), status
                admitted += status == 200
                refused += status == 429
            elapsed = loop.time() - started
            assert refused > 0
            assert admitted <= rate * elapsed + burst_for(rate) + 1, (admitted, elapsed)


async def test_revocation_through_b_cuts_the_agent_on_a(
    tmp_path: Path, redis_url: str, upstream: UpstreamServer
) -> None:
    async with two_nodes(tmp_path, redis_url) as (a, b, token):
        agent = Agent(agent_config(f"http://{a.http_address}", token, upstream, sessions=1))
        task = asyncio.create_task(agent.run())
        try:
            await async_wait_until(lambda: len(a.state.sessions) == 1, 10)
            jti = next(iter(a.state.sessions.values())).jti
            store = Store(tmp_path / "state")
            try:
                store.revoke_token(jti, Actor("t", "local"))
            finally:
                store.close()
            assert b.state.cluster is not None
            loop = asyncio.get_running_loop()
            started = loop.time()
            # what B's admin API does after a change: tell every node
            await b.state.cluster.publish({"t": "catalog"})
            await async_wait_until(lambda: not a.state.sessions, 5)
            assert loop.time() - started < scaled(1.0)
            assert await asyncio.wait_for(task, scaled(10)) == 3  # the agent gives up
        finally:
            agent.stop()
            await asyncio.wait_for(task, scaled(10))


@contextlib.asynccontextmanager
async def _agent_on_a(
    tmp_path: Path, redis_url: str, upstream: UpstreamServer
) -> AsyncIterator[tuple[Node, Node, aiohttp.ClientSession]]:
    """Nodes A and B, an agent with its one session on A, and a client."""
    async with (
        two_nodes(tmp_path, redis_url) as (a, b, token),
        agent_on(a, token, upstream),
        aiohttp.ClientSession() as http,
    ):
        await async_wait_until(lambda: len(a.state.sessions) == 1, 10)
        yield a, b, http


def _clusters(*nodes: Node) -> list[Cluster]:
    found = [node.state.cluster for node in nodes]
    assert all(cluster is not None for cluster in found)
    return [cluster for cluster in found if cluster is not None]


async def test_a_paused_node_is_fenced(
    tmp_path: Path, redis_url: str, upstream: UpstreamServer
) -> None:
    """A node whose lease expired while it did not run takes a new epoch, ends its sessions,
    and its old routes no longer count anywhere."""
    async with _agent_on_a(tmp_path, redis_url, upstream) as (a, b, http):
        cluster_a, cluster_b = _clusters(a, b)
        old_epoch = cluster_a.routes.epoch
        # what a SIGSTOP longer than the lease looks like from inside: the lease key
        # expired, and the last heartbeat is longer ago than the lease
        await cluster_a.redis.delete(cluster_a.keys.lease("A"))
        await cluster_b.routes.read_directory()
        cluster_b.routes.forget()
        assert await cluster_b.nodes_for(ALIAS) == []
        cluster_a._last_beat -= 10 * cluster_a.lease
        session = next(iter(a.state.sessions.values()))
        await cluster_a.beat()
        assert cluster_a.routes.epoch > old_epoch
        assert cluster_a.stats.fenced == 1
        await async_wait_until(lambda: session.link.is_closed, 5)
        # the agent reconnects (to A here, the only node it knows) under the new epoch: a new
        # session (the closed one may still be listed for a moment after its link closed)
        await async_wait_until(
            lambda: [s for s in a.state.sessions.values() if s is not session], 10
        )
        await cluster_a.beat()
        await cluster_b.routes.read_directory()
        cluster_b.routes.forget()
        nodes = await cluster_b.nodes_for(ALIAS)
        assert [(n.id, n.epoch) for n in nodes] == [("A", cluster_a.routes.epoch)]
        assert await _status(http, f"http://{b.http_address}/t/{ALIAS}/small") == 200


def _set_limits(tmp_path: Path, nodes: tuple[Node, ...], **limits: Any) -> None:
    store = Store(tmp_path / "state")
    try:
        store.update_tenant("acme", TenantUpdate(limits=limits), Actor("t", "local"))
    finally:
        store.close()
    for node in nodes:
        node.state.registry.refresh(force=True)


async def test_tenant_stream_cap_holds_across_nodes(
    tmp_path: Path, redis_url: str, upstream: UpstreamServer
) -> None:
    """max_streams=1: while one download runs through A, a request through B is refused with
    429 tenant_limit; once it ends (and its slot is given back) B is served."""
    async with two_nodes(tmp_path, redis_url) as (a, b, token):
        _set_limits(tmp_path, (a, b), max_streams=1)
        async with agent_on(a, token, upstream), aiohttp.ClientSession() as http:
            b_small = f"http://{b.http_address}/t/{ALIAS}/small"

            async def online() -> bool:
                return await _status(http, f"http://{b.http_address}/v1/resolve/{ALIAS}") == 200

            await async_wait_until(online, 10, message="alias online through B")
            slow = f"http://{a.http_address}/t/{ALIAS}/bytes/400000?rate=200000"
            async with http.get(slow) as held:
                assert held.status == 200
                async with http.get(b_small) as refused:
                    assert refused.status == 429
                    assert (await refused.json())["error"] == "tenant_limit"
                assert len(await held.read()) == 400000

            async def served() -> bool:
                return await _status(http, b_small) == 200

            await async_wait_until(served, 5, message="B serves once the slot is free")


async def test_one_address_holds_only_its_share_of_the_tenant_streams_on_a_node(
    tmp_path: Path, redis_url: str, upstream: UpstreamServer
) -> None:
    """max_streams=4: two slow downloads from 127.0.0.1 through B (forwarded to A) hold that
    address's share; its third is refused with 429 while 127.0.0.2 is served through B; the
    cluster slots come back with the streams."""
    async with two_nodes(tmp_path, redis_url) as (a, b, token):
        _set_limits(tmp_path, (a, b), max_streams=4)
        async with agent_on(a, token, upstream), aiohttp.ClientSession() as http:
            b_url = f"http://{b.http_address}/t/{ALIAS}"

            async def online() -> bool:
                return await _status(http, f"http://{b.http_address}/v1/resolve/{ALIAS}") == 200

            await async_wait_until(online, 10, message="alias online through B")
            slow = f"{b_url}/bytes/400000?rate=200000"
            async with http.get(slow) as one, http.get(slow) as two:
                assert (one.status, two.status) == (200, 200)
                async with http.get(f"{b_url}/small") as refused:
                    assert refused.status == 429 and refused.headers["Retry-After"] == "1"
                    assert "from your address" in (await refused.json())["message"]
                connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
                async with aiohttp.ClientSession(connector=connector) as other:
                    assert await _status(other, f"{b_url}/small") == 200
                assert len(await one.read()) == len(await two.read()) == 400000
            await async_wait_until(
                lambda: not b.state.cluster or not b.state.cluster.slots.held,
                10,
                message="B's stream slots given back",
            )
            assert b.state.limits.client_streams("acme", "127.0.0.1") == 0
            assert await _status(http, f"{b_url}/small") == 200


async def test_tenant_session_cap_holds_across_nodes(
    tmp_path: Path, redis_url: str, upstream: UpstreamServer
) -> None:
    """max_sessions=1: with the tenant's one session on A, a session on B is refused (429
    before the upgrade); when A's session ends, B admits one."""
    async with two_nodes(tmp_path, redis_url) as (a, b, token):
        _set_limits(tmp_path, (a, b), max_sessions=1)
        async with agent_on(a, token, upstream):
            await async_wait_until(lambda: len(a.state.sessions) == 1, 10)
            async with aiohttp.ClientSession() as http:
                headers = {"Authorization": f"Bearer {token}"}
                url = f"http://{b.http_address}/v1/agent/connect"
                async with http.get(url, headers=headers) as resp:
                    assert resp.status == 429
                    assert (await resp.json())["error"] == "tenant_limit"
        await async_wait_until(lambda: not a.state.sessions, 10)
        async with agent_on(b, token, upstream):
            await async_wait_until(lambda: len(b.state.sessions) == 1, 10)


async def _yielder(
    node: Node,
    token: str,
    *,
    seen_by: Cluster | None = None,
    go_away: bool = True,
    replaces: str | None = None,
) -> Yielder:
    """A raw agent on ``node`` that sends GOAWAY once welcomed (refused: its ``refusal``);
    with ``seen_by``, returned once that cluster recorded the GOAWAY in Redis."""
    host, _, port = node.http_address.rpartition(":")
    agent = Yielder(host, int(port), token, ALIAS, go_away=go_away, replaces=replaces)
    agent.start()
    await async_wait_until(
        lambda: agent.welcomed.is_set() or not agent.is_alive(), 10, message="dialled"
    )
    if seen_by is not None and agent.welcomed.is_set():
        key = seen_by.slots.key("acme", SESSIONS) + ":yielding"
        deadline = asyncio.get_running_loop().time() + scaled(10)
        while not await seen_by.redis.zcard(key):
            assert asyncio.get_running_loop().time() < deadline, "GOAWAY not recorded"
            await asyncio.sleep(0.02)
    return agent


async def test_a_session_on_a_hands_its_place_to_its_successor_on_b(
    tmp_path: Path, redis_url: str
) -> None:
    """max_sessions=1 across the cluster: a session on A sends GOAWAY (its agent renews it);
    a new session of the tenant on B gets its slot (csc/relay/handover.py), a third is
    refused 429 while A's still runs, and A closes its session at the grace (drain_timeout)
    after its next heartbeat found the slot gone."""
    grace = 3.0
    async with two_nodes(tmp_path, redis_url, drain_timeout=grace) as (a, b, token):
        _set_limits(tmp_path, (a, b), max_sessions=1)
        with raw_agents() as agents:
            first = await _yielder(a, token, seen_by=_clusters(a)[0])
            agents.append(first)
            assert first.welcomed.is_set(), first.error
            second = await _yielder(b, token)
            agents.append(second)
            assert second.welcomed.is_set(), second.error
            third = await _yielder(a, token)
            agents.append(third)
            assert third.refused_status() == 429, third.error
            await async_wait_until(
                lambda: first.closed_at is not None, grace + 15, message="A closed it"
            )
            assert second.closed_at is None and len(b.state.sessions) == 1
            await async_wait_until(lambda: not a.state.sessions, 10, message="A's gone")


async def test_a_dial_on_b_takes_the_place_of_the_session_on_a_it_names(
    tmp_path: Path, redis_url: str
) -> None:
    """max_sessions=1 across the cluster and a session on A that serves on: a dial on B
    naming it (``CSC-Replaces``, what the agent's renewal sends) takes its slot at once; A
    finds out at its next heartbeat and closes its session at the grace."""
    grace = 3.0
    async with two_nodes(tmp_path, redis_url, drain_timeout=grace) as (a, b, token):
        _set_limits(tmp_path, (a, b), max_sessions=1)
        with raw_agents() as agents:
            first = await _yielder(a, token, go_away=False)
            agents.append(first)
            assert first.welcomed.is_set(), first.error
            (named,) = a.state.sessions
            second = await _yielder(b, token, go_away=False, replaces=named)
            agents.append(second)
            assert second.welcomed.is_set(), second.error
            assert first.closed_at is None  # both serve for now
            await async_wait_until(
                lambda: first.closed_at is not None, grace + 15, message="A closed it"
            )
            assert second.closed_at is None and len(b.state.sessions) == 1


async def test_a_session_that_gave_its_place_and_ended_lets_the_next_hand_over_through(
    tmp_path: Path, redis_url: str
) -> None:
    """max_sessions=1: the session on A gives its place to one on B and its agent then closes
    it (its streams done) at once: the record that holds the tenant's next hand-over back goes
    with it, so a new session takes B's place without waiting for the record to expire
    (``drain_timeout`` plus the lease, 31.5 s here)."""
    async with two_nodes(tmp_path, redis_url, drain_timeout=30.0) as (a, b, token):
        _set_limits(tmp_path, (a, b), max_sessions=1)
        cluster = _clusters(a)[0]
        given = cluster.slots.key("acme", SESSIONS) + ":given"
        with raw_agents() as agents:
            first = await _yielder(a, token, seen_by=cluster)
            agents.append(first)
            second = await _yielder(b, token, seen_by=cluster)
            agents.append(second)
            assert first.welcomed.is_set() and second.welcomed.is_set(), second.error
            assert await cluster.redis.zcard(given) == 1
            first.stop.set()  # its agent closes it
            first.join(scaled(10))
            deadline = asyncio.get_running_loop().time() + scaled(10)
            while await cluster.redis.zcard(given):
                assert asyncio.get_running_loop().time() < deadline, "the record stayed"
                await asyncio.sleep(0.02)
            third = await _yielder(a, token)
            agents.append(third)
            assert third.welcomed.is_set(), third.error  # B's place


@pytest.mark.parametrize("event_lost", [False, True])
async def test_admin_api_of_b_sees_and_ends_a_session_on_a(
    tmp_path: Path,
    redis_url: str,
    upstream: UpstreamServer,
    monkeypatch: pytest.MonkeyPatch,
    event_lost: bool,
) -> None:
    """B's admin API lists A's session and ends it. The request is also kept in Redis until A
    takes it, so with ``event_lost`` (A's subscription missed the event, as in a failover) A
    still ends the session, on its next heartbeat (before: the admin API said "disconnected"
    and the session lived on)."""
    async with (
        two_nodes(tmp_path, redis_url, admin_listen="127.0.0.1:0") as (a, b, token),
        agent_on(a, token, upstream),
        aiohttp.ClientSession() as http,
    ):
        await async_wait_until(lambda: len(a.state.sessions) == 1, 10)
        assert a.state.cluster is not None
        await a.state.cluster.beat()  # publishes A's session views now
        operator = (tmp_path / "state" / "admin-token").read_text().strip()
        headers = {"Authorization": f"Bearer {operator}"}
        admin = f"http://{b.admin_address}/v1/admin"
        async with http.get(f"{admin}/sessions", headers=headers) as resp:
            listed = await resp.json()
        assert listed["nodes"] == ["B", "A"]
        [view] = listed["sessions"]
        assert view["node"] == "A" and view["tenant"] == "acme"
        async with http.get(f"{admin}/aliases", headers=headers) as resp:
            [row] = (await resp.json())["aliases"]
        assert row["alias"] == ALIAS and row["online"] is True and row["sessions"] == 1
        session = next(iter(a.state.sessions.values()))
        lost: list[bytes] = []
        if event_lost:

            async def deaf(raw: bytes) -> None:  # A hears no event at all
                lost.append(raw)

            monkeypatch.setattr(a.state.cluster, "_on_event", deaf)
        async with http.delete(f"{admin}/sessions/{view['id']}", headers=headers) as resp:
            assert resp.status == 200
            assert (await resp.json())["node"] == "A"
        await async_wait_until(lambda: session.link.is_closed, 10 if event_lost else 5)
        assert any(b"disconnect" in raw for raw in lost) == event_lost  # it went out, unheard


def _stop_heartbeats(*clusters: Any) -> None:
    """Cancel the nodes' heartbeat tasks, so the test drives ``beat()`` alone."""
    for cluster in clusters:
        for task in cluster._tasks:
            if task.get_name() == "cluster-heartbeat":
                task.cancel()


async def test_a_heartbeat_that_waited_for_redis_does_not_fence(
    tmp_path: Path, redis_url: str, upstream: UpstreamServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A heartbeat stuck in Redis's retries for longer than the lease (an outage) is no pause:
    when Redis answers again the node re-asserts its lease and routes under its epoch, and its
    agent's session stays up."""
    async with two_nodes(tmp_path, redis_url) as (a, _, token), agent_on(a, token, upstream):
        await async_wait_until(lambda: len(a.state.sessions) == 1, 10)
        cluster = a.state.cluster
        assert cluster is not None
        _stop_heartbeats(cluster)
        clock = [1000.0]
        fake_time = SimpleNamespace(monotonic=lambda: clock[0], time=time.time)
        monkeypatch.setattr(cluster_node, "time", fake_time)
        cluster._last_beat = clock[0]
        epoch, session = cluster.routes.epoch, next(iter(a.state.sessions.values()))
        heartbeat = cluster.routes.heartbeat

        async def outage() -> str:  # the retries give up ten leases later
            clock[0] += 10 * cluster.lease
            raise RedisConnectionError("Connection refused")

        monkeypatch.setattr(cluster.routes, "heartbeat", outage)
        await cluster.beat()
        assert not cluster.healthy
        # meanwhile the lease expired (or Redis restarted empty)
        await cluster.redis.delete(cluster.keys.lease("A"), cluster.keys.route(ALIAS))
        monkeypatch.setattr(cluster.routes, "heartbeat", heartbeat)
        clock[0] += cluster.lease / 3  # the heartbeat's sleep
        await cluster.beat()
        assert cluster.healthy and cluster.stats.fenced == 0
        assert cluster.routes.epoch == epoch and not session.link.is_closed
        assert int(await cluster.redis.get(cluster.keys.lease("A"))) == epoch
        assert int(await cluster.redis.hget(cluster.keys.route(ALIAS), "A")) == epoch


async def test_after_a_failover_the_others_wait_a_lease_for_a_node_to_reassert(
    tmp_path: Path, redis_url: str, upstream: UpstreamServer
) -> None:
    """A Redis failover (or an outage) outlasting the lease leaves every node without its
    lease: none could renew it. The first node back (B) finds its own lease gone and must not
    take A, whose lease is gone for the same reason, for dead (delete its routes, drop its
    peer link, answer portal_offline) before A had one heartbeat to re-assert them (before:
    B cleaned up after A at once, and every request through B failed until A's next
    heartbeat: seen as 1059 failed requests in the Redis Cluster failover test)."""
    async with _agent_on_a(tmp_path, redis_url, upstream) as (a, b, http):
        cluster_a, cluster_b = _clusters(a, b)
        _stop_heartbeats(cluster_a, cluster_b)
        url = f"http://{b.http_address}/t/{ALIAS}/small"
        assert await _status(http, url) == 200
        # the failover is over; both leases expired meanwhile; B's heartbeat comes first (the
        # heartbeats waited for Redis meanwhile: no pause, so no fencing; see beat())
        await cluster_b.redis.delete(cluster_b.keys.lease("A"), cluster_b.keys.lease("B"))
        cluster_a._last_beat = cluster_b._last_beat = time.monotonic()
        await cluster_b.beat()
        assert "A" in cluster_b.routes.directory
        assert await cluster_b.redis.hget(cluster_b.keys.route(ALIAS), "A") is not None
        async with http.get(url) as resp:
            assert resp.status == 200, await resp.text()
        await cluster_a.beat()  # A re-asserts its lease and routes
        await cluster_b.beat()
        assert await _status(http, url) == 200
        # once A had its lease period to come back, a node without a lease is dead again
        await cluster_b.redis.delete(cluster_b.keys.lease("A"))
        cluster_b.routes.grace_until = float("-inf")
        await cluster_b.routes.read_directory()
        assert "A" not in cluster_b.routes.directory


async def test_lookups_keep_live_routes_and_use_the_last_answer_while_redis_is_away(
    tmp_path: Path, redis_url: str, upstream: UpstreamServer
) -> None:
    """A lookup deletes no entry whose node's lease names its epoch, even when that node is
    missing from the looking node's directory read (it re-asserted after a Redis restart);
    while Redis is known to be away, lookups answer from what the node knew."""
    async with two_nodes(tmp_path, redis_url) as (a, b, token), agent_on(a, token, upstream):
        await async_wait_until(lambda: len(a.state.sessions) == 1, 10)
        cluster_a, cluster_b = a.state.cluster, b.state.cluster
        assert cluster_a is not None and cluster_b is not None
        _stop_heartbeats(cluster_a, cluster_b)
        route = cluster_b.keys.route(ALIAS)
        await async_wait_until(lambda: cluster_b.nodes_for(ALIAS), 10)
        # B's directory read missed A (A re-asserted just after it): A's entry stays
        del cluster_b.routes.directory["A"]
        cluster_b.routes.forget()
        assert await cluster_b.nodes_for(ALIAS) == []
        assert await cluster_a.redis.hget(route, "A") is not None
        # a fresh directory read finds A again; then Redis "goes away": the last answer
        await cluster_b.routes.read_directory()
        cluster_b.routes.forget()
        assert [n.id for n in await cluster_b.nodes_for(ALIAS)] == ["A"]
        # Redis "goes away": the last answer, even once dropped (an event, a resync)
        await cluster_a.redis.delete(route)
        cluster_b.routes.forget()
        cluster_b.healthy = False
        assert [n.id for n in await cluster_b.nodes_for(ALIAS)] == ["A"]
        # an alias with no answer to fall back on is still asked of Redis
        assert await cluster_b.nodes_for("nobody@example.com") == []


async def test_a_session_cleanup_survives_the_agent_hanging_up(
    tmp_path: Path, redis_url: str, upstream: UpstreamServer
) -> None:
    """An agent that hangs up while its ended session is being cleaned up cancels the session's
    handler (``handler_cancellation``); the cleanup still withdraws the session's routes."""
    async with two_nodes(tmp_path, redis_url) as (a, _, token), agent_on(a, token, upstream):
        await async_wait_until(lambda: len(a.state.sessions) == 1, 10)
        cluster = a.state.cluster
        assert cluster is not None
        _stop_heartbeats(cluster)
        session = next(iter(a.state.sessions.values()))
        assert a.front is not None
        (handler,) = a.front.switched  # the task serving the agent's WebSocket (its session)
        async with cluster._sync_lock:  # holds the cleanup in sync_routes
            session.end(AuthFailed("token revoked", reason="revoked"))  # no reconnect
            await async_wait_until(lambda: session.id not in a.state.sessions, 10)
            handler.cancel()  # what aiohttp does when the agent's connection drops
            await asyncio.sleep(0)
        await async_wait_until(lambda: ALIAS not in cluster.registered, 10)
        assert await cluster.redis.hget(cluster.keys.route(ALIAS), "A") is None


async def test_a_new_epoch_is_new_even_after_the_counter_was_lost(
    tmp_path: Path, redis_url: str
) -> None:
    """After a Redis flush the epoch counter starts again; a node that must take a new epoch
    (fencing) still gets one it never had."""
    async with two_nodes(tmp_path, redis_url) as (a, _b, _token):
        cluster = a.state.cluster
        assert cluster is not None
        before = cluster.routes.epoch
        await cluster.redis.delete(cluster.keys.epoch)  # what a flush does to the counter
        assert await cluster.routes.join(cluster.routes.me.peer) > before


async def test_a_dead_nodes_routes_are_deleted_by_whoever_finds_it_dead(
    tmp_path: Path, redis_url: str, upstream: UpstreamServer
) -> None:
    """A node that died (its lease gone) leaves no route behind, even for an alias every
    surviving node also serves (no lookup would ever come across the entry)."""
    async with (
        two_nodes(tmp_path, redis_url) as (a, b, token),
        agent_on(a, token, upstream),
        agent_on(b, token, upstream),
    ):
        await async_wait_until(lambda: len(a.state.sessions) == len(b.state.sessions) == 1, 10)
        cluster_a, cluster_b = a.state.cluster, b.state.cluster
        assert cluster_a is not None and cluster_b is not None
        route = cluster_b.keys.route(ALIAS)

        async def both_registered() -> bool:
            return set(map(_text_key, await cluster_b.redis.hkeys(route))) == {"A", "B"}

        await async_wait_until(both_registered, 10)
        _stop_heartbeats(cluster_a)  # A stops heartbeating, as a killed node does
        await cluster_a.redis.delete(cluster_a.keys.lease("A"))  # its lease expires
        await cluster_b.routes.read_directory()
        assert set(map(_text_key, await cluster_b.redis.hkeys(route))) == {"B"}
        assert not await cluster_b.redis.exists(cluster_b.keys.routes_of("A"))


def _text_key(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def test_a_node_back_under_its_id_is_used_at_once(
    tmp_path: Path, redis_url: str, upstream: UpstreamServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B's peer link to A ends when A stops, so B skips A for a while (a node that just went
    away is suspect). A started again under the same id is another incarnation (a new
    epoch): B forwards to it as soon as its agent is up, not once the old one's mark runs
    out. (A rolling restart met this: the other session of the tenant drained while the
    only one left was on a node restarted moments before, and B answered portal_offline.)
    The mark is made to outlast the test, so the test cannot pass by waiting it out."""
    monkeypatch.setattr(peer, "SUSPECT_FOR", 3600.0)
    state_dir = tmp_path / "state"
    token = make_token(state_dir, "acme", [ALIAS])
    prefix = "t" + os.urandom(4).hex()

    def config(node_id: str) -> CSCConfig:
        return node_config(state_dir, redis_url, prefix, node_id=node_id)

    async with (
        asyncio.timeout(scaled(60)),
        running_node(config("B")) as b,
        aiohttp.ClientSession() as http,
    ):
        cluster_b = b.state.cluster
        assert cluster_b is not None
        resolve = f"http://{b.http_address}/v1/resolve/{ALIAS}"
        tunnel = f"http://{b.http_address}/t/{ALIAS}/small"

        async def online() -> bool:
            return await _status(http, resolve) == 200

        async with running_node(config("A")) as a, agent_on(a, token, upstream):
            assert a.state.cluster is not None
            first_epoch = a.state.cluster.routes.epoch
            await async_wait_until(online, 10, message="alias online through B")
            assert await _status(http, tunnel) == 200  # B dials its peer link to A
        await async_wait_until(
            lambda: cluster_b.peers.suspect("A", first_epoch),
            10,
            message="B marks A suspect when its link goes down",
        )

        async with running_node(config("A")) as a, agent_on(a, token, upstream):
            assert a.state.cluster is not None
            assert a.state.cluster.routes.epoch != first_epoch
            await async_wait_until(online, 10, message="alias online through B again")
            assert await _status(http, tunnel) == 200


async def test_stream_slots_of_a_node_back_under_its_id_are_its_own(
    tmp_path: Path, redis_url: str, upstream: UpstreamServer
) -> None:
    """A node killed while streams were open leaves their slots in Redis until they expire;
    started again under the same id, its new streams must not take those slots' names (one
    would then count once for two streams and the cap would let one more through)."""
    async with two_nodes(tmp_path, redis_url) as (a, b, token):
        cluster_a = a.state.cluster
        assert cluster_a is not None
        # slots of the node's last life under the names this life's next streams would take
        upcoming = next(routing._slot_ids) + 1
        left = [f"A:{n}" for n in range(upcoming, upcoming + 50)]  # as 0.1.0 named them
        last_life = "0" * 8 if routing._slot_life != "0" * 8 else "1" * 8
        left += [f"A:{last_life}:{n}" for n in range(upcoming, upcoming + 50)]
        key = cluster_a.slots.key("acme", STREAMS)
        far = time.time() + 3600
        await cluster_a.redis.zadd(key, {member: far for member in left})
        _set_limits(tmp_path, (a, b), max_streams=len(left) + 1)
        async with agent_on(a, token, upstream), aiohttp.ClientSession() as http:
            await async_wait_until(lambda: len(a.state.sessions) == 1, 10)
            slow = f"http://{a.http_address}/t/{ALIAS}/bytes/400000?rate=200000"
            async with http.get(slow) as held:
                assert held.status == 200
                async with http.get(f"http://{a.http_address}/t/{ALIAS}/small") as refused:
                    assert refused.status == 429, "the cap let one stream more through"
                    assert (await refused.json())["error"] == "tenant_limit"
                assert len(await held.read()) == 400000


async def test_a_dead_entry_is_deleted_only_while_it_is_the_same(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B reads the directory, finds A's entry without a matching lease and deletes it. If A
    (back under its id) wrote a new entry between B's two reads, the new entry stays: B may
    not hide a live node from everyone until its next heartbeat."""
    async with two_nodes(tmp_path, redis_url) as (a, b, _token):
        cluster_a, cluster_b = a.state.cluster, b.state.cluster
        assert cluster_a is not None and cluster_b is not None
        nodes = cluster_b.keys.nodes
        current = cluster_a.routes.me
        last_life = NodeInfo(current.id, "127.0.0.1:9", current.epoch - 1, False, current.since)
        await cluster_b.redis.hset(nodes, "A", last_life.to_json())  # what a killed A left
        mget = cluster_b.redis.mget

        async def a_joins_meanwhile(*args: Any, **kwargs: Any) -> Any:
            await cluster_a.redis.hset(nodes, "A", current.to_json())
            return await mget(*args, **kwargs)

        monkeypatch.setattr(cluster_b.redis, "mget", a_joins_meanwhile)
        await cluster_b.routes.read_directory()
        monkeypatch.undo()
        stored = await cluster_b.redis.hget(nodes, "A")
        assert stored is not None, "B deleted the entry A had just written"
        assert NodeInfo.from_json("A", stored) == current


async def test_routes_a_node_adds_while_its_last_life_is_cleaned_stay_listed(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node cleans up after a node X whose lease is gone (read_directory): it deletes X's
    old routes and takes them out of X's route list. If X, back under its id, listed routes between B's read of
    that list and its cleanup (a new one, and one of its last life again), both stay listed
    (before: the whole list was deleted, so X's routes were never cleaned up after its next
    death)."""
    async with two_nodes(tmp_path, redis_url) as (_a, b, _token):
        cluster_b = b.state.cluster
        assert cluster_b is not None
        keys, redis = cluster_b.keys, cluster_b.redis
        gone = NodeInfo("X", "127.0.0.1:9", 7, False, 0.0)  # left out of the directory:
        # only this test's cleanup runs, not the nodes' own directory reads
        for grant in ("old@x.example", "again@x.example"):
            await redis.sadd(keys.routes_of("X"), grant)
            await redis.hset(keys.route(grant), "X", "7")
        smembers = redis.smembers

        async def x_registers_meanwhile(*args: Any, **kwargs: Any) -> Any:
            members = await smembers(*args, **kwargs)
            for grant in ("new@x.example", "again@x.example"):  # as register() does
                await redis.sadd(keys.routes_of("X"), grant)
                await redis.hset(keys.route(grant), "X", "8")
            return members

        monkeypatch.setattr(redis, "smembers", x_registers_meanwhile)
        await cluster_b.routes._clean_after(gone)
        monkeypatch.undo()
        assert await redis.hget(keys.route("old@x.example"), "X") is None
        assert _texts([await redis.hget(keys.route("again@x.example"), "X")]) == {"8"}
        listed = _texts(await redis.smembers(keys.routes_of("X")))
        assert listed == {"new@x.example", "again@x.example"}


def _texts(values: Any) -> set[str]:
    return {v.decode() if isinstance(v, bytes) else str(v) for v in values}


async def test_lookups_under_a_wildcard_grant_keep_a_bounded_cache(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone may ask for any alias under a ``*@domain`` grant, each a lookup of its own: the
    answers a node keeps are bounded (the least recently asked go), and the latest stays."""
    monkeypatch.setattr(routes, "LOOKUP_CACHE_MAX", 20)
    async with two_nodes(tmp_path, redis_url) as (_a, b, _token):
        cluster_b = b.state.cluster
        assert cluster_b is not None
        for i in range(100):
            assert await cluster_b.routes.nodes_for(f"device-{i}@wild.example") == ()
        assert len(cluster_b.routes._cache) == 20
        assert cluster_b.routes.cached("device-99@wild.example") == ()
        assert cluster_b.routes.cached("device-0@wild.example") is None
