"""A hostile tenant cannot hurt another: real ``csc serve``, real agent, real upstream.

Tenant B (a normal ``tenant_agent`` with the real upstream) serves small requests to a client
that keeps :data:`CONCURRENCY` keep-alive requests in flight, first alone for
:data:`BASELINE_SECONDS`, then for :data:`STORM_SECONDS` while tenant A and anonymous clients
misbehave in every way at once (tests/support/attacks.py): slowloris heads, a few hundred idle
connections, oversized heads, unfinished heads just under the per-connection bound, slow
request bodies to A's alias, request-smuggling shapes, endless ``CONNECT`` lines on the TCP
ingress, a connect/close loop; A's agents: one floods PINGs and never reads (connecting again
each time the CSC drops it), two answer with a body shorter / longer than their
``Content-Length``, and A's clients keep asking them; anonymous clients ask B's portal for
big downloads and stop reading (ended by the CSC's send deadline, ``client_send_timeout``).

Asserted:

* B loses no request: every one is 200 with the upstream's exact body.
* B's p99 during the storm is at most ``max(P99_FACTOR * baseline p99, scaled(P99_FLOOR))``.
  The baseline p99 on loopback is a few ms, so the floor decides on most machines: one second
  is far below what the attacks would cost if they could block the loop or B's link (a
  stalled link or a full head buffer shows as seconds or as failures) and far above the
  scheduling noise of a 2-core machine running the attackers, the CSC and two busy loops.
* The CSC's RSS, sampled every 0.5 s, stays under :data:`RSS_CEILING` during the storm.
  The stalled downloads take windows that grew while the clients' socket buffers filled:
  bounded by B's `tenant_window_growth` (64 MiB by default; at 256 MiB the peak was 239 MiB).
* Every stalled download is ended by the CSC (a short body), none served whole, some of them
  early: the storm's ``client_buffer_limit`` (:data:`CLIENT_BUFFER_LIMIT`) is below what they
  hold at once, so those that took nothing for a twelfth of the send deadline are shed.
* :data:`SETTLE_SECONDS` after the storm (every attack connection closed), the CSC's RSS is
  within :data:`RSS_RETURN_MARGIN` of its size at rest (measured after the baseline phase),
  and the CSC still serves B.

Measured on a 2-core machine (bench/RESULTS.md, "Memory after a storm"): the CSC's RSS at rest
46 MiB, at the storm's peak 86-91 MiB, 15 s after it 52 MiB (with two busy loops on the 2
cores too). Before the CSC ran a full collection once quiet after the storm (shared/allocator.py
``CollectPolicy``), garbage in reference cycles that no later allocation collected kept 58-65
MiB, and once, in a full test run, 80 (34 above rest). B's p99 2-10 ms at rest, 13-35 ms in
the storm, no request lost. Before csc/relay/http_front.py dropped a closed
connection's parser (a reference cycle that kept the connection and its partial head until the
cyclic GC ran) and the CSC gave free heap pages back (shared/allocator.py), the same storm left
it at its peak, 110 MiB; with the cyclic collector's thresholds raised 70-fold (tried for
faster handshakes) it stayed at 197 MiB. :data:`RSS_RETURN_MARGIN` (30 MiB) tells them apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import urllib.parse
from collections.abc import Awaitable
from dataclasses import dataclass, field

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import attacks
from tests.support.procs import (
    CscProc,
    ProcFactory,
    UpstreamProc,
    async_wait_alias_online,
    async_wait_until,
    issue_token,
    scaled,
    tunnel_url,
)
from tests.support.upstream import SMALL_BODY

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
STORM_SECONDS = 60.0
BASELINE_SECONDS = 10.0
SETTLE_SECONDS = 15.0
CONCURRENCY = 4
P99_FACTOR = 10.0
P99_FLOOR = 1.0
RSS_CEILING = 200 * MiB
RSS_RETURN_MARGIN = 30 * MiB
RSS_INTERVAL = 0.5
#: connections held open without a byte, and with a head just under the per-connection bound
IDLE_CONNECTIONS = 500
UNFINISHED_HEADS = 400

#: every attack client tallies under its kind; each must have run
ATTACK_KINDS = (
    "slowloris",
    "idle",
    "oversized",
    "unfinished",
    "slowbody",
    "smuggling",
    "connect",
    "stalled",
)

B_ALIAS = "app@bravo.example"
A_SHORT = "short@alpha.example"
A_LONG = "long@alpha.example"
A_FLOOD = "flood@alpha.example"

#: The CSC's hardening settings are its defaults but for these (scaled): the flooding agent is
#: dropped after STUCK_TIMEOUT, so it connects and floods again several times per storm.
STUCK_TIMEOUT = 5.0
#: Anonymous clients stall downloads of B's portal: the CSC closes them after SEND_TIMEOUT.
SEND_TIMEOUT = 3.0
#: Below what the stalled downloads hold at once: the CSC closes them early (shared/sendwatch.py).
CLIENT_BUFFER_LIMIT = "16MiB"
STALLED_DOWNLOADS = 10
STALLED_SIZE = 64 * MiB


@dataclass
class Load:
    """B's client: (start time, latency) of every request, and what went wrong."""

    done: list[tuple[float, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def latencies(self, start: float, end: float) -> list[float]:
        return [lat for t, lat in self.done if start <= t < end]


async def _b_load(url: str, stop: asyncio.Event, load: Load) -> None:
    timeout = aiohttp.ClientTimeout(total=scaled(30))
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:

        async def worker() -> None:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    async with http.get(url) as resp:
                        body = await resp.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    load.failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                load.done.append((started, time.monotonic() - started))
                if resp.status != 200 or body != SMALL_BODY:
                    load.failures.append(f"{resp.status}: {body[:200]!r}")

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


async def _rss_samples(csc: CscProc, stop: asyncio.Event, into: list[tuple[float, int]]) -> None:
    while not stop.is_set():
        into.append((time.monotonic(), csc.rss()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), RSS_INTERVAL)


async def _settled_rss(csc: CscProc, seconds: float) -> list[int]:
    samples: list[int] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append(csc.rss())
        await asyncio.sleep(RSS_INTERVAL)  # sampling pace, not synchronisation
    return samples


def _path(alias: str, path: str) -> str:
    return urllib.parse.urlsplit(tunnel_url("http://x", alias, path)).path


async def _closed_stalled(csc: CscProc) -> dict[str, float]:
    """Connections the CSC closed at their send deadline and early (client_buffer_limit)."""
    timeout = aiohttp.ClientTimeout(total=scaled(10))
    async with aiohttp.ClientSession(timeout=timeout) as http, http.get(csc.metrics_url) as resp:
        text = await resp.text()
    closed = {"deadline": 0.0, "shed": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "csc_connections_stalled_total":
                closed["deadline"] += sample.value
            elif sample.name == "csc_connections_shed_total":
                closed["shed"] += sample.value
    return closed


async def test_hostile_tenant_harms_neither_b_nor_the_csc(
    procs: ProcFactory, upstream_proc: UpstreamProc
) -> None:
    # every client here, B's included, is 127.0.0.1: a bound per client address would count
    # them as one (tests/integration/test_connection_cap.py checks that bound apart)
    csc = procs.csc(
        env={
            "CSC_STUCK_TIMEOUT": str(scaled(STUCK_TIMEOUT)),
            "CSC_CLIENT_SEND_TIMEOUT": str(scaled(SEND_TIMEOUT)),
            "CSC_CLIENT_BUFFER_LIMIT": CLIENT_BUFFER_LIMIT,
            "CSC_CLIENT_MAX_CONNECTIONS": "off",
        }
    )
    b_token = issue_token(csc.state_dir, "bravo", B_ALIAS)
    a_token = issue_token(csc.state_dir, "alpha", [A_SHORT, A_LONG, A_FLOOD])
    procs.agent(csc.http_url, b_token, upstream_proc.http_url, sessions=1)
    await async_wait_alias_online(csc.http_url, B_ALIAS)
    host, port = csc.http_addr
    tcp_host, tcp_port = csc.tcp_addr

    rest_rss_cold = csc.rss()
    load, b_stop = Load(), asyncio.Event()
    b_task = asyncio.create_task(_b_load(tunnel_url(csc.http_url, B_ALIAS, "/small"), b_stop, load))
    base_start = time.monotonic()
    await asyncio.sleep(BASELINE_SECONDS)  # the baseline phase's length, not a sync
    rest_rss = csc.rss()

    agents: list[attacks.RawAgent] = [
        attacks.Flooder(host, port, a_token, A_FLOOD, rounds=1000),
        attacks.Flooder(host, port, a_token, A_FLOOD, rounds=1000),
        attacks.LyingAgent(host, port, a_token, A_SHORT, declared=10, sent=5, rounds=1000),
        attacks.LyingAgent(host, port, a_token, A_LONG, declared=10, sent=15, rounds=1000),
    ]
    tally, stop = attacks.Tally(), asyncio.Event()
    samples: list[tuple[float, int]] = []
    storm_start = time.monotonic()
    for agent in agents:
        agent.start()
    await async_wait_until(
        lambda: all(a.welcomed.is_set() or a.error for a in agents), 10, message="A's agents"
    )
    short_path, long_path = _path(A_SHORT, "/x"), _path(A_LONG, "/x")
    storm: list[Awaitable[None]] = [
        _rss_samples(csc, stop, samples),
        attacks.slowloris(host, port, stop, tally),
        attacks.idle_connections(host, port, stop, tally, count=IDLE_CONNECTIONS),
        attacks.oversized_heads(host, port, stop, tally),
        attacks.unfinished_heads(host, port, stop, tally, count=UNFINISHED_HEADS),
        attacks.slow_bodies(host, port, _path(A_SHORT, "/upload"), stop, tally),
        attacks.smuggling(host, port, A_SHORT, stop, tally),
        attacks.connect_lines(tcp_host, tcp_port, stop, tally),
        attacks.reconnect_loop(host, port, stop, tally),
        attacks.pipelined_gets(host, port, short_path, stop, tally),
        attacks.pipelined_gets(host, port, long_path, stop, tally),
        attacks.stalled_downloads(
            host,
            port,
            _path(B_ALIAS, f"/bytes/{STALLED_SIZE}"),
            STALLED_SIZE,
            3 * scaled(SEND_TIMEOUT),  # past the deadline (1 to 1.25 of it) with room to spare
            stop,
            tally,
            count=STALLED_DOWNLOADS,
        ),
    ]
    storm_task = asyncio.gather(*storm)
    with contextlib.suppress(TimeoutError):  # the storm's length
        await asyncio.wait_for(asyncio.shield(storm_task), STORM_SECONDS)
    storm_end = time.monotonic()
    stop.set()
    for agent in agents:
        agent.stop.set()
    await asyncio.wait_for(storm_task, scaled(30))
    for agent in agents:
        await asyncio.to_thread(agent.join, scaled(10))
    b_stop.set()
    await asyncio.wait_for(b_task, scaled(30))

    after = await _settled_rss(csc, SETTLE_SECONDS)
    peak = max(rss for _, rss in samples)
    base = load.latencies(base_start, storm_start)
    during = load.latencies(storm_start, storm_end)
    base_p99, storm_p99 = _p99(base), _p99(during)
    print(
        f"\nB: {len(base)} requests at rest (p50 {statistics.median(base) * 1000:.1f} ms, "
        f"p99 {base_p99 * 1000:.1f} ms), {len(during)} in the storm (p50 "
        f"{statistics.median(during) * 1000:.1f} ms, p99 {storm_p99 * 1000:.1f} ms, max "
        f"{max(during) * 1000:.0f} ms); CSC RSS: cold {rest_rss_cold / MiB:.0f} MiB, rest "
        f"{rest_rss / MiB:.0f} MiB, storm peak {peak / MiB:.0f} MiB, after "
        f"{SETTLE_SECONDS:.0f} s {after[-1] / MiB:.0f} MiB (min {min(after) / MiB:.0f}); "
        f"agents: {[(type(a).__name__, a.links) for a in agents]}\n{dict(sorted(tally.items()))}"
    )
    for agent in agents:
        assert agent.error is None, f"{type(agent).__name__}: {agent.error!r}"
    assert not load.failures, f"B lost {len(load.failures)} requests: {load.failures[:5]}"
    assert len(during) > 100
    bound = max(P99_FACTOR * base_p99, scaled(P99_FLOOR))
    assert storm_p99 <= bound, f"B's p99 {storm_p99:.3f} s > {bound:.3f} s"
    assert peak < RSS_CEILING, f"CSC peak RSS {peak / MiB:.0f} MiB"
    assert after[-1] < rest_rss + RSS_RETURN_MARGIN, (
        f"CSC RSS {after[-1] / MiB:.0f} MiB after the storm, {rest_rss / MiB:.0f} MiB at rest"
    )
    # every kind of attack ran, and none was let through
    for kind in ATTACK_KINDS:
        assert any(key.startswith(kind) for key in tally), f"no {kind} attack ran"
    assert tally["reconnect:ok"] > 100
    assert tally["connect:ERR"] > 0, "no endless CONNECT line was refused"
    assert tally["pipelined:garbage"] == 0, "a lying agent's body was read as a response"
    assert tally["pipelined:502"] + tally["pipelined:aborted"] > 0
    assert not any(k.startswith("smuggling:200") for k in tally), tally
    assert tally["stalled:closed"] >= STALLED_DOWNLOADS, "too few stalled downloads ended"
    assert tally["stalled:served"] == 0, "the CSC kept a stalled download open"
    closed = await _closed_stalled(csc)
    print(f"stalled clients closed: {closed}")
    assert closed["shed"] > 0, f"no stalled download was closed early for its bytes: {closed}"
    assert all(a.links >= 1 for a in agents)
    assert agents[0].links >= 2, "the flooding agent was never dropped"
    # healthy afterwards
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=scaled(10))) as http:
        async with http.get(f"{csc.http_url}/healthz") as resp:
            assert resp.status == 200
        for i in range(20):
            async with http.get(tunnel_url(csc.http_url, B_ALIAS, f"/small?after={i}")) as resp:
                assert (resp.status, await resp.read()) == (200, SMALL_BODY)
    assert csc.running
    _, errors = csc.logs(max_chars=10**6)
    assert "Traceback" not in errors, errors[errors.index("Traceback") - 2000 :][:6000]
