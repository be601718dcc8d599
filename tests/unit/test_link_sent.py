"""``Link.sent()``: a relay credits its source only once the bytes it queued have left.

Two links joined back to back in memory; the server's sender waits at a gate, like a socket
whose buffer is full. ``sent()`` must not return while the gate is shut (the bytes are still
queued in this process), must return once the sender has taken them, and must never hang
after the link closed. ``unsent`` (what a relay checks before crediting early) counts the
DATA bytes until that same moment.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from shared.link import Link
from shared.protocol import LinkSettings
from tests.support.linkpair import handshaken


async def _gated_pair(gate: asyncio.Event) -> tuple[Link, Link]:
    """(client, server); what the server sends waits for ``gate``."""
    client, server = handshaken(LinkSettings(), asyncio.get_running_loop().time())
    links: dict[str, Link] = {}

    async def to_server(chunks: Sequence[bytes | memoryview]) -> None:
        links["server"].feed(b"".join(chunks))

    async def to_client(chunks: Sequence[bytes | memoryview]) -> None:
        await gate.wait()
        links["client"].feed(b"".join(chunks))

    async def keep(stream: object) -> None:
        await asyncio.Event().wait()

    links["client"] = Link(client, to_server, on_stream=keep, name="client")
    links["server"] = Link(server, to_client, name="server")
    return links["client"], links["server"]


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_sent_waits_until_the_sender_took_the_queued_bytes() -> None:
    gate = asyncio.Event()
    client, server = await _gated_pair(gate)
    try:
        stream = server.open({"kind": "tcp"})
        await stream.write(b"x" * 100_000)  # within the credit: queued at once
        sent = asyncio.ensure_future(server.sent())
        await _settle()
        assert not sent.done(), "sent() returned while the bytes were still queued here"
        gate.set()
        await asyncio.wait_for(sent, 5)
        await asyncio.wait_for(server.sent(), 5)  # nothing queued: returns at once
    finally:
        gate.set()
        await server.aclose()
        await client.aclose()


async def test_sent_returns_when_the_link_closes() -> None:
    gate = asyncio.Event()
    client, server = await _gated_pair(gate)
    try:
        stream = server.open({"kind": "tcp"})
        await stream.write(b"y" * 1000)
        waiters = [asyncio.ensure_future(server.sent()) for _ in range(3)]
        await _settle()
        waiters[0].cancel()  # one waiter giving up does not cancel the others' wait
        await _settle()
        assert not any(w.done() for w in waiters[1:])
        server.close()
        await asyncio.wait_for(asyncio.gather(*waiters[1:]), 5)
    finally:
        gate.set()
        await server.aclose()
        await client.aclose()


async def test_unsent_counts_queued_and_in_flight_bytes_until_the_sender_returns() -> None:
    gate = asyncio.Event()
    client, server = await _gated_pair(gate)
    try:
        stream = server.open({"kind": "tcp"})
        assert server.unsent == 0
        await stream.write(b"z" * 3000)
        assert server.unsent == 3000  # queued
        await _settle()
        assert server.unsent == 3000  # in a flush whose sender waits at the gate
        await stream.write(b"z" * 500)
        assert server.unsent == 3500
        gate.set()
        await asyncio.wait_for(server.sent(), 5)
        assert server.unsent == 0
        await stream.write(b"z" * 10)
        server.close()
        assert server.unsent == 0  # a closed link holds nothing to wait for
    finally:
        gate.set()
        await server.aclose()
        await client.aclose()
