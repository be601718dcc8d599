"""Big bodies through real processes: 1 GiB down and 256 MiB up, intact, in bounded memory.

upstream process <- agent process <- CSC process <- this test (aiohttp). Both bodies are hashed
incrementally on the client side (nothing here holds a body either), and the CSC's and the
agent's peak RSS (sampled, and the kernel's VmHWM) must stay below :data:`RSS_LIMIT`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.support.procs import ProcFactory, UpstreamProc, scaled
from tests.support.upstream import body_pieces, expected_sha256

MiB = 1024 * 1024
GiB = 1024 * MiB
DOWNLOAD = 1 * GiB
UPLOAD = 256 * MiB
RSS_LIMIT = 150 * MiB

pytestmark = pytest.mark.slow


async def _download(http: aiohttp.ClientSession, url: str) -> tuple[int, str, float]:
    started = time.monotonic()
    digest, total = hashlib.sha256(), 0
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_length == DOWNLOAD
        async for chunk in resp.content.iter_chunked(1 * MiB):
            digest.update(chunk)
            total += len(chunk)
    return total, digest.hexdigest(), time.monotonic() - started


async def _generated(n: int) -> AsyncIterator[bytes]:
    """The deterministic body of ``n`` bytes, generated 1 MiB at a time."""
    for piece in body_pieces(n, MiB):
        yield bytes(piece)


async def _upload(http: aiohttp.ClientSession, url: str) -> tuple[dict[str, object], float]:
    started = time.monotonic()
    async with http.post(
        url,
        data=_generated(UPLOAD),
        headers={"Content-Length": str(UPLOAD), "Content-Type": "application/octet-stream"},
    ) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
    return answer, time.monotonic() - started


async def test_1gib_down_and_256mib_up_in_bounded_memory(
    procs: ProcFactory, upstream_proc: UpstreamProc
) -> None:
    relay = procs.relay(upstream_proc)
    agent = relay.agent
    assert agent is not None
    want_down, want_up = expected_sha256(DOWNLOAD), expected_sha256(UPLOAD)
    timeout = aiohttp.ClientTimeout(total=scaled(120))
    async with aiohttp.ClientSession(timeout=timeout) as http:
        (got, sha, down_s), (answer, up_s) = await asyncio.gather(
            _download(http, relay.url(f"/bytes/{DOWNLOAD}")),
            _upload(http, relay.url("/upload")),
        )
    csc_peak, agent_peak = relay.csc.peak_rss(), agent.peak_rss()
    print(
        f"\n1 GiB down in {down_s:.1f} s ({DOWNLOAD / MiB / down_s:.0f} MiB/s), "
        f"256 MiB up in {up_s:.1f} s ({UPLOAD / MiB / up_s:.0f} MiB/s), concurrently; "
        f"peak RSS: CSC {csc_peak / MiB:.0f} MiB, agent {agent_peak / MiB:.0f} MiB"
    )
    assert got == DOWNLOAD
    assert sha == want_down
    assert answer == {"bytes": UPLOAD, "sha256": want_up}
    assert relay.csc.running and agent.running
    assert csc_peak < RSS_LIMIT, f"CSC peak RSS {csc_peak / MiB:.0f} MiB"
    assert agent_peak < RSS_LIMIT, f"agent peak RSS {agent_peak / MiB:.0f} MiB"
