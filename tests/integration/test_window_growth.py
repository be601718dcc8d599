"""Window growth of one tenant's agent sessions on a node, over real sockets: all sessions
together stay within the tenant's pool (csc/relay/growth.py), and give it back when they end."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from csc.state import NodeState
from tests.support.inproc import relay
from tests.support.procs import scaled

KIB, MIB = 1024, 1024 * 1024
INITIAL = 64 * KIB


def _growth(state: NodeState) -> int:
    """Growth beyond the initial window over the live streams of every session of the node."""
    total = 0
    for session in state.sessions.values():
        conn = session.link.conn
        total += sum(s.recv_window - INITIAL for s in conn.streams.values())
    return total


async def test_a_tenants_sessions_grow_their_windows_within_one_budget(tmp_path: Path) -> None:
    """Four sessions, eight downloads at once: each session's own budget would let its windows
    grow to 128 MiB; together they grow by no more than ``tenant_window_growth`` (before: each
    session on its own budget, so a tenant held that budget once per session)."""
    budget = 1 * MIB
    csc = {"tenant_window_growth": budget, "initial_window": INITIAL, "max_window": 16 * MIB}
    async with relay(tmp_path, csc=csc, agent={"sessions": 4}) as r:
        state = r.node.state
        async with asyncio.timeout(scaled(20)):
            while len(state.sessions) < 4:
                await asyncio.sleep(0.05)
        peak = 0
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _growth(state))
                await asyncio.sleep(0.002)

        async def download(http: aiohttp.ClientSession) -> int:
            got = 0
            async with http.get(r.tunnel(f"/bytes/{48 * MIB}")) as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_chunked(256 * KIB):
                    got += len(chunk)
            return got

        sampler = asyncio.ensure_future(sample())
        async with aiohttp.ClientSession() as http:
            for _ in range(5):  # windows grow when consumers keep up: on a loaded machine,
                sizes = await asyncio.gather(*(download(http) for _ in range(8)))  # try again
                assert sizes == [48 * MIB] * 8
                if peak:
                    break
        done.set()
        await sampler
        assert 0 < peak <= budget, f"growth {peak} against a budget of {budget}"
        pool = state.growth.of("acme")
        assert pool is not None
        assert pool.held == _growth(state) == 0  # every stream ended: all given back
        registry = state.metrics.registry
        assert registry.get_sample_value("csc_window_growth_bytes") == 0
        assert registry.get_sample_value("csc_window_growth_max_bytes") == 256 * MIB
    assert state.growth.node.held == 0 and state.growth.of("acme") is None
