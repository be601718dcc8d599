"""The local/DMZ proxy (``csc-agent proxy``) over real loopback sockets.

Most tests run :class:`tenant_agent.proxy.server.ProxyServer` in the test's event loop in front of the
session's upstream process (tests/support/upstream.py) and talk to it with aiohttp or with raw
sockets when the exact bytes matter. The real ``csc-agent proxy`` runs as a subprocess for the
ready file, the SIGTERM drain, its memory during a large download and a port already in use.
The command line and the parser's property test are in tests/unit/test_agent_proxy_cli.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from tenant_agent.http_upstream import HttpUpstream
from tenant_agent.proxy.config import load_proxy_config
from tenant_agent.proxy.http import HttpFrontend
from tenant_agent.proxy.server import ProxyServer
from tests.support.procs import ProcFactory, UpstreamProc, async_wait_until, scaled
from tests.support.upstream import body_bytes, expected_sha256

MIB = 1024 * 1024


# --- helpers ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def proxy(upstream: str, **settings_: Any) -> AsyncIterator[ProxyServer]:
    """A proxy on 127.0.0.1:0 in this event loop, configured through the real loader."""
    overrides = {"listen": "127.0.0.1:0", "upstream": upstream, **settings_}
    server = ProxyServer(load_proxy_config(file=None, env={}, overrides=overrides))
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def url(server: ProxyServer, path: str = "/") -> str:
    return f"http://{server.address}{path}"


def addr(server: ProxyServer) -> tuple[str, int]:
    host, _, port = server.address.rpartition(":")
    return host, int(port)


def relay_of(server: ProxyServer) -> HttpUpstream:
    frontend = server.frontend
    assert isinstance(frontend, HttpFrontend) and isinstance(frontend.relay, HttpUpstream)
    return frontend.relay


def free_port() -> int:
    """A port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def read_response(
    reader: asyncio.StreamReader, *, no_body: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response: status, headers (lower-case names), body."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if no_body or status in (100, 204, 304):
        return status, headers, b""
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding") == "chunked":
        body = bytearray()
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readexactly(2)
        return status, headers, bytes(body)
    return status, headers, await reader.read()


@contextlib.asynccontextmanager
async def raw(
    server: ProxyServer,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(*addr(server))
    try:
        yield reader, writer
    finally:
        writer.close()


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float) -> bool:
    """True once the peer has closed (EOF or reset) within ``timeout``; data is discarded."""
    try:
        async with asyncio.timeout(scaled(timeout)):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def error_of(resp: aiohttp.ClientResponse) -> tuple[int, str, dict[str, Any]]:
    body = await resp.json()
    assert resp.headers["Content-Type"].startswith("application/json")
    assert body["request_id"] == resp.headers["X-Request-Id"]
    return resp.status, body["error"], body


# --- HTTP: bodies, headers, keep-alive ------------------------------------------------------


async def test_get_and_post_stream_both_ways(upstream_proc: UpstreamProc) -> None:
    async def upload() -> AsyncIterator[bytes]:
        for i in range(40):
            yield bytes([i]) * 128 * 1024

    expected = hashlib.sha256(b"".join(bytes([i]) * 128 * 1024 for i in range(40))).hexdigest()
    async with proxy(upstream_proc.http_url) as server, aiohttp.ClientSession() as http:
        async with http.get(url(server, "/bytes/3000001")) as resp:
            assert resp.status == 200 and resp.headers["Content-Length"] == "3000001"
            assert hashlib.sha256(await resp.read()).hexdigest() == expected_sha256(3_000_001)
        async with http.get(url(server, "/chunked/1000003")) as resp:
            assert resp.headers["Transfer-Encoding"] == "chunked"
            assert hashlib.sha256(await resp.read()).hexdigest() == expected_sha256(1_000_003)
        async with http.post(url(server, "/upload"), data=upload()) as resp:  # chunked upload
            assert await resp.json() == {"bytes": 40 * 128 * 1024, "sha256": expected}
        async with http.put(url(server, "/upload"), data=b"x" * 70000) as resp:
            got = await resp.json()
            assert got["bytes"] == 70000
        async with http.head(url(server, "/bytes/5000")) as resp:
            assert resp.status == 200 and resp.headers["Content-Length"] == "5000"
        async with http.get(url(server, "/status/204")) as resp:
            assert resp.status == 204 and await resp.read() == b""


async def test_large_download_is_streamed(upstream_proc: UpstreamProc) -> None:
    size = 64 * MIB + 17
    async with proxy(upstream_proc.http_url) as server, aiohttp.ClientSession() as http:
        digest, total, peak = hashlib.sha256(), 0, 0
        async with http.get(url(server, f"/bytes/{size}")) as resp:
            async for chunk in resp.content.iter_any():
                digest.update(chunk)
                total += len(chunk)
                peak = max(peak, relay_of(server).buffered)
        assert total == size and digest.hexdigest() == expected_sha256(size)
        assert peak <= 2 * MIB  # bounded by the portal client's marks, never the whole body


async def test_range_requests_pass_through(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096
    (tmp_path / "package.zip").write_bytes(data)
    seen: list[str | None] = []

    async def package(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Range"))
        return web.FileResponse(tmp_path / "package.zip")

    app = web.Application()
    app.router.add_get("/v1/package/1", package)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    portal = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with proxy(portal) as server, aiohttp.ClientSession() as http:
            target = url(server, "/v1/package/1")
            async with http.get(target, headers={"Range": "bytes=1000-"}) as resp:
                assert resp.status == 206
                assert resp.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
                assert resp.headers["Content-Length"] == str(len(data) - 1000)
                assert await resp.read() == data[1000:]
            async with http.get(target, headers={"Range": "bytes=10-19"}) as resp:
                assert resp.status == 206 and await resp.read() == data[10:20]
            async with http.get(target, headers={"Range": f"bytes={len(data) + 5}-"}) as resp:
                assert resp.status == 416
        assert seen == ["bytes=1000-", "bytes=10-19", f"bytes={len(data) + 5}-"]
    finally:
        await runner.cleanup()


async def test_forwarded_headers_and_request_id(upstream_proc: UpstreamProc) -> None:
    async with (
        proxy(upstream_proc.http_url + "/echo/pre") as server,
        aiohttp.ClientSession() as http,
    ):
        sent = {
            "Host": "portal.example:8443",
            "X-Forwarded-For": "10.0.0.7",
            "X-Forwarded-Proto": "gopher",
            "X-Request-Id": "boot-42.a:b",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "dropped",
            "TE": "trailers",
            "Authorization": "Bearer kept",
        }
        async with http.get(url(server, "/a/b?q=1"), headers=sent) as resp:
            got = await resp.json()
            assert resp.headers["X-Request-Id"] == "boot-42.a:b"
        headers = {k.lower(): v for k, v in got["headers"]}
        assert got["path"] == "/echo/pre/a/b" and got["query"] == "q=1"
        assert headers["host"] == upstream_proc.ready["http"]
        assert headers["x-forwarded-for"] == "10.0.0.7, 127.0.0.1"
        assert headers["x-forwarded-proto"] == "http"
        assert headers["x-forwarded-host"] == "portal.example:8443"
        assert headers["x-request-id"] == "boot-42.a:b"
        assert headers["authorization"] == "Bearer kept"
        assert not {"x-hop", "te", "connection", "keep-alive"} & set(headers)
        async with http.get(url(server, "/x"), headers={"X-Request-Id": "bad id!"}) as resp:
            got = await resp.json()
            minted = resp.headers["X-Request-Id"]
        assert re.fullmatch(r"[0-9a-f]{32}", minted)
        assert [v for k, v in got["headers"] if k.lower() == "x-request-id"] == [minted]


async def test_keep_alive_and_pipelining(upstream_proc: UpstreamProc) -> None:
    async with proxy(upstream_proc.http_url) as server, raw(server) as (reader, writer):
        for _ in range(3):
            writer.write(b"GET /small HTTP/1.1\r\nHost: p\r\n\r\n")
            status, headers, body = await read_response(reader)
            assert status == 200 and len(body) == 1024 and "connection" not in headers
        # three pipelined requests in one write, answered in order on the same connection
        writer.write(
            b"GET /bytes/10 HTTP/1.1\r\nHost: p\r\n\r\n"
            b"POST /upload HTTP/1.1\r\nHost: p\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /chunked/7 HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
        )
        answers = [await read_response(reader) for _ in range(3)]
        assert [a[2] for a in answers[::2]] == [
            body_bytes(10),
            body_bytes(7),
        ]
        assert json.loads(answers[1][2])["bytes"] == 3
        assert answers[2][1]["connection"] == "close"
        assert await closed_by_peer(reader, 5)
        assert relay_of(server).connections_opened == 1  # keep-alive towards the portal too
    async with proxy(upstream_proc.http_url) as server, raw(server) as (reader, writer):
        # an upgrade the proxy declines: answered as plain HTTP/1.1, and HTTP/1.1 goes on
        writer.write(
            b"GET /echo/up HTTP/1.1\r\nHost: p\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
            b"GET /small HTTP/1.1\r\nHost: p\r\n\r\n"
        )
        status, _, body = await read_response(reader)
        seen = {name.lower() for name, _ in json.loads(body)["headers"]}
        assert status == 200 and not {"upgrade", "connection"} & seen
        status, _, body = await read_response(reader)
        assert status == 200 and len(body) == 1024


async def test_idle_keep_alive_lasts_idle_timeout(upstream_proc: UpstreamProc) -> None:
    idle = scaled(1.5)
    timeouts = {"header_timeout": "200ms", "idle_timeout": f"{idle}s"}
    async with (
        proxy(upstream_proc.http_url, **timeouts) as server,
        raw(server) as (reader, writer),
    ):
        writer.write(b"GET /small HTTP/1.1\r\nHost: p\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        # idle for longer than header_timeout: a keep-alive connection stays open ...
        assert not await closed_by_peer(reader, 0.5)
        writer.write(b"GET /small HTTP/1.1\r\nHost: p\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        started = time.monotonic()
        assert await closed_by_peer(reader, 2 * idle)  # ... until idle_timeout
        assert time.monotonic() - started > idle * 0.8


async def test_http10_and_expect_continue(upstream_proc: UpstreamProc) -> None:
    async with proxy(upstream_proc.http_url) as server:
        async with raw(server) as (reader, writer):
            writer.write(b"GET /chunked/5000 HTTP/1.0\r\n\r\n")  # no length: ends with the close
            status, headers, body = await read_response(reader)
            assert status == 200 and body == body_bytes(5000)
            assert "transfer-encoding" not in headers and headers["connection"] == "close"
        async with raw(server) as (reader, writer):
            writer.write(
                b"PUT /upload HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\n"
                b"Expect: 100-continue\r\n\r\n"
            )
            status, _, _ = await read_response(reader)
            assert status == 100
            writer.write(b"hello")
            status, _, body = await read_response(reader)
            assert status == 200 and json.loads(body)["bytes"] == 5


# --- HTTP: failures -------------------------------------------------------------------------


async def test_upstream_down_is_502(upstream_proc: UpstreamProc) -> None:
    async with (
        proxy(f"http://127.0.0.1:{free_port()}") as server,
        aiohttp.ClientSession() as http,
        http.get(url(server, "/v1/portal")) as resp,
    ):
        status, code, body = await error_of(resp)
    assert (status, code) == (502, "upstream_refused")
    assert "refused" in body["message"]
    assert "127.0.0.1" not in json.dumps(body)  # the portal's address stays in the log


async def test_upstream_slow_is_504(upstream_proc: UpstreamProc) -> None:
    async with (
        proxy(upstream_proc.http_url, upstream_timeout="300ms") as server,
        aiohttp.ClientSession() as http,
    ):
        started = time.monotonic()
        async with http.get(url(server, "/slow-head?delay=2")) as resp:
            status, code, _ = await error_of(resp)
        assert (status, code) == (504, "upstream_timeout")
        assert time.monotonic() - started < scaled(1.8)
        async with http.get(url(server, "/small")) as resp:  # the proxy is fine afterwards
            assert resp.status == 200


async def test_upstream_breaking_off_aborts_the_response(upstream_proc: UpstreamProc) -> None:
    async with proxy(upstream_proc.http_url) as server, raw(server) as (reader, writer):
        writer.write(b"GET /reset-mid?n=100000&total=500000 HTTP/1.1\r\nHost: p\r\n\r\n")
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            await read_response(reader)  # never a clean, shorter body


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", 400, "bad_request"),
        (b"CONNECT portal:443 HTTP/1.1\r\nHost: portal:443\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n", 431, "headers_too_large"),
        (b"GET /" + b"a" * 5000, 431, "headers_too_large"),  # an unfinished head too
        (b"POST /upload HTTP/1.1\r\nContent-Length: 5000\r\n\r\n", 413, "payload_too_large"),
        (
            b"POST /upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"400\r\n"
            + b"z" * 1024
            + b"\r\n"
            + b"400\r\n"
            + b"z" * 1024
            + b"\r\n",
            413,
            "payload_too_large",
        ),
    ],
)
async def test_malformed_and_oversized_requests(
    upstream_proc: UpstreamProc, request_bytes: bytes, status: int, code: str
) -> None:
    limits = {"max_header_size": "4KiB", "max_body_size": "1500"}
    async with (
        proxy(upstream_proc.http_url, **limits) as server,
        raw(server) as (reader, writer),
    ):
        writer.write(request_bytes)
        got, headers, body = await read_response(reader)
        assert (got, json.loads(body)["error"]) == (status, code)
        assert headers["connection"] == "close"
        assert headers["content-type"] == "application/json"
        assert await closed_by_peer(reader, 5)


async def test_slowloris_is_cut_off(upstream_proc: UpstreamProc) -> None:
    timeouts = {"header_timeout": "400ms", "idle_timeout": "400ms"}
    async with proxy(upstream_proc.http_url, **timeouts) as server:
        async with raw(server) as (reader, writer):  # a head dripped one byte at a time
            started = time.monotonic()
            writer.write(b"GET / HTTP/1.1\r\n")
            for byte in b"X-Slow: " + b"a" * 200:
                writer.write(bytes([byte]))
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                if await closed_by_peer(reader, 0.05):  # the pace of the drip
                    break
            elapsed = time.monotonic() - started
            assert 0.35 < elapsed < scaled(3)
        async with raw(server) as (reader, writer):  # a body that stops halfway
            writer.write(b"POST /upload HTTP/1.1\r\nContent-Length: 1000\r\n\r\n" + b"b" * 10)
            assert await closed_by_peer(reader, 3)
        async with raw(server) as (reader, _):  # a connection that never says anything
            assert await closed_by_peer(reader, 3)
        await async_wait_until(lambda: not server.frontend.connections, 3)  # type: ignore[attr-defined]


async def test_tls_listener_and_https_upstream(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    ca.cert_pem.write_to_path(ca_file)

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"proto": request.headers.get("X-Forwarded-Proto")})

    app = web.Application()
    app.router.add_get("/hello", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx).start()
    portal = f"https://127.0.0.1:{runner.addresses[0][1]}"
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    tls = {"tls_cert": str(cert_file), "tls_key": str(key_file), "ca_file": str(ca_file)}
    try:
        async with proxy(portal, **tls) as server, aiohttp.ClientSession() as http:
            assert server.url.startswith("https://")
            async with http.get(f"{server.url}/hello", ssl=client_ctx) as resp:
                assert await resp.json() == {"proto": "https"}
    finally:
        await runner.cleanup()


# --- TCP mode -----------------------------------------------------------------------------


async def test_tcp_mode_forwards_with_half_close(upstream_proc: UpstreamProc) -> None:
    host, port = upstream_proc.tcp_echo_addr
    payload = bytes(range(256)) * 8192  # 2 MiB
    async with proxy(f"tcp://{host}:{port}") as server:
        reader, writer = await asyncio.open_connection(*addr(server))
        writer.write(payload)
        writer.write_eof()  # our direction ends; the echo's answer must still come back
        async with asyncio.timeout(scaled(10)):
            echoed = await reader.read()  # up to the echo server's own EOF
        writer.close()
        assert echoed == payload
        await async_wait_until(lambda: not server.frontend.forwards, 5)  # type: ignore[attr-defined]


async def test_tcp_mode_upstream_down_closes_the_client() -> None:
    async with proxy(f"tcp://127.0.0.1:{free_port()}") as server:
        reader, writer = await asyncio.open_connection(*addr(server))
        assert await closed_by_peer(reader, 5)
        writer.close()


# --- uvloop ------------------------------------------------------------------------------


async def _scenario(upstream: UpstreamProc) -> None:
    async with (
        proxy(upstream.http_url, header_timeout="300ms") as server,
        aiohttp.ClientSession() as http,
    ):
        async with http.get(url(server, "/bytes/5000000")) as resp:
            assert hashlib.sha256(await resp.read()).hexdigest() == expected_sha256(5_000_000)
        async with http.post(url(server, "/upload"), data=b"u" * 300_000) as resp:
            assert (await resp.json())["bytes"] == 300_000
        async with raw(server) as (reader, writer):
            writer.write(b"GET /bytes/3 HTTP/1.1\r\n\r\nGET /bytes/4 HTTP/1.1\r\n\r\n")
            assert [(await read_response(reader))[2] for _ in range(2)] == [
                body_bytes(3),
                body_bytes(4),
            ]
        async with raw(server) as (reader, writer):
            writer.write(b"GET / HTTP/1.1\r\n")
            assert await closed_by_peer(reader, 3)
    host, port = upstream.tcp_echo_addr
    async with proxy(f"tcp://{host}:{port}") as server:
        reader, writer = await asyncio.open_connection(*addr(server))
        writer.write(b"early bytes, before the upstream connection is up")
        writer.write_eof()
        assert await reader.read() == b"early bytes, before the upstream connection is up"
        writer.close()


def test_on_uvloop(upstream_proc: UpstreamProc) -> None:
    """``csc-agent proxy`` runs on uvloop, whose transports differ from asyncio's (it starts
    reading only after ``connection_made`` returns, for one)."""
    import uvloop  # a dependency on Linux, where the tests run

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_scenario(upstream_proc))


# --- the real process ---------------------------------------------------------------------


def _proxy_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tenant_agent", "proxy", *args]


async def test_process_ready_file_logs_and_sigterm_drain(
    procs: ProcFactory, upstream_proc: UpstreamProc, tmp_path: Path
) -> None:
    ready = tmp_path / "proxy.ready.json"
    argv = _proxy_argv("--listen", "127.0.0.1:0", "--upstream", upstream_proc.http_url)
    proc = procs.spawn("proxy", [*argv, "--ready-file", str(ready)], ready_file=ready)
    assert proc.ready["mode"] == "http" and proc.ready["pid"] == proc.pid
    host, _, port = proc.ready["listen"].rpartition(":")
    size = 2 * MIB
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET /bytes/{size}?rate={4 * MIB} HTTP/1.1\r\nHost: p\r\n"
        "Authorization: Bearer do-not-log-me\r\nX-Request-Id: drain-1\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    proc.terminate()  # the download is in flight: it must finish

    async with asyncio.timeout(scaled(5)):  # poll until the listener is gone
        while True:
            try:
                _, probe = await asyncio.open_connection(host, int(port))
            except OSError:
                break
            probe.close()
            await asyncio.sleep(0.02)
    body = await reader.readexactly(size)
    writer.close()
    assert hashlib.sha256(body).hexdigest() == expected_sha256(size)
    assert await asyncio.to_thread(proc.wait, 10) == 0
    _, err = proc.logs(100_000)
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    [request] = [line for line in lines if line.get("request_id") == "drain-1"]
    assert request["status"] == 200 and request["bytes_out"] == size
    assert request["outcome"] == "complete" and request["duration_ms"] > 0
    assert "do-not-log-me" not in err


async def test_process_large_download_memory(
    procs: ProcFactory, upstream_proc: UpstreamProc, tmp_path: Path
) -> None:
    ready = tmp_path / "proxy.ready.json"
    argv = _proxy_argv("--listen", "127.0.0.1:0", "--upstream", upstream_proc.http_url)
    proc = procs.spawn("proxy", [*argv, "--ready-file", str(ready)], ready_file=ready)
    before = proc.rss()
    size = 64 * MIB
    digest = hashlib.sha256()
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{proc.ready['listen']}/bytes/{size}") as resp,
    ):
        async for chunk in resp.content.iter_chunked(256 * 1024):
            digest.update(chunk)
    assert digest.hexdigest() == expected_sha256(size)
    assert proc.peak_rss() - before < 24 * MIB  # never the whole body


async def test_process_tcp_mode(
    procs: ProcFactory, upstream_proc: UpstreamProc, tmp_path: Path
) -> None:
    ready = tmp_path / "proxy.ready.json"
    host, port = upstream_proc.tcp_echo_addr
    argv = _proxy_argv("--listen", "127.0.0.1:0", "--upstream", f"tcp://{host}:{port}")
    proc = procs.spawn("proxy", [*argv, "--ready-file", str(ready)], ready_file=ready)
    assert proc.ready["mode"] == "tcp"
    listen_host, _, listen_port = proc.ready["listen"].rpartition(":")
    reader, writer = await asyncio.open_connection(listen_host, int(listen_port))
    payload = bytes(range(251)) * 4000
    writer.write(payload)
    writer.write_eof()
    async with asyncio.timeout(scaled(10)):
        assert await reader.read() == payload
    writer.close()
    proc.terminate()
    assert await asyncio.to_thread(proc.wait, 10) == 0


def test_process_port_in_use_and_bad_settings(procs: ProcFactory) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = _proxy_argv("--listen", f"127.0.0.1:{port}", "--upstream", "http://127.0.0.1:1")
        proc = procs.spawn("proxy", argv)
        assert proc.wait(20) == 2
    _, err = proc.logs()
    assert f"csc-agent proxy: cannot listen: 127.0.0.1:{port} is already in use" in err
    assert "('127.0.0.1'" not in err and "Traceback" not in err
