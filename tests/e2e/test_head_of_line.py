"""A slow reader stalls only its own stream: no head-of-line blocking, no unbounded buffering.

One agent session (``--sessions 1``) carries everything. A bootloader downloads a large body
but reads its socket at about 1 MiB/s (the upstream could send hundreds of MiB/s, so every byte
the relay does not hold back by flow control would pile up in the CSC or the agent). Meanwhile
200 small requests to the same alias, over the same session, must each finish (a request stuck
behind the slow stream would wait for minutes), and the CSC's and the agent's RSS must stay
bounded. The latencies are printed, not asserted: a busy machine may slow them down at will;
bench/ measures them on a quiet one.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import urllib.parse

import aiohttp
import pytest

from tests.support.procs import ProcFactory, RelayProcs, UpstreamProc, async_wait_until, scaled
from tests.support.upstream import SMALL_BODY

MiB = 1024 * 1024
BIG = 1024 * MiB  # never read completely: the reader stops after the small requests
SLOW_RATE = 1 * MiB  # bytes per second the slow client reads
SMALL_REQUESTS = 200
CONCURRENCY = 4
#: Seconds (scaled) any small request may take: a liveness bound, far above the p99 of a few
#: ms on a quiet machine and far below what head-of-line blocking behind the 1 GiB stream costs.
LIVENESS = 5.0
RSS_LIMIT = 150 * MiB

pytestmark = pytest.mark.slow


class SlowReader:
    """A raw-socket HTTP client that reads the response at ``rate`` bytes per second."""

    def __init__(self, url: str, rate: float) -> None:
        self.url = urllib.parse.urlsplit(url)
        self.rate = rate
        self.received = 0
        self.head = b""
        self.started = 0.0
        self.stop = asyncio.Event()
        self.first_byte = asyncio.Event()

    async def run(self) -> None:
        host, port = self.url.hostname, self.url.port
        assert host is not None and port is not None
        # a small StreamReader limit: the reader pauses the socket at once when we do not read
        reader, writer = await asyncio.open_connection(host, port, limit=16 * 1024)
        try:
            writer.write(
                f"GET {self.url.path} HTTP/1.1\r\nHost: {self.url.netloc}\r\n\r\n".encode()
            )
            await writer.drain()
            self.head = await reader.readuntil(b"\r\n\r\n")
            loop = asyncio.get_running_loop()
            self.started = loop.time()
            self.first_byte.set()
            step = 16 * 1024
            while not self.stop.is_set():
                data = await reader.read(step)
                if not data:
                    raise AssertionError(f"the slow response ended after {self.received} bytes")
                self.received += len(data)
                # throttle: never ahead of rate * elapsed
                ahead = self.received / self.rate - (loop.time() - self.started)
                if ahead > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), ahead)
        finally:
            writer.transport.abort()

    def achieved_rate(self) -> float:
        elapsed = asyncio.get_running_loop().time() - self.started
        return self.received / elapsed if elapsed > 0 else 0.0


async def _small_requests(relay: RelayProcs) -> list[float]:
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(SMALL_REQUESTS):
        queue.put_nowait(i)
    timeout = aiohttp.ClientTimeout(total=scaled(10))
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                started = time.monotonic()
                async with http.get(relay.url("/small")) as resp:
                    body = await resp.read()
                latencies.append(time.monotonic() - started)
                assert resp.status == 200
                assert body == SMALL_BODY

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return latencies


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


async def test_slow_reader_does_not_block_small_requests(
    procs: ProcFactory, upstream_proc: UpstreamProc
) -> None:
    relay = procs.relay(upstream_proc, sessions=1)
    agent = relay.agent
    assert agent is not None
    slow = SlowReader(relay.url(f"/bytes/{BIG}"), SLOW_RATE)
    slow_task = asyncio.create_task(slow.run())
    try:
        await asyncio.wait_for(slow.first_byte.wait(), scaled(10))
        assert slow.head.startswith(b"HTTP/1.1 200"), slow.head
        # Measure only once the slow stream has long been stalled by flow control: after a
        # second at 1 MiB/s the relay (hundreds of MiB/s) has filled every window and buffer.
        await async_wait_until(
            lambda: slow_task.done() or slow.received >= SLOW_RATE,
            5,
            message="a second of slow reading",
        )
        assert not slow_task.done(), slow_task
        before = slow.received
        latencies = await _small_requests(relay)
        # The slow stream is still flowing, at (never above) the reader's pace.
        assert not slow_task.done(), slow_task
        assert slow.received > before
        rate = slow.achieved_rate()
    finally:
        slow.stop.set()
        await asyncio.wait_for(slow_task, scaled(10))
    csc_peak, agent_peak = relay.csc.peak_rss(), agent.peak_rss()
    p50, p99 = statistics.median(latencies), _p99(latencies)
    print(
        f"\n{len(latencies)} small requests beside a {rate / MiB:.2f} MiB/s reader: "
        f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms; "
        f"peak RSS: CSC {csc_peak / MiB:.0f} MiB, agent {agent_peak / MiB:.0f} MiB"
    )
    assert len(latencies) == SMALL_REQUESTS
    assert max(latencies) < scaled(LIVENESS), f"max {max(latencies) * 1000:.0f} ms"
    assert rate < 1.5 * SLOW_RATE, f"slow reader got {rate / MiB:.2f} MiB/s"
    assert csc_peak < RSS_LIMIT, f"CSC peak RSS {csc_peak / MiB:.0f} MiB"
    assert agent_peak < RSS_LIMIT, f"agent peak RSS {agent_peak / MiB:.0f} MiB"
    assert relay.csc.running and agent.running
