"""The test upstream serves what it promises: sizes, hashes, statuses, timings, faults.

The in-process server runs on port 0; one test also runs it as a process through
``tests.support.procs`` to check the ready file and the command line.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.procs import http_request, scaled, start_upstream
from tests.support.upstream import (
    BLOCK_SIZE,
    SMALL_SIZE,
    UpstreamServer,
    body_byte,
    body_bytes,
    body_pieces,
    expected_sha256,
)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def _get_hash(
    session: aiohttp.ClientSession, url: str
) -> tuple[aiohttp.ClientResponse, int, str]:
    digest, total = hashlib.sha256(), 0
    async with session.get(url) as resp:
        async for data in resp.content.iter_any():
            digest.update(data)
            total += len(data)
    return resp, total, digest.hexdigest()


def test_body_matches_its_independent_definition() -> None:
    rng = random.Random(7)
    n = 3 * BLOCK_SIZE + 12345
    data = body_bytes(n)
    for i in [0, 1, BLOCK_SIZE - 1, BLOCK_SIZE, 2 * BLOCK_SIZE + 5, n - 1]:
        assert data[i] == body_byte(i)
    for i in rng.sample(range(n), 200):
        assert data[i] == body_byte(i)
    assert data[:BLOCK_SIZE] != data[BLOCK_SIZE : 2 * BLOCK_SIZE]  # blocks are rotated
    assert hashlib.sha256(data).hexdigest() == expected_sha256(n)
    assert b"".join(body_pieces(n, 1000)) == data


@pytest.mark.parametrize("n", [0, 1, 1000, BLOCK_SIZE + 7, 3 * BLOCK_SIZE + 5])
async def test_bytes_size_and_hash(
    upstream: UpstreamServer, session: aiohttp.ClientSession, n: int
) -> None:
    resp, total, sha = await _get_hash(session, f"{upstream.http_url}/bytes/{n}?chunk=65536")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(n)
    assert (total, sha) == (n, expected_sha256(n))


async def test_chunked_has_no_length(
    upstream: UpstreamServer, session: aiohttp.ClientSession
) -> None:
    n = 2 * BLOCK_SIZE + 3
    resp, total, sha = await _get_hash(session, f"{upstream.http_url}/chunked/{n}")
    assert resp.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in resp.headers
    assert (total, sha) == (n, expected_sha256(n))


async def test_rate_throttles(upstream: UpstreamServer, session: aiohttp.ClientSession) -> None:
    started = time.monotonic()
    _, total, sha = await _get_hash(session, f"{upstream.http_url}/bytes/60000?rate=200000")
    elapsed = time.monotonic() - started
    assert (total, sha) == (60000, expected_sha256(60000))
    assert 0.25 <= elapsed < 0.3 + scaled(1.0)


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_upload_hashes_the_body(
    upstream: UpstreamServer, session: aiohttp.ClientSession, method: str
) -> None:
    body = body_bytes(5 * BLOCK_SIZE + 1)  # larger than aiohttp's client_max_size
    async with session.request(method, f"{upstream.http_url}/upload", data=body) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert answer == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}


async def test_echo_reports_the_request(
    upstream: UpstreamServer, session: aiohttp.ClientSession
) -> None:
    url = f"{upstream.http_url}/echo/a/b%20c?x=1&y=two"
    async with session.patch(url, data=b"hello", headers={"X-Test": "yes"}) as resp:
        answer = await resp.json()
    assert answer["method"] == "PATCH"
    assert answer["path"] == "/echo/a/b c"
    assert answer["raw_path"] == "/echo/a/b%20c?x=1&y=two"
    assert answer["query"] == "x=1&y=two"
    assert ["X-Test", "yes"] in answer["headers"]
    assert answer["body_bytes"] == 5
    assert answer["body_sha256"] == hashlib.sha256(b"hello").hexdigest()


async def test_small_status_and_slow_head(
    upstream: UpstreamServer, session: aiohttp.ClientSession
) -> None:
    async with session.get(f"{upstream.http_url}/small") as resp:
        assert (resp.status, len(await resp.read())) == (200, SMALL_SIZE)
    async with session.get(f"{upstream.http_url}/status/418") as resp:
        assert resp.status == 418
    async with session.get(f"{upstream.http_url}/status/204") as resp:
        assert (resp.status, await resp.read()) == (204, b"")
    started = time.monotonic()
    async with session.get(f"{upstream.http_url}/slow-head?delay=0.2") as resp:
        assert resp.status == 200
    assert time.monotonic() - started >= 0.2


@pytest.mark.parametrize("rst", ["0", "1"])
async def test_reset_mid_aborts(
    upstream: UpstreamServer, session: aiohttp.ClientSession, rst: str
) -> None:
    received = 0
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.get(f"{upstream.http_url}/reset-mid?n=100000&rst={rst}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == "200001"
            async for data in resp.content.iter_any():
                received += len(data)
    assert received <= 100000


async def test_tcp_echo_half_close(upstream: UpstreamServer) -> None:
    assert upstream.tcp_echo_port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", upstream.tcp_echo_port)
    payload = body_bytes(3 * BLOCK_SIZE)
    writer.write(payload)
    writer.write_eof()
    echoed = await asyncio.wait_for(reader.read(), scaled(10))  # reads until the server's EOF
    assert echoed == payload
    writer.close()


def test_upstream_process(tmp_path: Path) -> None:
    proc = start_upstream(tmp_path)
    try:
        assert proc.ready["pid"] == proc.pid
        status, _, body = http_request(f"{proc.http_url}/small")
        assert (status, len(body)) == (200, SMALL_SIZE)
        assert proc.tcp_echo_addr[0] == "127.0.0.1"
        rss = proc.rss()
        assert rss > 0
        assert proc.peak_rss() >= rss
    finally:
        assert proc.stop() == 0
