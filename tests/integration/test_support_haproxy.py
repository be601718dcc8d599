"""The HAProxy fixture (tests/support/haproxy.py) with a real ``haproxy`` process.

Two tiny aiohttp backends on loopback (their ``/readyz`` can be flipped to 503) and a TCP echo
server each stand behind it: requests spread over both, a backend failing ``/readyz`` is taken
out, a WebSocket outlives the client/server timeouts, the TCP frontend forwards both ways, and
the backend set changes through the runtime API.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from tests.support.haproxy import TCP_BACKEND, HaproxyProc, split_backend
from tests.support.procs import scaled

Start = Callable[..., HaproxyProc]


@dataclass
class Node:
    """One backend: HTTP (``/who``, ``/readyz``, ``/ws`` echo) and a TCP echo server."""

    name: str
    ready: bool = True
    http: str = ""
    tcp: str = ""
    _cleanups: list[Callable[[], object]] = field(default_factory=list)

    async def who(self, request: web.Request) -> web.Response:
        return web.Response(text=self.name)

    async def readyz(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.ready else 503, text=self.name)

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(f"{self.name}:{msg.data}")
        return ws

    async def echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"{self.name}\n".encode())
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def nodes(*names: str) -> AsyncIterator[list[Node]]:
    runners: list[web.AppRunner] = []
    servers: list[asyncio.Server] = []
    made = [Node(name) for name in names]
    try:
        for node in made:
            app = web.Application()
            app.router.add_get("/who", node.who)
            app.router.add_get("/readyz", node.readyz)
            app.router.add_get("/ws", node.ws)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            node.http = f"127.0.0.1:{runner.addresses[0][1]}"
            server = await asyncio.start_server(node.echo, "127.0.0.1", 0)
            servers.append(server)
            node.tcp = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        yield made
    finally:
        for server in servers:
            server.close()
        for runner in runners:
            await runner.cleanup()


async def _who(url: str, count: int) -> list[str]:
    """``count`` requests to ``/who``, each on a new connection."""
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=scaled(10))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        names = []
        for _ in range(count):
            async with http.get(f"{url}/who") as resp:
                assert resp.status == 200, await resp.text()
                names.append(await resp.text())
        return names


async def _all_up(hap: HaproxyProc, count: int, backend: str = "http_nodes") -> None:
    for i in range(count):
        await hap.async_wait_backend_state(f"n{i}", "UP", backend=backend)


async def test_requests_spread_over_both_backends(haproxy: Start) -> None:
    async with nodes("a", "b") as (a, b):
        hap = haproxy([a.http, b.http])
        await _all_up(hap, 2)
        assert set(await _who(hap.http_url, 10)) == {"a", "b"}
        assert hap.server_states()[("http_nodes", "n2")] == "MAINT"  # a spare slot


async def test_a_backend_failing_readyz_is_taken_out_and_back(haproxy: Start) -> None:
    async with nodes("a", "b") as (a, b):
        hap = haproxy([a.http, b.http])
        await _all_up(hap, 2)
        b.ready = False
        await hap.async_wait_backend_state(b.http, "DOWN", timeout=3.0)
        assert set(await _who(hap.http_url, 10)) == {"a"}
        b.ready = True
        await hap.async_wait_backend_state(b.http, "UP", timeout=3.0)
        assert set(await _who(hap.http_url, 10)) == {"a", "b"}
        log = hap.stderr_path.read_text(errors="replace")
        assert "http_nodes/n1 is DOWN" in log


async def test_a_websocket_outlives_the_idle_timeouts(haproxy: Start) -> None:
    async with nodes("a") as (a,), aiohttp.ClientSession() as http:
        hap = haproxy([a.http], timeout_client="1s", timeout_server="1s")
        await _all_up(hap, 1)
        async with http.ws_connect(f"{hap.http_url}/ws", autoping=False) as ws:
            await ws.send_str("one")
            assert (await ws.receive(timeout=scaled(10))).data == "a:one"
            # 3 s without a byte either way: the tunnel timeout (1h) applies, not the 1 s ones
            with pytest.raises(asyncio.TimeoutError):
                await ws.receive(timeout=3.0)
            await ws.send_str("two")
            assert (await ws.receive(timeout=scaled(10))).data == "a:two"


async def test_the_tcp_frontend_forwards_both_ways(haproxy: Start) -> None:
    async with nodes("a", "b") as (a, b):
        hap = haproxy([a.http, b.http], [a.tcp, b.tcp])
        await _all_up(hap, 2, TCP_BACKEND)
        assert hap.tcp_address is not None
        seen = set()
        payload = b"CONNECT acme@example.com\r\n" + os.urandom(1 << 20)
        for _ in range(4):
            reader, writer = await asyncio.open_connection(*hap.tcp_address)
            seen.add((await asyncio.wait_for(reader.readline(), scaled(10))).strip())
            writer.write(payload)
            await writer.drain()
            echoed = await asyncio.wait_for(reader.readexactly(len(payload)), scaled(10))
            assert echoed == payload
            writer.close()
            await writer.wait_closed()
        assert seen == {b"a", b"b"}
        # the TCP side of a node is checked through that node's /readyz
        a.ready = False
        await hap.async_wait_backend_state("n0", "DOWN", backend=TCP_BACKEND, timeout=3.0)


async def test_the_backend_set_changes_through_the_runtime_api(haproxy: Start) -> None:
    async with nodes("a", "b") as (a, b):
        hap = haproxy([a.http])
        await _all_up(hap, 1)
        assert set(await _who(hap.http_url, 4)) == {"a"}
        pid = hap.pid
        hap.set_backends([a.http, b.http])
        await _all_up(hap, 2)
        assert set(await _who(hap.http_url, 10)) == {"a", "b"}
        hap.set_backends([b.http])
        await hap.async_wait_backend_state("n1", "MAINT")
        await hap.async_wait_backend_state(b.http, "UP")
        assert set(await _who(hap.http_url, 6)) == {"b"}
        assert hap.pid == pid and hap.running  # one process throughout


def test_backend_addresses_are_checked() -> None:
    assert split_backend("http://127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert split_backend("[::1]:99") == ("::1", 99)
    for bad in ("127.0.0.1", "127.0.0.1:0", "http://127.0.0.1:80/x", ":80", "h:port"):
        with pytest.raises(ValueError, match="host:port"):
            split_backend(bad)
