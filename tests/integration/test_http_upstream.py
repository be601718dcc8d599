"""The agent's HTTP/1.1 client (tenant_agent/http_upstream.py) through real relays.

Most tests go bootloader → CSC → agent → portal over loopback: the test upstream for ordinary
endpoints, and tiny scripted asyncio servers (:class:`RawPortal`) for what a well-behaved
aiohttp server never does (EOF-delimited bodies, interim responses, 101, garbage, truncation,
closing idle keep-alive connections, answering before the upload ends).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web

from shared.errors import Cancelled
from shared.link import SendFn
from shared.protocol import FrameDecoder, FrameType
from tenant_agent.http_upstream import HIGH_WATER, HttpUpstream
from tests.support.inproc import Relay, relay, start_agent, wait_online
from tests.support.procs import async_wait_until, scaled
from tests.support.upstream import SMALL_BODY, create_upstream_app, expected_sha256

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class RawPortal:
    """A scripted HTTP server: ``script(reader, writer, n)`` runs for the ``n``-th connection."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RawPortal:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.script(reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def ok(body: bytes, *extra: str) -> bytes:
    lines = ["HTTP/1.1 200 OK", f"Content-Length: {len(body)}", *extra, "", ""]
    return "\r\n".join(lines).encode() + body


async def _until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    await async_wait_until(predicate, timeout, 0.01)


def pool(r: Relay) -> HttpUpstream:
    assert r.agent is not None
    return r.agent.upstreams.http


async def _error_code(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url) as resp:
        return resp.status, (await resp.json())["error"]


# --- the ordinary endpoints ---------------------------------------------------------------


async def test_keep_alive_reuses_one_connection(tmp_path: Path) -> None:
    async with relay(tmp_path) as r, aiohttp.ClientSession() as http:
        for i in range(20):
            async with http.get(r.tunnel("/small")) as resp:
                assert resp.status == 200
                assert await resp.read() == SMALL_BODY
            if i % 5 == 0:  # a streamed Content-Length body (past the parser) in between
                async with http.get(r.tunnel("/bytes/3000000")) as resp:
                    body = await resp.read()
                assert hashlib.sha256(body).hexdigest() == expected_sha256(3_000_000)
        assert pool(r).connections_opened == 1
        assert pool(r).idle_count == 1


async def test_host_prefix_and_framing_headers(tmp_path: Path) -> None:
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        await start_agent(r, upstream=f"{r.upstream.http_url}/echo/pre/")
        await wait_online(r.csc_url)
        async with http.get(r.tunnel("/x/y?q=1"), headers={"Host": "evil.example"}) as resp:
            got = await resp.json()
        assert (got["method"], got["path"], got["query"]) == ("GET", "/echo/pre/x/y", "q=1")
        headers = {k.lower(): v for k, v in got["headers"]}
        assert headers["host"] == f"127.0.0.1:{r.upstream.http_port}"
        assert headers["x-forwarded-host"] == "evil.example"  # the bootloader's Host
        assert "content-length" not in headers and "transfer-encoding" not in headers
        async with http.post(r.tunnel("/empty")) as resp:
            got = await resp.json()
        headers = {k.lower(): v for k, v in got["headers"]}
        assert headers["content-length"] == "0"
        assert got["body_bytes"] == 0


async def test_credentials_in_the_upstream_url(tmp_path: Path) -> None:
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        await start_agent(r, upstream=f"http://us%40r:s3cret@127.0.0.1:{r.upstream.http_port}")
        await wait_online(r.csc_url)
        async with http.get(r.tunnel("/echo/a"), headers={"Authorization": "Bearer x"}) as resp:
            got = await resp.json()
        auth = [v for k, v in got["headers"] if k.lower() == "authorization"]
        assert auth == ["Basic " + base64.b64encode(b"us@r:s3cret").decode()]
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        await start_agent(r, upstream="http://user:s3cret@127.0.0.1:9")
        await wait_online(r.csc_url)
        async with http.get(r.tunnel("/x")) as resp:
            body = await resp.json()
        assert body["error"] == "upstream_refused"
        # neither the password nor the address reaches the device
        assert "s3cret" not in body["message"] and "127.0.0.1:9" not in body["message"]


async def test_head_keeps_content_length_without_body(tmp_path: Path) -> None:
    async with relay(tmp_path) as r, aiohttp.ClientSession() as http:
        for _ in range(2):
            async with http.head(r.tunnel("/bytes/123456")) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Length"] == "123456"
                assert await resp.read() == b""
        async with http.get(r.tunnel("/bytes/1000")) as resp:
            assert hashlib.sha256(await resp.read()).hexdigest() == expected_sha256(1000)
        assert pool(r).connections_opened == 3  # a HEAD's connection is never reused


@pytest.mark.parametrize("code", [204, 304])
async def test_no_body_statuses(tmp_path: Path, code: int) -> None:
    async with relay(tmp_path) as r, aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.get(r.tunnel(f"/status/{code}")) as resp:
                assert resp.status == code
                assert await resp.read() == b""
        assert pool(r).connections_opened == 1
        async with http.get(r.tunnel("/status/418")) as resp:
            assert (resp.status, await resp.json()) == (418, {"status": 418})


async def test_chunked_download_and_upload(tmp_path: Path) -> None:
    size = 3 * 1024 * 1024 + 5

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(300):
            yield bytes([i % 256]) * (1 + i * 71)

    payload = b"".join(bytes([i % 256]) * (1 + i * 71) for i in range(300))
    async with relay(tmp_path) as r, aiohttp.ClientSession() as http:
        for n in (0, 100, size):
            async with http.get(r.tunnel(f"/chunked/{n}")) as resp:
                body = await resp.read()
            assert hashlib.sha256(body).hexdigest() == expected_sha256(n)
        async with http.post(r.tunnel("/upload"), data=pieces()) as resp:
            got = await resp.json()
        assert got == {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        async with http.put(r.tunnel("/upload"), data=b"tiny") as resp:
            assert (await resp.json())["bytes"] == 4


async def test_small_response_is_one_link_message(tmp_path: Path) -> None:
    async with relay(tmp_path) as r, aiohttp.ClientSession() as http:
        assert r.agent is not None
        sent: list[bytes] = []
        for session in r.agent.sessions:
            send = session.link._send

            async def recording(chunks: Sequence[bytes | memoryview], send: SendFn = send) -> None:
                sent.append(b"".join(chunks))
                await send(chunks)

            session.link._send = recording
        async with http.get(r.tunnel("/small")) as resp:
            assert await resp.read() == SMALL_BODY
        decoded = [FrameDecoder(1 << 24).feed(message) for message in sent]
        with_head = [f for f in decoded if any(x.type == FrameType.OPEN_OK for x in f)]
        assert len(with_head) == 1
        kinds = [(x.type, x.flags) for x in with_head[0]]
        data = b"".join(bytes(x.payload) for x in with_head[0] if x.type == FrameType.DATA)
        assert data == SMALL_BODY
        assert (FrameType.DATA, 1) in kinds or FrameType.FIN in [k for k, _ in kinds]


async def test_slow_reader_bounds_what_the_agent_buffers(tmp_path: Path) -> None:
    size = 64 * 1024 * 1024
    async with relay(tmp_path) as r, aiohttp.ClientSession() as http:
        async with http.get(r.tunnel(f"/bytes/{size}")) as resp:
            digest, got, peak = hashlib.sha256(), 0, 0
            for _ in range(60):  # a slow bootloader: 64 KiB every 10 ms
                data = await resp.content.read(64 * 1024)
                digest.update(data)
                got += len(data)
                peak = max(peak, pool(r).buffered)
                await asyncio.sleep(0.01)
            async for data in resp.content.iter_any():
                digest.update(data)
                got += len(data)
                peak = max(peak, pool(r).buffered)
        assert got == size
        assert digest.hexdigest() == expected_sha256(size)
        # queued up to HIGH_WATER plus one socket read, and one chunk waiting for credit
        assert peak <= HIGH_WATER + 2 * 256 * 1024 + 64 * 1024, peak


# --- scripted portals ---------------------------------------------------------------------


async def test_body_delimited_by_connection_close(tmp_path: Path) -> None:
    body = bytes(range(256)) * 400

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        head = await read_head(reader)
        if b"/http10" in head:
            writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + body[:10])
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            for i in range(0, len(body), 10_000):
                writer.write(body[i : i + 10_000])
                await writer.drain()
        writer.write_eof()

    async with (
        RawPortal(script) as portal,
        relay(tmp_path, agent={"upstream": portal.url}) as r,
        aiohttp.ClientSession() as http,
    ):
        async with http.get(r.tunnel("/eof")) as resp:
            assert resp.status == 200
            assert await resp.read() == body
        async with http.get(r.tunnel("/http10")) as resp:
            assert await resp.read() == body[:10]
        assert portal.connections == 2


async def test_interim_responses_are_skipped(tmp_path: Path) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_head(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
            writer.write(ok(b"hello", "X-Final: yes"))

    async with (
        RawPortal(script) as portal,
        relay(tmp_path, agent={"upstream": portal.url}) as r,
        aiohttp.ClientSession() as http,
    ):
        for _ in range(3):
            async with http.get(r.tunnel("/")) as resp:
                assert (resp.status, await resp.read()) == (200, b"hello")
                assert resp.headers["X-Final"] == "yes" and "Link" not in resp.headers
        assert portal.connections == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    ],
    ids=["101", "garbage", "two-lengths"],
)
async def test_invalid_answers_are_upstream_errors(tmp_path: Path, answer: bytes) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_head(reader)
        writer.write(answer)
        await reader.read()

    async with (
        RawPortal(script) as portal,
        relay(tmp_path, agent={"upstream": portal.url}) as r,
        aiohttp.ClientSession() as http,
    ):
        assert await _error_code(http, r.tunnel("/")) == (502, "upstream_error")
        await _until(lambda: pool(r).busy_count == 0)
        assert pool(r).idle_count == 0


async def test_truncated_bodies_never_end_cleanly(tmp_path: Path) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        head = await read_head(reader)
        if b"/small" in head:  # a short small body: still before the head went out
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        elif b"/large" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 300_000)
        elif b"/chunked" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        else:  # invalid chunk framing after the head went out
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(b"zz\r\n")
        await writer.drain()
        if b"rst" in head:
            writer.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            writer.transport.abort()

    async with (
        RawPortal(script) as portal,
        relay(tmp_path, agent={"upstream": portal.url}) as r,
        aiohttp.ClientSession() as http,
    ):
        assert await _error_code(http, r.tunnel("/small")) == (502, "upstream_reset")
        for path in ("/large", "/large?rst", "/chunked", "/chunked?rst", "/badchunk"):
            async with http.get(r.tunnel(path)) as resp:
                assert resp.status == 200, path
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
        assert pool(r).idle_count == 0


async def test_bytes_past_the_response_end_the_connection(tmp_path: Path) -> None:
    big = bytes(range(256)) * 1000

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            head = await read_head(reader)
            if b"/big" in head:  # the body arrives after the head: past the parser
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big))
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(big + b"EXTRA")
            else:
                writer.write(ok(b"small") + b"HTTP/1.1 200 OK\r\n")

    async with (
        RawPortal(script) as portal,
        relay(tmp_path, agent={"upstream": portal.url}) as r,
        aiohttp.ClientSession() as http,
    ):
        for _ in range(2):
            async with http.get(r.tunnel("/small")) as resp:
                assert await resp.read() == b"small"
            async with http.get(r.tunnel("/big")) as resp:
                assert await resp.read() == big
        assert portal.connections == 4


async def test_reused_connection_closed_by_the_portal_is_retried(tmp_path: Path) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_head(reader)
        writer.write(ok(b"first"))
        await writer.drain()
        await read_head(reader)  # a second request on this connection: drop it unanswered

    async with (
        RawPortal(script) as portal,
        relay(tmp_path, agent={"upstream": portal.url}) as r,
        aiohttp.ClientSession() as http,
    ):
        for _ in range(3):
            async with http.get(r.tunnel("/")) as resp:
                assert (resp.status, await resp.read()) == (200, b"first")
        assert portal.connections == 3
        # a request with a body is not retried
        async with http.post(r.tunnel("/"), data=b"payload") as resp:
            assert (resp.status, (await resp.json())["error"]) == (502, "upstream_reset")


async def test_idle_connections_closed_by_the_portal(tmp_path: Path) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_head(reader)
        writer.write(ok(b"once", "Connection: keep-alive"))
        await writer.drain()
        await asyncio.sleep(0.05)  # then the portal's keep-alive timeout closes it

    async with (
        RawPortal(script) as portal,
        relay(tmp_path, agent={"upstream": portal.url}) as r,
        aiohttp.ClientSession() as http,
    ):
        for i in range(4):
            async with http.get(r.tunnel("/")) as resp:
                assert (resp.status, await resp.read()) == (200, b"once")
            await _until(lambda i=i: portal.connections == i + 1 and pool(r).idle_count == 0)
        assert pool(r).connections_opened == 4


async def test_answer_before_the_upload_ends(tmp_path: Path) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 4\r\n\r\nno!!")
        await writer.drain()
        while await reader.read(65536):  # keep reading so the answer is not lost to a RST
            pass

    payload = b"u" * (4 * 1024 * 1024)
    async with (
        RawPortal(script) as portal,
        relay(tmp_path, agent={"upstream": portal.url, "upstream_timeout": 60}) as r,
        aiohttp.ClientSession() as http,
    ):
        async with http.post(r.tunnel("/up"), data=payload) as resp:
            assert (resp.status, await resp.read()) == (413, b"no!!")
        assert r.agent is not None
        # both ends forget the stream at once: the CSC resets the unfinished upload
        await _until(lambda: all(not s.link.streams for s in r.agent.sessions), timeout=5)
        await _until(lambda: all(not s.link.streams for s in r.node.state.sessions.values()))
        await _until(lambda: pool(r).busy_count == 0)
        assert pool(r).idle_count == 0


async def test_upload_to_a_slow_portal_is_credited_only_as_it_drains(tmp_path: Path) -> None:
    size = 32 * 1024 * 1024

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_head(reader)
        await asyncio.sleep(0.5)  # a portal that does not read for a while
        digest, left = hashlib.sha256(), size
        while left:
            data = await reader.read(min(left, 1 << 20))
            digest.update(data)
            left -= len(data)
        writer.write(ok(digest.hexdigest().encode()))

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // (1 << 20)):
            yield b"\xa5" * (1 << 20)

    async def sample() -> int:
        await _until(lambda: pool(r).busy_count == 1)
        peak = 0
        while True:
            peak = max(peak, pool(r).write_buffered)
            await asyncio.sleep(0.005)
            if pool(r).busy_count == 0:
                return peak

    async with (
        RawPortal(script) as portal,
        relay(tmp_path, agent={"upstream": portal.url}) as r,
        aiohttp.ClientSession() as http,
    ):
        sampler = asyncio.ensure_future(sample())
        headers = {"Content-Length": str(size)}
        async with http.post(r.tunnel("/"), data=body(), headers=headers) as resp:
            got = await resp.read()
        assert got == hashlib.sha256(b"\xa5" * size).hexdigest().encode()
        peak = await sampler
        # the transport's high-water mark plus one link chunk, never the window or the body
        assert 0 < peak <= 64 * 1024 + 256 * 1024 + 64 * 1024, peak


async def test_read_timeout_between_body_chunks(tmp_path: Path) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 100_000)
        await writer.drain()
        await asyncio.sleep(30)

    async with (
        RawPortal(script) as portal,
        relay(tmp_path, agent={"upstream": portal.url, "upstream_timeout": 0.5}) as r,
        aiohttp.ClientSession() as http,
    ):
        async with http.get(r.tunnel("/")) as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        await _until(lambda: pool(r).busy_count == 0)


async def silent_after_one(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
) -> None:
    """Answer the first request of a connection, then never again (until it closes)."""
    await read_head(reader)
    writer.write(ok(b"once"))
    await read_head(reader)
    await reader.read()


async def test_stream_reset_before_the_head_closes_the_upstream_connection(
    tmp_path: Path,
) -> None:
    async with (
        RawPortal(silent_after_one) as portal,
        relay(tmp_path, agent={"upstream": portal.url}) as r,
        aiohttp.ClientSession() as http,
    ):
        async with http.get(r.tunnel("/")) as resp:
            assert await resp.read() == b"once"
        request = asyncio.ensure_future(http.get(r.tunnel("/")))
        await _until(lambda: pool(r).busy_count == 1)
        for session in r.node.state.sessions.values():
            for stream in list(session.link.streams.values()):
                stream.reset(Cancelled("the test gave up"))
        await _until(lambda: pool(r).busy_count == 0, timeout=5)
        assert pool(r).idle_count == 0 and portal.connections == 1
        async with await request as resp:
            assert resp.status == 499


async def test_bootloader_gone_mid_body_closes_the_upstream_connection(tmp_path: Path) -> None:
    async with relay(tmp_path) as r, aiohttp.ClientSession() as http:
        async with http.get(r.tunnel("/bytes/100000000?rate=4000000")) as resp:
            await resp.content.readexactly(100_000)
        await _until(lambda: pool(r).busy_count == 0, timeout=5)
        assert pool(r).idle_count == 0


async def test_closing_the_pool_fails_exchanges_in_flight(tmp_path: Path) -> None:
    async with (
        RawPortal(silent_after_one) as portal,
        relay(tmp_path, agent={"upstream": portal.url}) as r,
        aiohttp.ClientSession() as http,
    ):
        async with http.get(r.tunnel("/")) as resp:
            assert await resp.read() == b"once"
        request = asyncio.ensure_future(http.get(r.tunnel("/")))
        await _until(lambda: pool(r).busy_count == 1)
        await pool(r).close()
        async with asyncio.timeout(scaled(5)), await request as resp:
            assert (resp.status, (await resp.json())["error"]) == (503, "going_away")
        assert pool(r).idle_count == pool(r).busy_count == 0


async def test_connect_timeout(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(8):  # fill the accept queue: further SYNs go unanswered
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        try:
            async with (
                relay(tmp_path, start=False) as r,
                aiohttp.ClientSession() as http,
            ):
                await start_agent(
                    r, upstream=f"http://127.0.0.1:{port}", upstream_connect_timeout=0.3
                )
                await wait_online(r.csc_url)
                assert await _error_code(http, r.tunnel("/")) == (504, "upstream_timeout")
        finally:
            for filler in fillers:
                filler.close()


async def test_idle_sweep_and_idle_bound(tmp_path: Path) -> None:
    async with relay(tmp_path) as r, aiohttp.ClientSession() as http:
        pool(r).max_idle = 2
        pool(r).idle_timeout = 0.3

        async def slow() -> None:
            async with http.get(r.tunnel("/slow-head?delay=0.2")) as resp:
                assert resp.status == 200

        await asyncio.gather(*(slow() for _ in range(5)))
        assert pool(r).connections_opened == 5
        assert pool(r).idle_count == 2
        await _until(lambda: pool(r).idle_count == 0, timeout=5)


# --- https ----------------------------------------------------------------------------------


async def test_https_upstream(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    runner = web.AppRunner(create_upstream_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    url = f"https://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
            await start_agent(r, upstream=url)
            await wait_online(r.csc_url)
            # the default trust store does not know this CA
            assert await _error_code(http, r.tunnel("/small")) == (502, "upstream_error")
            assert r.agent is not None
            r.agent.upstreams.http = HttpUpstream(
                url, connect_timeout=5, read_timeout=10, ssl_context=client_ctx
            )
            async with http.get(r.tunnel("/small")) as resp:
                assert await resp.read() == SMALL_BODY
            async with http.get(r.tunnel("/bytes/3000000")) as resp:
                body = await resp.read()
            assert hashlib.sha256(body).hexdigest() == expected_sha256(3_000_000)
            async with http.post(r.tunnel("/upload"), data=b"z" * 500_000) as resp:
                assert (await resp.json())["bytes"] == 500_000
            assert pool(r).connections_opened == 1
            await pool(r).close()
    finally:
        await runner.cleanup()
