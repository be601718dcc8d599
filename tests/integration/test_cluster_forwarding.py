"""Two CSC nodes in one event loop sharing a real redis-server: streams for an alias whose agent
is on node A, arriving at node B, are forwarded over the peer link B→A (csc/cluster/)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from csc.config import CSCConfig
from csc.server import Node, running_node
from shared.config import Secret
from tenant_agent.agent import Agent
from tests.support.inproc import ALIAS, agent_config, make_token
from tests.support.procs import async_wait_until, scaled
from tests.support.upstream import UpstreamServer, start_upstream_server

CLUSTER_KEY = Secret("k" * 40)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    exe = shutil.which("redis-server")
    assert exe is not None, "redis-server is missing (scripts/system_deps.sh installs it)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = scaled(10)
        import time

        start = time.monotonic()
        while time.monotonic() - start < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def node_config(state_dir: Path, redis_url: str, prefix: str, **over: Any) -> CSCConfig:
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "tcp_listen": "127.0.0.1:0",
        "admin_listen": None,
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
async def two_nodes(tmp_path: Path, redis_url: str) -> AsyncIterator[tuple[Node, Node, str]]:
    state_dir = tmp_path / "state"
    token = make_token(state_dir, "acme", [ALIAS])
    prefix = "t" + os.urandom(4).hex()
    async with (
        running_node(node_config(state_dir, redis_url, prefix, node_id="A")) as a,
        running_node(node_config(state_dir, redis_url, prefix, node_id="B")) as b,
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


async def test_http_and_tcp_through_b_reach_the_agent_on_a(tmp_path: Path, redis_url: str) -> None:
    upstream = await start_upstream_server(tcp_echo_port=0)
    try:
        async with two_nodes(tmp_path, redis_url) as (a, b, token):
            async with agent_on(a, token, upstream), aiohttp.ClientSession() as http:
                b_url = f"http://{b.http_address}"

                async def online() -> bool:
                    return await _status(http, f"{b_url}/v1/resolve/{ALIAS}") == 200

                await async_wait_until(online, 10, message="alias online through B")
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
    finally:
        await upstream.close()
