"""``proxy_protocol``: a balancer's PROXY header names the client of each connection it relays,
for the portal's ``X-Forwarded-For``, the bounds per address and the access log, on both public
listeners and under TLS (real sockets; the balancer is 127.0.0.3, another loopback address, so
the agent and the test's own requests from 127.0.0.1 stay direct clients)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import ssl
import struct
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from csc.relay.proxyheader import V2_SIGNATURE
from csc.server import running_node
from tests.support.inproc import ALIAS, Relay, relay, tls_listeners
from tests.support.procs import async_wait_until, scaled

BALANCER = "127.0.0.3"
DEVICE = "203.0.113.9"


def v1(client: str, port: int = 50000) -> bytes:
    return f"PROXY TCP4 {client} 10.0.0.1 {port} 443\r\n".encode()


def v2(client: str, port: int = 50000) -> bytes:
    address = ipaddress.ip_address(client)
    family, other = (0x11, bytes(4)) if address.version == 4 else (0x21, bytes(16))
    body = address.packed + other + struct.pack("!HH", port, 443)
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(body)) + body


async def _open(
    r: Relay, header: bytes, *, tcp: bool = False
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection from the balancer that starts with ``header``."""
    host, port = r.tcp_address if tcp else r.node.http_address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), local_addr=(BALANCER, 0))
    writer.write(header)
    return reader, writer


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> bytes:
    request = f"GET {path} HTTP/1.1\r\nHost: csc\r\nConnection: close\r\n\r\n"
    writer.write(request.encode())
    answer = await asyncio.wait_for(reader.read(), scaled(10))
    writer.close()
    return answer


async def _closed_unanswered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Whether the node closed the connection without a byte (a reset when bytes it did not
    read were left, else an end of stream)."""
    try:
        return await asyncio.wait_for(reader.read(), scaled(10)) == b""
    except ConnectionResetError:
        return True
    finally:
        writer.close()


def _refused(registry: CollectorRegistry, listener: str) -> float:
    """Connections of the listener closed for their PROXY header (the metric)."""
    labels = {"listener": listener, "reason": "proxy_header"}
    return registry.get_sample_value("csc_connections_refused_total", labels) or 0.0


def _forwarded_for(answer: bytes) -> str:
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 200 OK", answer[:300]
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    return str({k.lower(): v for k, v in body["headers"]}["x-forwarded-for"])


@pytest.mark.parametrize("header", [v1, v2], ids=["v1", "v2"])
async def test_the_portal_sees_the_client_a_balancers_header_names(
    tmp_path: Path, header: object
) -> None:
    assert callable(header)
    async with relay(tmp_path, csc={"proxy_protocol": [BALANCER]}) as r:
        answer = await _get(*await _open(r, header(DEVICE)), f"/t/{ALIAS}/echo/x")
        assert _forwarded_for(answer) == DEVICE
        ipv6 = await _get(*await _open(r, v2("2001:db8::9")), f"/t/{ALIAS}/echo/x")
        assert _forwarded_for(ipv6) == "2001:db8::9"
        # a peer that is not a balancer (here the test itself) is its own client
        reader, writer = await asyncio.open_connection(*r.node.http_address.rsplit(":", 1))
        assert _forwarded_for(await _get(reader, writer, f"/t/{ALIAS}/echo/x")) == "127.0.0.1"


async def test_the_bounds_per_address_count_the_named_clients(tmp_path: Path) -> None:
    settings = {"proxy_protocol": [BALANCER], "client_max_connections": 2}
    async with relay(tmp_path, csc=settings) as r:
        counts = r.node.state.connections
        held = [await _open(r, v1(DEVICE, 1)), await _open(r, v2(DEVICE, 2), tcp=True)]
        await async_wait_until(
            lambda: counts.held(DEVICE) == 2, scaled(10), message="two connections of the device"
        )
        assert counts.held(BALANCER) == 0
        refused = await _get(*await _open(r, v1(DEVICE, 3)), f"/t/{ALIAS}/small")
        assert refused.startswith(b"HTTP/1.1 429 Too Many Requests"), refused[:200]
        reader, writer = await _open(r, v2(DEVICE, 4), tcp=True)
        writer.write(f"CONNECT {ALIAS}\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), scaled(10))
        assert line.startswith(b"ERR 429 too_many_connections"), line
        writer.close()
        # another device behind the same balancer is served meanwhile, on both listeners
        other = await _get(*await _open(r, v1("203.0.113.10")), f"/t/{ALIAS}/small")
        assert other.startswith(b"HTTP/1.1 200 OK"), other[:200]
        reader, writer = await _open(r, v1("203.0.113.10"), tcp=True)
        writer.write(f"CONNECT {ALIAS}\r\n".encode())
        assert await asyncio.wait_for(reader.readline(), scaled(10)) == b"OK\r\n"
        writer.write(b"echo me")
        assert await asyncio.wait_for(reader.readexactly(7), scaled(10)) == b"echo me"
        writer.close()
        for _, w in held:
            w.close()


@pytest.mark.parametrize("tcp", [False, True], ids=["http", "tcp"])
async def test_a_balancers_connection_without_a_valid_header_is_closed_unanswered(
    tmp_path: Path, tcp: bool
) -> None:
    settings = {"proxy_protocol": [BALANCER], "http_head_timeout": 1.0}
    async with relay(tmp_path, csc=settings) as r:
        listener = "tcp" if tcp else "http"
        first = f"CONNECT {ALIAS}\r\n" if tcp else f"GET /t/{ALIAS}/small HTTP/1.1\r\n\r\n"
        for start in (first.encode(), b"PROXY TCP4 203.0.113.9 10.0.0.1 080 443\r\n"):
            assert await _closed_unanswered(*await _open(r, start, tcp=tcp))
        # a header that never ends: closed once http_head_timeout has passed
        assert await _closed_unanswered(*await _open(r, b"PROXY TCP4 ", tcp=tcp))
        assert _refused(r.node.state.metrics.registry, listener) == 3
        # the node serves on
        answer = await _get(*await _open(r, v2(DEVICE)), f"/t/{ALIAS}/echo/x")
        assert _forwarded_for(answer) == DEVICE


async def test_under_tls_the_header_comes_before_the_handshake(tmp_path: Path) -> None:
    config, ca_file = tls_listeners(tmp_path, proxy_protocol=[BALANCER])
    client_ctx = ssl.create_default_context(cafile=str(ca_file))
    async with running_node(config) as node:
        counts = node.state.connections
        assert node.tcp_address is not None
        for address in (node.http_address, node.tcp_address):
            host, _, port = address.rpartition(":")
            reader, writer = await asyncio.open_connection(
                host, int(port), local_addr=(BALANCER, 0)
            )
            writer.write(v2(DEVICE))
            await writer.drain()
            await writer.start_tls(client_ctx, server_hostname="127.0.0.1")
            await async_wait_until(
                lambda: counts.held(DEVICE) == 1, scaled(10), message="the device counted"
            )
            if address == node.http_address:
                answer = await _get(reader, writer, "/healthz")
                assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:200]
            else:
                writer.close()
            await async_wait_until(
                lambda: counts.held(DEVICE) == 0, scaled(10), message="the device still counted"
            )
        # a TLS ClientHello where the header should be: closed unanswered, counted
        for address, listener in ((node.http_address, "http"), (node.tcp_address, "tcp")):
            host, _, port = address.rpartition(":")
            reader, writer = await asyncio.open_connection(
                host, int(port), local_addr=(BALANCER, 0)
            )
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await writer.start_tls(client_ctx, server_hostname="127.0.0.1")
            writer.close()
            assert _refused(node.state.metrics.registry, listener) == 1
