"""A long CSC <-> agent link: window auto-tuning keeps one stream fast, big bodies stay intact.

The agent dials the CSC through a :mod:`tests.support.delayproxy` process (``--csc`` points at
the proxy). A fixed 256 KiB window would cap one stream at window / RTT (5 MiB/s at a 50 ms
round trip); the windows must grow (up to 64 MiB) toward rate x RTT. Criterion: one stream's
download rate with 25 ms per direction is at least :data:`GROWTH` times what the initial window
allows at that round trip (a link whose windows never grow cannot pass it, and a busy machine
still does); a body far larger than any window arrives with the right SHA-256. The ratio to the
rate at delay 0 (about 0.8 on a quiet machine) is printed, not asserted: it depends on the load.

Each delay gets a fresh proxy and a fresh agent (so a fresh link: the multiplexer measures the
round trip when the link comes up). The proxy is a process of its own so that proxying does not
compete with this test's client for one core. Each rate is the best of :data:`RUNS` downloads,
which filters out noise from other work on the machine.
"""

from __future__ import annotations

import hashlib
import time

import aiohttp
import pytest

from shared.protocol.settings import LinkSettings
from tests.support.procs import ProcFactory, RelayProcs, UpstreamProc, scaled
from tests.support.upstream import expected_sha256

MiB = 1024 * 1024
SIZE = 512 * MiB  # 8x the largest window, 2000x the initial one
DELAY = 0.025
INITIAL_WINDOW = LinkSettings().initial_window  # what a link starts with
#: How many times the fixed-window rate (initial window / round trip) one stream must reach.
GROWTH = 4
RUNS = 2

pytestmark = pytest.mark.slow


async def _download(http: aiohttp.ClientSession, url: str) -> tuple[float, str]:
    """Download ``url`` hashing as it arrives; returns (bytes per second, sha256)."""
    digest, total = hashlib.sha256(), 0
    started = time.monotonic()
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        async for chunk in resp.content.iter_chunked(1 * MiB):
            digest.update(chunk)
            total += len(chunk)
    elapsed = time.monotonic() - started
    assert total == SIZE
    return SIZE / elapsed, digest.hexdigest()


async def _small_request_seconds(http: aiohttp.ClientSession, relay: RelayProcs) -> float:
    started = time.monotonic()
    async with http.get(relay.url("/small")) as resp:
        assert resp.status == 200
        await resp.read()
    return time.monotonic() - started


async def _best_rate(procs: ProcFactory, relay: RelayProcs, delay: float) -> float:
    """The best of RUNS downloads through a fresh proxy (at ``delay``) and a fresh agent."""
    proxy = procs.delay_proxy(relay.csc.ready["http"], delay)
    agent = relay.start_agent(csc_url=proxy.url, sessions=1)
    want = expected_sha256(SIZE)
    rates = []
    timeout = aiohttp.ClientTimeout(total=scaled(60))
    async with aiohttp.ClientSession(timeout=timeout) as http:
        # the link really is long: OPEN and OPEN_OK cross the proxy once each
        assert await _small_request_seconds(http, relay) >= 2 * delay
        for _ in range(RUNS):
            rate, sha = await _download(http, relay.url(f"/bytes/{SIZE}"))
            assert sha == want
            rates.append(rate)
    print(
        f"  delay {delay * 1000:.0f} ms per direction: "
        + ", ".join(f"{r / MiB:.0f}" for r in rates)
        + f" MiB/s; agent peak RSS {agent.peak_rss() / MiB:.0f} MiB"
    )
    assert agent.stop() == 0
    proxy.stop()
    return max(rates)


async def test_window_auto_tuning_over_a_long_link(
    procs: ProcFactory, upstream_proc: UpstreamProc
) -> None:
    relay = procs.relay(upstream_proc, start_agent=False)
    print(f"\none stream, {SIZE // MiB} MiB downloads through a delay proxy:")
    rate0 = await _best_rate(procs, relay, 0.0)
    rate1 = await _best_rate(procs, relay, DELAY)
    fixed_window_rate = INITIAL_WINDOW / (2 * DELAY)
    print(
        f"  best: {rate0 / MiB:.0f} MiB/s at delay 0, {rate1 / MiB:.0f} MiB/s at "
        f"{DELAY * 1000:.0f} ms per direction ({rate1 / rate0:.0%}); a fixed initial window "
        f"would allow {fixed_window_rate / MiB:.0f} MiB/s (criterion: x{GROWTH}); "
        f"CSC peak RSS {relay.csc.peak_rss() / MiB:.0f} MiB"
    )
    assert rate1 >= GROWTH * fixed_window_rate, (
        f"{rate1 / MiB:.1f} MiB/s at {DELAY * 1000:.0f} ms: the windows did not grow "
        f"(a fixed {INITIAL_WINDOW // 1024} KiB window allows {fixed_window_rate / MiB:.1f} MiB/s)"
    )
