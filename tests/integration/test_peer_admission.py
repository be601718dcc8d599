"""A forwarding node waits a bounded time for the other node's admission of a stream
(csc/cluster/peer.py ``PeerPool.open``): admitted, the stream is returned; not admitted within
``ADMISSION_TIMEOUT``, the stream is reset, the node is marked suspect and the caller gets
``portal_offline`` (so it tries another node). Real peer link over loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from csc.cluster import peer
from csc.cluster.peer import PeerPool, PeerServer
from shared.errors import PortalOffline, ProtocolError
from shared.linkstream import LinkStream
from shared.protocol import LinkSettings
from tests.support.linkpair import FORWARDED_GET
from tests.support.procs import scaled

KEY = b"k" * 32
INFO = FORWARDED_GET


def _no_local(info: dict[str, object]) -> LinkStream:
    raise ProtocolError("not used")


@pytest.fixture
async def node_a() -> AsyncIterator[str]:
    server = PeerServer("A", KEY, LinkSettings(), _no_local, lambda: None, lambda: None)
    host, port = await server.start("127.0.0.1", 0)
    try:
        yield f"{host}:{port}"
    finally:
        await server.stop()


async def test_admitted_and_not_admitted(node_a: str, monkeypatch: pytest.MonkeyPatch) -> None:
    address = node_a
    admit = True
    held = asyncio.Event()

    async def relay(self: PeerServer, stream: LinkStream) -> None:
        if admit:
            stream.accept({"node": "A"})
        await held.wait()

    monkeypatch.setattr(PeerServer, "_relay", relay)
    monkeypatch.setattr(PeerServer, "_relay_now", lambda self, stream: False)
    monkeypatch.setattr(peer, "ADMISSION_TIMEOUT", 0.5)
    pool = PeerPool("B", KEY, LinkSettings())
    try:
        admitted = await pool.open("A", address, 1, dict(INFO))
        assert admitted.node == "A" and not pool.suspect("A", 1)
        admitted.finish()
        admit = False
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(scaled(10)):
            with pytest.raises(PortalOffline, match="did not admit"):
                await pool.open("A", address, 1, dict(INFO))
        assert loop.time() - started >= 0.45
        assert pool.suspect("A", 1)
    finally:
        held.set()
        await pool.aclose()
