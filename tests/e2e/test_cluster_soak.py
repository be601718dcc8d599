"""Soak of a two-node cluster on Redis Sentinel: 500 agent connect/disconnect cycles against
node A and 10 Sentinel failovers leave each node's Redis connections, asyncio tasks and RSS
flat.

The agent is a small asyncio client of the real agent handshake (tenant_agent/websocket.py
``connect``, then HELLO and WELCOME through the sans-I/O :class:`shared.protocol.Connection`),
so a cycle costs milliseconds rather than a ``csc-agent`` start. Every second cycle closes the
WebSocket cleanly (close code 1000), the others abort the TCP connection, so both ends of a
session are exercised. Each cycle registers the session's routes in Redis and withdraws them
(pub/sub events reach node B). The failovers (``failover()`` SIGKILLs the master by PID, then
``heal()`` restarts it as a replica) run in a worker thread while the cycles go on: cycles
refused during a failover window (503 ``cluster_unavailable``, a close in the handshake, a
lost connection) or left without WELCOME for 10 s (the agent's default ``connect_timeout``: a
registration rides through the failover on the Redis client's retries, which can take longer)
are abandoned like the agent abandons them, retried, and counted apart.

Before (after a warm-up of 50 cycles and one failover, so pools, caches and allocator arenas
reach their working size) and after, with both nodes idle (no sessions, Redis reachable):
``CLIENT LIST`` entries named ``csc:<node>`` on the data nodes, ``tasks`` from
``GET /v1/admin/node`` and the process RSS (psutil). Each must stay within ±10% of its
before-value, plus an absolute slack for small numbers. An idle node holds 2-4 Redis
connections and about 6 tasks, where 10% is less than one: its pool opens connections on
demand, up to the number of Redis users that happened to overlap since the last failover
emptied it (heartbeat, route sync, publish, version poll, lookups), so up to 4 more
connections and 4 more tasks (a timer or a handler alive at the sample) are not a leak, while
one leaked per failover (10) or per cycle (450) is far outside the bound. RSS gets 2 MiB on
top (one allocator arena step).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from shared.link import max_message_size
from shared.protocol import Connection, LinkSettings, Side, WelcomeReceived
from tenant_agent.websocket import HandshakeError, connect
from tests.support.cluster import ClusterProcs
from tests.support.procs import CscProc, ProcFactory, async_wait_until, scaled
from tests.support.redis import RedisSentinelSet, RedisTopology

pytestmark = pytest.mark.slow

ALIAS = "soak@example.com"
CYCLES = 500
WARMUP = 50
FAILOVERS = 10
RELATIVE = 0.10
SLACK_CONNECTIONS = 4
SLACK_TASKS = 4
SLACK_RSS = 2 * 1024 * 1024
CYCLE_TIMEOUT = 10.0
SETTLE_TIMEOUT = 20.0


class Refused(Exception):
    """The node did not answer the handshake with WELCOME (expected during a failover)."""


@dataclass(frozen=True)
class Sample:
    connections: dict[str, int]
    tasks: dict[str, int]
    rss: dict[str, int]


async def agent_cycle(url: str, token: str, *, clean: bool) -> None:
    """Connect, HELLO, wait for WELCOME, then disconnect (cleanly or by aborting the TCP
    connection). :class:`Refused` if the node refuses or the connection fails."""
    loop = asyncio.get_running_loop()
    settings = LinkSettings()
    headers = {"Authorization": f"Bearer {token}", "User-Agent": "soak-test"}
    try:
        ws = await connect(url, headers, max_size=max_message_size(settings.max_frame))
    except (HandshakeError, OSError) as exc:
        raise Refused(str(exc)) from exc
    try:
        conn = Connection(Side.CLIENT, settings, accept_streams=True, now=loop.time())
        conn.send_hello({"agent": "soak-test", "aliases": [ALIAS]})
        await ws.send_chunks(conn.data_to_send())
        while True:
            data = await ws.receive()
            if data is None:
                raise Refused(f"closed in the handshake ({ws.close_code}): {ws.close_reason}")
            conn.receive_data(data, loop.time())
            if any(isinstance(event, WelcomeReceived) for event in conn.events()):
                return
    finally:
        if clean:
            await ws.close()
        else:
            ws.abort()


async def node_status(http: aiohttp.ClientSession, node: CscProc, token: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with http.get(f"{node.admin_url}/v1/admin/node", headers=headers) as response:
        response.raise_for_status()
        body: dict[str, Any] = await response.json()
        return body


async def settled(
    http: aiohttp.ClientSession, nodes: dict[str, CscProc], token: str
) -> dict[str, int]:
    """Wait until every node is idle (no sessions, no streams, Redis reachable); the tasks
    each node reports then."""

    async def idle() -> dict[str, int] | None:
        tasks = {}
        for name, node in nodes.items():
            status = await node_status(http, node, token)
            if status["sessions"] or status["streams"] or status["cluster"]["redis"] != "ok":
                return None
            tasks[name] = int(status["tasks"])
        return tasks

    return await async_wait_until(
        idle, SETTLE_TIMEOUT, 0.1, message="nodes idle with Redis reachable"
    )


async def sample(
    http: aiohttp.ClientSession,
    nodes: dict[str, CscProc],
    token: str,
    redis: RedisTopology,
) -> Sample:
    tasks = await settled(http, nodes, token)
    connections = {name: redis.client_count(f"csc:{name}") for name in nodes}
    rss = {name: node.rss() for name, node in nodes.items()}
    return Sample(connections, tasks, rss)


def flat(before: int, after: int, slack: int) -> bool:
    return after <= before * (1 + RELATIVE) + slack and after >= before * (1 - RELATIVE) - slack


async def test_agent_cycles_and_failovers_leave_connections_tasks_and_rss_flat(
    procs: ProcFactory, redis_sentinel: RedisSentinelSet, postgres_url: str
) -> None:
    began = time.monotonic()
    cluster = ClusterProcs(procs, redis_sentinel.url, postgres_url)
    nodes = {name: cluster.start_node(name) for name in ("A", "B")}
    token = cluster.token("soak", ALIAS)
    admin = cluster.admin_token
    url = nodes["A"].http_url.replace("http://", "ws://") + "/v1/agent/connect"
    done = 0
    refused: list[str] = []
    failover_seconds: list[float] = []

    async def cycles(until: int) -> None:
        nonlocal done
        while done < until:
            try:
                async with asyncio.timeout(scaled(CYCLE_TIMEOUT)):
                    await agent_cycle(url, token, clean=done % 2 == 0)
            except (Refused, TimeoutError) as exc:
                refused.append(str(exc) or "no WELCOME in time")
                await asyncio.sleep(0.05)  # a retry's pace while Redis fails over
                continue
            done += 1

    def failover() -> None:
        started = time.monotonic()
        redis_sentinel.failover()
        redis_sentinel.heal()
        failover_seconds.append(time.monotonic() - started)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=scaled(10))) as http:
        try:
            await cycles(WARMUP)
            await asyncio.to_thread(failover)  # one more failover, in the warm-up
            before = await sample(http, nodes, admin, redis_sentinel)
            warm = time.monotonic()
            step = (CYCLES - WARMUP) // FAILOVERS
            for i in range(FAILOVERS):
                moving = asyncio.create_task(asyncio.to_thread(failover))
                await cycles(WARMUP + (i + 1) * step)
                await moving  # the next failover starts after this one healed
            await cycles(CYCLES)
            after = await sample(http, nodes, admin, redis_sentinel)
        finally:
            redis_sentinel.heal()
    print(
        f"soak: {done} cycles ({len(refused)} refused or timed out and retried: "
        f"{sorted(set(refused))}), "
        f"{len(failover_seconds)} failovers (mean {sum(failover_seconds) / len(failover_seconds):.1f}"
        f" s each); measured phase {time.monotonic() - warm:.1f} s, whole test "
        f"{time.monotonic() - began:.1f} s\nbefore {before}\nafter  {after}"
    )
    assert done == CYCLES and len(failover_seconds) == FAILOVERS + 1
    problems = []
    for name in nodes:
        for what, slack, b, a in (
            ("Redis connections", SLACK_CONNECTIONS, before.connections, after.connections),
            ("asyncio tasks", SLACK_TASKS, before.tasks, after.tasks),
            ("RSS", SLACK_RSS, before.rss, after.rss),
        ):
            if not flat(b[name], a[name], slack):
                problems.append(f"node {name}: {what} {b[name]} -> {a[name]}")
    assert not problems, "; ".join(problems)
