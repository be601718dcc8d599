"""A peer that stops reading its link can neither grow the other side nor slow another tenant.

A raw agent (:class:`tests.support.attacks.Flooder`: a thread with a plain blocking socket
whose receive buffer is a few KiB, speaking the WebSocket with websockets' sans-I/O client)
completes the real handshake (upgrade with its token, HELLO, WELCOME) and then sends messages full of PINGs, each of which needs a PONG, and
never reads again. Meanwhile the relay's own agent (another tenant) serves requests. The CSC
must stop reading the flooding link (so its memory stays bounded), close it as
``link_stalled`` once its writes made no progress for ``stuck_timeout``, and serve every
request of the other tenant. The bounds are generous (liveness, not timing): the unbounded
queue this guards against grew by hundreds of MiB in a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from csc.relay.gateway import AgentSession
from shared.link import Link
from shared.protocol import Connection, LinkSettings, Side
from shared.protocol.codec import FrameType, encode_frame
from tenant_agent.websocket import connect, run_link
from tests.support.attacks import PINGS_PER_MESSAGE, Flooder
from tests.support.inproc import make_token, relay
from tests.support.procs import async_wait_until, scaled

FLOOD_ALIAS = "flood@example.net"
STUCK_TIMEOUT = 2.0
#: The CSC's resident memory may grow this much while the flood runs.
MAX_GROWTH = 64 * 1024 * 1024


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


async def test_an_agent_that_stops_reading_is_bounded_closed_and_harmless(
    tmp_path: Path,
) -> None:
    async with relay(tmp_path, csc={"stuck_timeout": STUCK_TIMEOUT}) as r:
        token = make_token(r.state_dir, "flood", [FLOOD_ALIAS])
        host, _, port = r.node.http_address.rpartition(":")
        sessions = r.node.state.sessions
        baseline = _rss()
        flooder = Flooder(host, int(port), token, FLOOD_ALIAS)
        flooder.start()
        try:
            await async_wait_until(lambda: flooder.welcomed.is_set() or flooder.error, 10, 0.01)
            assert flooder.error is None, repr(flooder.error)
            flooded: AgentSession = next(s for s in sessions.values() if s.tenant == "flood")
            started = time.monotonic()
            peak = baseline
            latencies: list[float] = []
            limit = scaled(STUCK_TIMEOUT + 10)
            async with aiohttp.ClientSession() as http:
                while time.monotonic() - started < limit:
                    t0 = time.monotonic()
                    async with asyncio.timeout(scaled(10)):
                        async with http.get(r.tunnel(f"/echo/n{len(latencies)}")) as resp:
                            assert resp.status == 200, await resp.text()
                            await resp.read()
                    latencies.append(time.monotonic() - t0)
                    peak = max(peak, _rss())
                    if flooded.link.is_closed and len(latencies) >= 10:
                        break
                    await asyncio.sleep(0.05)
            closed_after = time.monotonic() - started
        finally:
            flooder.stop.set()
            await asyncio.to_thread(flooder.join, scaled(10))
        assert flooder.error is None, repr(flooder.error)
        assert flooder.sent > 0
        growth = peak - baseline
        assert growth < MAX_GROWTH, f"the CSC grew by {growth / 2**20:.0f} MiB"
        assert flooded.link.is_closed, "the stuck link was not closed"
        assert flooded.link.closed.result().code == "link_stalled"
        assert closed_after < scaled(STUCK_TIMEOUT + 8)
        assert flooder.dropped_at is not None, "the stuck connection was not dropped"
        await async_wait_until(lambda: flooded.id not in sessions, 10, 0.02)
        # the other tenant was served all along, without long waits
        assert len(latencies) >= 10
        assert max(latencies) < scaled(5), f"slowest request {max(latencies):.2f} s"


async def test_the_agent_stops_reading_a_csc_that_stops_reading(tmp_path: Path) -> None:
    """The same rule on the agent's side: a "CSC" (an aiohttp server) that answers the HELLO,
    then sends PINGs and never reads again, gets no more than a bounded backlog from the agent,
    and its link is closed as ``link_stalled`` after ``stuck_timeout``."""
    flooding = asyncio.Event()

    async def csc(request: web.Request) -> web.StreamResponse:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        ws = web.WebSocketResponse(max_msg_size=1 << 24, compress=False)
        await ws.prepare(request)
        now = asyncio.get_running_loop().time()
        conn = Connection(Side.SERVER, LinkSettings(), accept_streams=False, now=now)
        conn.receive_data((await ws.receive()).data, now)  # HELLO
        conn.send_welcome({"aliases": []}, now)
        await ws.send_bytes(b"".join(conn.data_to_send()))
        flooding.set()
        message = encode_frame(FrameType.PING, 0, 0, b"12345678") * PINGS_PER_MESSAGE
        with contextlib.suppress(Exception):
            while not ws.closed:
                await ws.send_bytes(message)  # and never receive() again
        return ws

    app = web.Application()
    app.router.add_get("/ws", csc)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"ws://127.0.0.1:{runner.addresses[0][1]}/ws"
        ws = await asyncio.wait_for(connect(url, {}, max_size=1 << 24), scaled(10))
        now = asyncio.get_running_loop().time()
        conn = Connection(Side.CLIENT, LinkSettings(), accept_streams=True, now=now)
        conn.send_hello({"agent": "test"})
        link = Link(conn, ws.send_chunks, name="agent", stuck_timeout=STUCK_TIMEOUT)
        runner_task = asyncio.create_task(run_link(ws, link))
        await asyncio.wait_for(flooding.wait(), scaled(10))
        peak = 0
        started = time.monotonic()
        while not link.is_closed and time.monotonic() - started < scaled(STUCK_TIMEOUT + 10):
            peak = max(peak, link.backlog)
            await asyncio.sleep(0.01)
        assert link.is_closed, "the agent kept a stuck link"
        assert link.closed.result().code == "link_stalled"
        assert peak <= link.max_backlog
        await asyncio.wait_for(runner_task, scaled(10))
        await asyncio.wait_for(asyncio.shield(ws.closed), scaled(10))
    finally:
        await runner.cleanup()
