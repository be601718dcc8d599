"""Agent session behaviour over real sockets: spreading, make-before-break on GOAWAY, drain."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path

import aiohttp

from tests.support.inproc import relay, start_agent
from tests.support.procs import async_wait_until
from tests.support.upstream import expected_sha256


async def _until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    await async_wait_until(predicate, timeout, 0.01)


async def test_agent_opens_two_sessions_and_streams_spread(tmp_path: Path) -> None:
    async with relay(tmp_path) as r, aiohttp.ClientSession() as http:
        await _until(lambda: len(r.node.state.sessions) == 2)
        url = r.tunnel("/slow-head?delay=0.2")
        results = await asyncio.gather(*(http.get(url) for _ in range(8)))
        assert [resp.status for resp in results] == [200] * 8
        opened = [s.streams_opened for s in r.node.state.sessions.values()]
        assert all(n > 0 for n in opened), opened


async def test_goaway_from_csc_is_make_before_break(tmp_path: Path) -> None:
    size = 8 * 1024 * 1024
    async with relay(tmp_path) as r, aiohttp.ClientSession() as http:
        await _until(lambda: len(r.node.state.sessions) == 2)
        resp = await http.get(r.tunnel(f"/bytes/{size}?rate={size // 2}"))
        old = next(s for s in r.node.state.sessions.values() if s.link.streams)
        old.link.go_away("going_away", "test drain")
        # a successor connects while the old session still carries the download
        await _until(lambda: len(r.node.state.sessions) == 3)
        assert old.id in r.node.state.sessions
        async with http.get(r.tunnel("/small")) as small:
            assert small.status == 200
        digest = hashlib.sha256(await resp.read()).hexdigest()
        assert digest == expected_sha256(size)
        # once idle, the old session goes away; two sessions remain
        await _until(lambda: old.id not in r.node.state.sessions)
        await _until(lambda: len(r.node.state.sessions) == 2)


async def test_agent_stop_drains_in_flight_downloads(tmp_path: Path) -> None:
    size = 4 * 1024 * 1024
    async with relay(tmp_path) as r, aiohttp.ClientSession() as http:
        resp = await http.get(r.tunnel(f"/bytes/{size}?rate={size}"))
        assert resp.status == 200
        stopping = asyncio.create_task(r.stop_agent())
        body = await resp.read()
        assert hashlib.sha256(body).hexdigest() == expected_sha256(size)
        assert await stopping == 0
        async with http.get(f"{r.csc_url}/v1/resolve/acme@example.com") as resolved:
            assert resolved.status == 503


def _trimmers() -> int:
    return sum(t.get_name() == "return-free-memory" for t in asyncio.all_tasks() if not t.done())


async def test_agent_returns_free_memory_while_it_runs(tmp_path: Path) -> None:
    """Like the CSC, the agent gives free heap pages back to the OS after a burst (a download
    leaves up to a link message of buffers per stream in the heap): its trim loop runs for the
    agent's lifetime and ends with it (shared/allocator.py)."""
    async with relay(tmp_path, start=False) as r:
        node_only = _trimmers()  # the CSC's own, in this process
        await start_agent(r)
        await async_wait_until(lambda: _trimmers() == node_only + 1, 5)
        assert await r.stop_agent() == 0
        assert _trimmers() == node_only
