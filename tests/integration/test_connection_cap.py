"""``client_max_connections``: one client address cannot hold more connections than that on a
node's public and TCP listeners together, and nobody else notices (real sockets; the flooding
address is 127.0.0.2, another loopback address, so that the test's own client stays apart).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from csc.relay import conncap
from csc.relay.conncap import ConnectionCounts
from shared.config import AUTO
from tests.support.inproc import ALIAS, Relay, relay
from tests.support.procs import async_wait_until, scaled

FLOOD = "127.0.0.2"


async def _connect(
    r: Relay, *, tcp: bool = False
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = r.tcp_address if tcp else r.node.http_address.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port), local_addr=(FLOOD, 0))


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), scaled(10))


def _refused_counts(text: str, reason: str = "client_connections") -> dict[str, float]:
    return {
        sample.labels["listener"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "csc_connections_refused"
        for sample in family.samples
        if sample.name == "csc_connections_refused_total" and sample.labels["reason"] == reason
    }


async def test_an_address_at_its_bound_is_refused_at_once_and_others_are_served(
    tmp_path: Path,
) -> None:
    settings = {"client_max_connections": 3, "max_connections": 100}
    async with relay(tmp_path, csc=settings, agent={"sessions": 2}) as r:
        counts = r.node.state.connections
        # the agent's two links came through the public listener and no longer count
        await async_wait_until(
            lambda: counts.addresses == 0, scaled(10), message="connections still counted"
        )
        held = [await _connect(r) for _ in range(2)]
        held.append(await _connect(r, tcp=True))  # both listeners share the bound
        await async_wait_until(
            lambda: counts.held(FLOOD) == 3, scaled(10), message="three connections counted"
        )

        # over the bound: answered before its request is read, and the request is discarded
        # (a body larger than the socket buffers: the answer still arrives, not a reset)
        reader, writer = await _connect(r)
        body = b"x" * (1024 * 1024)
        head = (
            f"POST /t/{ALIAS}/upload HTTP/1.1\r\nHost: csc\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        answer = await _read_all(reader)
        writer.close()
        status, _, rest = answer.partition(b"\r\n")
        assert status == b"HTTP/1.1 429 Too Many Requests", answer[:200]
        fields, _, payload = rest.partition(b"\r\n\r\n")
        assert b"Retry-After: 1" in fields.split(b"\r\n")
        assert b"Connection: close" in fields.split(b"\r\n")
        error = json.loads(payload)
        assert error["error"] == "too_many_connections"
        assert "at most 3" in error["message"]

        reader, writer = await _connect(r, tcp=True)
        writer.write(f"CONNECT {ALIAS}\r\n".encode())
        answer = await _read_all(reader)
        writer.close()
        assert answer.startswith(b"ERR 429 too_many_connections: "), answer
        assert answer.endswith(b"\r\n") and answer.count(b"\r\n") == 1

        # another address is served meanwhile, through the tunnel and the TCP ingress
        async with aiohttp.ClientSession() as http, http.get(r.tunnel("/small")) as resp:
            assert resp.status == 200
        host, port = r.tcp_address
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"CONNECT {ALIAS}\r\n".encode())
        assert await asyncio.wait_for(reader.readline(), scaled(10)) == b"OK\r\n"
        writer.close()

        # a connection that closes gives its place back
        held.pop()[1].close()
        await async_wait_until(
            lambda: counts.held(FLOOD) == 2, scaled(10), message="the closed one still counted"
        )
        reader, writer = await _connect(r)
        writer.write(
            f"GET /t/{ALIAS}/small HTTP/1.1\r\nHost: csc\r\nConnection: close\r\n\r\n".encode()
        )
        assert (await _read_all(reader)).startswith(b"HTTP/1.1 200 ")
        writer.close()

        async with aiohttp.ClientSession() as http, http.get(r.metrics_url) as resp:
            assert _refused_counts(await resp.text()) == {"http": 1.0, "tcp": 1.0}
        for _, w in held:
            w.close()
        await async_wait_until(
            lambda: counts.held(FLOOD) == 0, scaled(10), message="closed connections still counted"
        )


async def test_without_a_bound_an_address_may_hold_any_number(tmp_path: Path) -> None:
    async with relay(tmp_path, csc={"client_max_connections": None}, start=False) as r:
        held = [await _connect(r) for _ in range(20)]
        reader, writer = await _connect(r)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: csc\r\nConnection: close\r\n\r\n")
        assert (await _read_all(reader)).startswith(b"HTTP/1.1 200 ")
        writer.close()
        for _, w in held:
            w.close()


async def test_a_node_at_max_connections_refuses_at_once_and_agent_links_count(
    tmp_path: Path,
) -> None:
    settings = {"max_connections": 4, "client_max_connections": None}
    async with relay(tmp_path, csc=settings, agent={"sessions": 2}) as r:
        counts = r.node.state.connections
        # the agent's two links hold two of the node's four places
        await async_wait_until(lambda: counts.total == 2, scaled(10), message="two agent links")
        held = [await _connect(r), await _connect(r, tcp=True)]
        await async_wait_until(lambda: counts.total == 4, scaled(10), message="four counted")
        for tcp in (False, True):
            reader, writer = await _connect(r, tcp=tcp)
            if not tcp:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: csc\r\n\r\n")
            answer = await _read_all(reader)
            writer.close()
            if tcp:
                assert answer.startswith(b"ERR 503 node_full: "), answer
            else:
                assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
                assert b"Retry-After: 5\r\n" in answer
                assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "node_full"
        for _, w in held:
            w.close()
        await async_wait_until(lambda: counts.total == 2, scaled(10), message="places back")
        # the agent's links stay counted while they live, and are given back when they end
        await r.stop_agent()
        await async_wait_until(lambda: counts.total == 0, scaled(10), message="links counted")
        async with aiohttp.ClientSession() as http, http.get(r.metrics_url) as resp:
            text = await resp.text()
        assert _refused_counts(text, "node_connections") == {"http": 1.0, "tcp": 1.0}
        gauges = {
            family.name: family.samples[0].value
            for family in text_string_to_metric_families(text)
            if family.name in ("csc_connections", "csc_connections_max")
        }
        assert gauges == {"csc_connections": 0.0, "csc_connections_max": 4.0}


def test_auto_leaves_an_eighth_of_the_open_file_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = {"soft": 4096}
    monkeypatch.setattr(
        conncap.resource, "getrlimit", lambda _which: (limits["soft"], limits["soft"] * 2)
    )
    assert conncap.node_bound(AUTO) == 4096 - 512
    limits["soft"] = 256
    assert conncap.node_bound(AUTO) == 256 - 64
    limits["soft"] = conncap.resource.RLIM_INFINITY
    assert conncap.node_bound(AUTO) is None
    assert conncap.node_bound(100) == 100


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        ("127.0.0.2", "127.0.0.2", True),
        ("127.0.0.2", "127.0.0.3", False),
        ("2001:db8::1", "2001:db8::ffff:2", True),  # one /64
        ("2001:db8::1", "2001:db8:0:1::1", False),
        ("::ffff:192.0.2.1", "192.0.2.1", True),  # IPv4-mapped
    ],
)
def test_addresses_are_counted_by_ip_and_ipv6_by_64(first: str, second: str, same: bool) -> None:
    counts = ConnectionCounts(1)
    assert isinstance(counts.take(first, "http"), str)
    assert isinstance(counts.take(second, "http"), str) is not same
