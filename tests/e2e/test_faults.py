"""Faults with real processes: a lost session, a killed agent or CSC, graceful SIGTERM drains.

* One of the agent's two sessions dies (its TCP connection is reset): requests made after that
  go to the other session and all succeed; only a request in flight on the dead one may fail.
* SIGKILL on the agent: responses in flight abort (the client sees a payload error, never a
  clean but truncated body), the alias soon answers 503 ``portal_offline`` (when the link ends,
  not after the heartbeat timeout), and a restarted agent brings it back. SIGKILL on the CSC: the agent reconnects to its successor by itself.
* SIGTERM on the CSC, 20 downloads in flight: all complete intact before it exits 0.
* SIGTERM on the agent, downloads in flight: they complete, the agent exits 0; meanwhile the
  draining agent takes no new requests.

Waits poll until a deadline (scaled by ``CSC_TEST_TIMEOUT_FACTOR``); nothing sleeps to synchronise.
How long a fault takes to show is printed, not asserted (a busy machine may stretch it at will);
the deadlines are liveness bounds only.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from tests.support.delayproxy import DelayProxy
from tests.support.procs import (
    ProcFactory,
    RelayProcs,
    UpstreamProc,
    async_wait_alias_online,
    async_wait_until,
    scaled,
)
from tests.support.upstream import SMALL_BODY, expected_sha256

MiB = 1024 * 1024
#: Seconds (scaled) for a fault's effect to show: a liveness bound, well above the figures
#: printed on a quiet machine (well under a second) and below the 30 s heartbeat timeout.
LIVENESS = 10.0

pytestmark = pytest.mark.slow


# --- helpers -------------------------------------------------------------------------------


def _session(total: float = 60) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=scaled(total)))


async def _csc_sessions(http: aiohttp.ClientSession, csc_url: str) -> int:
    async with http.get(f"{csc_url}/readyz") as resp:
        return int((await resp.json()).get("sessions", -1))


async def _resolve(http: aiohttp.ClientSession, relay: RelayProcs) -> tuple[int, Any]:
    async with http.get(relay.resolve_url) as resp:
        return resp.status, await resp.json()


@dataclass
class Download:
    """A download through the tunnel, hashed as it arrives; ``first`` is set at the first bytes."""

    url: str
    size: int
    received: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    first: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None

    async def run(self, http: aiohttp.ClientSession) -> None:
        try:
            async with http.get(self.url) as resp:
                assert resp.status == 200, await resp.text()
                async for chunk in resp.content.iter_chunked(256 * 1024):
                    self.digest.update(chunk)
                    self.received += len(chunk)
                    self.first.set()
        except aiohttp.ClientError as exc:
            self.error = exc
        finally:
            self.first.set()

    @property
    def intact(self) -> bool:
        return (
            self.error is None
            and self.received == self.size
            and self.digest.hexdigest() == expected_sha256(self.size)
        )

    def describe(self) -> str:
        return f"{self.url}: {self.received}/{self.size} bytes, error {self.error!r}"


async def _start_downloads(
    http: aiohttp.ClientSession, downloads: list[Download]
) -> list[asyncio.Task[None]]:
    """Start every download and return once each is receiving (or has failed)."""
    tasks = [asyncio.create_task(d.run(http)) for d in downloads]
    await asyncio.wait_for(asyncio.gather(*(d.first.wait() for d in downloads)), scaled(20))
    failed = [d.describe() for d in downloads if d.error is not None]
    assert not failed, failed
    return tasks


# --- (a) one session of two dies -----------------------------------------------------------


async def test_losing_one_session_loses_no_new_request(
    procs: ProcFactory, upstream_proc: UpstreamProc
) -> None:
    """Both sessions dial through a delay-0 proxy in this loop, so each can be reset alone."""
    relay = procs.relay(upstream_proc, start_agent=False)
    host, port = relay.csc.http_addr
    async with DelayProxy(host, port, 0.0) as proxy, _session() as http:
        # the proxy lives in this event loop: never block it while the agent comes up
        relay.start_agent(csc_url=f"http://{proxy.host}:{proxy.port}", wait_online=False)
        await async_wait_alias_online(relay.csc.http_url, relay.alias)

        async def two_sessions() -> bool:
            return await _csc_sessions(http, relay.csc.http_url) == 2

        await async_wait_until(two_sessions, 10, message="two agent sessions")
        original = list(proxy._connections)  # one proxied connection per agent session
        assert len(original) == 2

        outcomes: list[tuple[int, str]] = []  # (request number, "ok" or what went wrong)
        in_flight: list[int] = []  # the request numbers in flight at each kill
        current = -1
        stop = asyncio.Event()

        async def requests() -> None:
            nonlocal current
            n = 0
            while not stop.is_set():
                current = n
                try:
                    async with http.get(relay.url(f"/small?n={n}")) as resp:
                        body = await resp.read()
                    ok = resp.status == 200 and body == SMALL_BODY
                    outcome = "ok" if ok else f"HTTP {resp.status} {body[:200]!r}"
                except aiohttp.ClientError as exc:
                    outcome = repr(exc)
                outcomes.append((n, outcome))
                n += 1
            current = -1

        async def requests_after(count: int) -> None:
            target = len(outcomes) + count
            await async_wait_until(lambda: len(outcomes) >= target, 20, interval=0.01)

        loop_task = asyncio.create_task(requests())
        try:
            await requests_after(20)
            for victim in original:
                in_flight.append(current)
                victim.abort(rst=True)  # the session's TCP connection is reset
                await requests_after(20)
                # the agent reconnects the lost session after its backoff
                await async_wait_until(two_sessions, 10, message="session replaced")
                await requests_after(20)
        finally:
            stop.set()
            await asyncio.wait_for(loop_task, scaled(20))

    failures = [(n, what) for n, what in outcomes if what != "ok"]
    print(
        f"\n{len(outcomes)} sequential requests, sessions reset twice; "
        f"in flight at the resets: {in_flight}; failures: {failures}"
    )
    assert len(outcomes) >= 100
    unexpected = [(n, what) for n, what in failures if n not in in_flight]
    assert not unexpected, unexpected


# --- (b) SIGKILL on the agent; SIGKILL on the CSC -------------------------------------------


async def test_agent_sigkill_aborts_responses_and_goes_offline(
    procs: ProcFactory, upstream_proc: UpstreamProc
) -> None:
    relay = procs.relay(upstream_proc)
    agent = relay.agent
    assert agent is not None
    size = 256 * MiB
    rate = 16 * MiB  # 16 s each: certainly in flight when the agent dies
    downloads = [
        Download(relay.url(f"/bytes/{size}?rate={rate}"), size),  # with Content-Length
        Download(relay.url(f"/chunked/{size}?rate={rate}"), size),  # chunked
        Download(relay.url(f"/bytes/{size}?rate={rate}"), size),
    ]
    async with _session() as http:
        tasks = await _start_downloads(http, downloads)
        agent.kill()
        killed_at = time.monotonic()
        assert agent.wait(10) < 0
        await asyncio.wait_for(asyncio.gather(*tasks), scaled(20))
        for d in downloads:
            assert isinstance(d.error, aiohttp.ClientPayloadError), d.describe()
            assert 0 < d.received < d.size, d.describe()

        async def offline() -> bool:
            status, body = await _resolve(http, relay)
            return status == 503 and body.get("error") == "portal_offline"

        await async_wait_until(offline, LIVENESS, interval=0.02, message="portal_offline")
        offline_after = time.monotonic() - killed_at
        async with http.get(relay.url("/small")) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"] == "portal_offline"

        # A new agent process connects at once (the backoff applies between its own attempts):
        # the alias is back after interpreter start-up (about 2 s on a quiet machine).
        restarted = time.monotonic()
        relay.start_agent(wait_online=False)
        await async_wait_alias_online(relay.csc.http_url, relay.alias, timeout=LIVENESS)
        back_after = time.monotonic() - restarted
        async with http.get(relay.url("/small")) as resp:
            assert resp.status == 200
            assert await resp.read() == SMALL_BODY
    print(
        f"\nagent SIGKILL: offline after {offline_after * 1000:.0f} ms; a new agent process "
        f"is online {back_after * 1000:.0f} ms after its start"
    )


async def test_csc_sigkill_the_agent_reconnects_within_its_backoff(
    procs: ProcFactory, upstream_proc: UpstreamProc
) -> None:
    """A CSC killed and restarted on the same address gets the agent back by itself."""
    relay = procs.relay(upstream_proc)
    agent = relay.agent
    assert agent is not None
    old = relay.csc
    old.kill()
    killed_at = time.monotonic()
    assert old.wait(10) < 0
    # the same address and state directory, as a supervisor would restart it
    new = procs.csc(state_dir=old.state_dir, listen=old.ready["http"], tcp_listen=old.ready["tcp"])
    started = time.monotonic()
    relay.csc = new
    await async_wait_alias_online(new.http_url, relay.alias, timeout=10)
    back = time.monotonic()
    # Reconnect delays start at backoff_initial (0.5 s) and double, each jittered down to half
    # its base: the delay under way when the CSC came back (after `downtime`) is at most
    # 2 * downtime + 0.5 s, and the next attempt finds the new CSC.
    downtime = started - killed_at
    bound = 2 * downtime + 0.5
    print(
        f"\nCSC SIGKILL: restarted after {downtime:.2f} s; the alias was back "
        f"{back - started:.2f} s later (bound: the backoff delay under way, <= {bound:.2f} s)"
    )
    assert back - started < scaled(bound + 0.5)
    assert agent.running
    async with _session() as http, http.get(relay.url("/small")) as resp:
        assert resp.status == 200
        assert await resp.read() == SMALL_BODY


# --- (c) SIGTERM on the CSC ----------------------------------------------------------------


async def test_csc_sigterm_drains_20_downloads(
    procs: ProcFactory, upstream_proc: UpstreamProc
) -> None:
    relay = procs.relay(upstream_proc)
    size, rate = 32 * MiB, 8 * MiB  # about 4 s each
    downloads = [Download(relay.url(f"/bytes/{size}?rate={rate}"), size) for _ in range(20)]
    async with _session() as http:
        tasks = await _start_downloads(http, downloads)
        relay.csc.terminate()
        terminated = time.monotonic()

        async def not_taking_work() -> str | None:
            """A new connection is refused; a kept-alive one is answered 503 going_away."""
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as probe:
                try:
                    async with probe.get(relay.url("/small")) as resp:
                        body = await resp.read()
                except aiohttp.ClientConnectorError:
                    return "refused"
            return None if resp.status != 503 or b"going_away" not in body else "going_away"

        await async_wait_until(not_taking_work, LIVENESS, interval=0.02, message="no new work")
        await asyncio.wait_for(asyncio.gather(*tasks), scaled(30))
        completed = time.monotonic()
    broken = [d.describe() for d in downloads if not d.intact]
    assert not broken, broken
    code = relay.csc.wait(15)
    exited = time.monotonic()
    print(
        f"\nCSC SIGTERM with 20 downloads in flight: all intact after "
        f"{completed - terminated:.1f} s, exit {code} after {exited - terminated:.1f} s"
    )
    assert code == 0
    assert relay.agent is not None and relay.agent.running


# --- (d) SIGTERM on the agent --------------------------------------------------------------


async def test_agent_sigterm_drains_downloads(
    procs: ProcFactory, upstream_proc: UpstreamProc
) -> None:
    relay = procs.relay(upstream_proc)
    agent = relay.agent
    assert agent is not None
    size, rate = 32 * MiB, 8 * MiB  # about 4 s each
    downloads = [Download(relay.url(f"/bytes/{size}?rate={rate}"), size) for _ in range(6)]
    async with _session() as http:
        tasks = await _start_downloads(http, downloads)
        agent.terminate()
        terminated = time.monotonic()

        async def draining() -> bool:
            status, body = await _resolve(http, relay)
            return status == 503 and body.get("error") == "portal_offline"

        # a draining agent takes no new streams, so the alias is offline while it finishes
        await async_wait_until(draining, 2.0, interval=0.02, message="agent draining")
        assert agent.running
        await asyncio.wait_for(asyncio.gather(*tasks), scaled(30))
        completed = time.monotonic()
    broken = [d.describe() for d in downloads if not d.intact]
    assert not broken, broken
    code = agent.wait(10)
    exited = time.monotonic()
    print(
        f"\nagent SIGTERM with {len(downloads)} downloads in flight: all intact after "
        f"{completed - terminated:.1f} s, exit {code} after {exited - terminated:.1f} s"
    )
    assert code == 0
