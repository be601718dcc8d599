"""Binary stream heads over real loopback sockets (docs/protocol.md §6.1, §9): requests get
through with binary heads between 1.1 sides, and with JSON heads when one side of a link (the
CSC, the agent, or one node of a cluster) speaks protocol 1.0."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from csc.server import Node
from shared.protocol import Connection
from tenant_agent.agent import Agent
from tests.integration.test_cluster_forwarding import agent_on, two_nodes
from tests.support.inproc import ALIAS, Relay, agent_config, relay, wait_online
from tests.support.procs import async_wait_until, scaled
from tests.support.redis import RedisTopology
from tests.support.upstream import UpstreamServer


def _speak(settings_owner: object, attr: str, minor: int) -> None:
    """Make a side announce protocol 1.``minor`` on the links it makes from now on."""
    settings = getattr(settings_owner, attr)
    setattr(settings_owner, attr, dataclasses.replace(settings, protocol_minor=minor))


@contextlib.asynccontextmanager
async def mixed_relay(tmp_path: Path, csc_minor: int, agent_minor: int) -> AsyncIterator[Relay]:
    async with relay(tmp_path, start=False) as r:
        _speak(r.node.state, "link_settings", csc_minor)
        agent = Agent(agent_config(r.csc_url, r.token, r.upstream))
        _speak(agent, "settings", agent_minor)
        r.agent, r.agent_task = agent, asyncio.create_task(agent.run())
        await wait_online(r.csc_url)
        yield r


def _csc_links(node: Node) -> list[Connection]:
    return [session.link.conn for session in node.state.sessions.values()]


async def _exercise(http: aiohttp.ClientSession, base: str, tcp: tuple[str, int]) -> None:
    """A GET, a POST with a body, a HEAD and a TCP stream, each checked end to end."""
    async with http.get(f"{base}/t/{ALIAS}/echo/a?b=c", headers={"X-Test": "é"}) as resp:
        assert resp.status == 200
        body = await resp.json()
    headers = {k.lower(): v for k, v in body["headers"]}
    assert (body["method"], body["path"], headers["x-test"]) == ("GET", "/echo/a", "é")
    assert headers["x-request-id"] == resp.headers["X-Request-Id"]
    payload = os.urandom(300_000)
    async with http.post(f"{base}/t/{ALIAS}/upload", data=payload) as resp:
        assert resp.status == 200
        assert (await resp.json())["sha256"] == hashlib.sha256(payload).hexdigest()
    async with http.head(f"{base}/t/{ALIAS}/small") as resp:
        assert resp.status == 200
        assert await resp.read() == b""
    async with http.get(f"{base}/t/{ALIAS}/status/404") as resp:
        assert resp.status == 404
    reader, writer = await asyncio.open_connection(*tcp)
    try:
        writer.write(f"CONNECT {ALIAS}\r\nping".encode())
        assert await asyncio.wait_for(reader.readline(), scaled(10)) == b"OK\r\n"
        assert await asyncio.wait_for(reader.readexactly(4), scaled(10)) == b"ping"
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("csc_minor", "agent_minor"),
    [(1, 1), (1, 0), (0, 1)],
    ids=["both-1.1", "agent-1.0", "csc-1.0"],
)
async def test_requests_get_through_whatever_the_versions(
    tmp_path: Path, csc_minor: int, agent_minor: int
) -> None:
    async with mixed_relay(tmp_path, csc_minor, agent_minor) as r, aiohttp.ClientSession() as h:
        binary = csc_minor >= 1 and agent_minor >= 1
        assert r.agent is not None
        agent_links = [session.link.conn for session in r.agent.sessions]
        assert agent_links and all(c.binary_heads is binary for c in agent_links)
        assert all(c.binary_heads is binary for c in _csc_links(r.node))
        await _exercise(h, r.csc_url, r.tcp_address)


@pytest.mark.parametrize("old", [None, "A", "B"], ids=["both-1.1", "A-1.0", "B-1.0"])
async def test_forwarded_requests_get_through_whatever_the_versions(
    tmp_path: Path, redis_single: RedisTopology, upstream: UpstreamServer, old: str | None
) -> None:
    """B forwards to A (whose agent speaks 1.1): the peer link is binary unless one node
    speaks 1.0 on it (A as the dialled node, B as the dialling one)."""
    async with two_nodes(tmp_path, redis_single.url) as (a, b, token):
        assert a.state.cluster is not None and b.state.cluster is not None
        if old == "A":
            _speak(a.state.cluster.server, "settings", 0)
        elif old == "B":
            _speak(b.state.cluster.peers, "settings", 0)
        async with agent_on(a, token, upstream), aiohttp.ClientSession() as http:
            b_url = f"http://{b.http_address}"

            async def online() -> bool:
                async with http.get(f"{b_url}/v1/resolve/{ALIAS}") as resp:
                    return resp.status == 200

            await async_wait_until(online, 10, message="alias online through B")
            host, _, port = (b.tcp_address or "").rpartition(":")
            await _exercise(http, b_url, (host, int(port)))
            assert b.state.cluster.stats.lookups["remote"] >= 3
            links = [link.conn for link in a.state.cluster.server.links]
            assert links and all(c.binary_heads is (old is None) for c in links)
