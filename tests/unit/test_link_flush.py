"""``Link.flush()`` (before a transport is closed) keeps every frame in order.

The link's writer takes everything queued and sends it as messages of at most ``MAX_MESSAGE``,
waiting for the transport between them (a socket whose buffer is full). ``flush()`` used to
send what was queued after that with a send of its own, at once: a stream's FIN, queued while
the writer still held the stream's last DATA, went on the wire first, and the peer ended the
stream short (a drained agent session cut a download in tests/e2e/test_cluster_rolling.py:
"the agent's response body is shorter than its Content-Length").
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence

from shared.link import MAX_MESSAGE, Link
from shared.protocol import DataReceived, LinkSettings, StreamEnded, StreamOpened
from tests.support.linkpair import handshaken

PER_STREAM = 256 * 1024  # the initial window: each write is queued at once
STREAMS = MAX_MESSAGE // PER_STREAM + 2  # more than one message in one flush


async def test_flush_never_sends_ahead_of_what_the_writer_still_holds() -> None:
    loop = asyncio.get_running_loop()
    peer, conn = handshaken(LinkSettings(), loop.time())

    wire: list[bytes] = []
    room: asyncio.Future[None] = loop.create_future()  # the socket's buffer is full until set

    def send(chunks: Sequence[bytes | memoryview]) -> Awaitable[None] | None:
        wire.append(b"".join(chunks))  # written: the transport takes it, in call order
        return None if room.done() else asyncio.shield(room)

    link = Link(conn, send, name="under test")
    try:
        streams = [link.open({"kind": "tcp"}) for _ in range(STREAMS)]
        for stream in streams:
            await stream.write(b"d" * PER_STREAM)
        for _ in range(5):  # the writer takes it all and waits after its first message
            await asyncio.sleep(0)
        assert len(wire) == 1
        streams[-1].write_eof()
        flushing = asyncio.ensure_future(link.flush())
        for _ in range(5):
            await asyncio.sleep(0)
        room.set_result(None)
        await asyncio.wait_for(flushing, 5)

        peer.receive_data(b"".join(wire), loop.time())
        received: dict[int, int] = {}
        ended_after: dict[int, int] = {}
        for event in peer.events():
            if isinstance(event, StreamOpened):
                received[event.stream_id] = 0
            elif isinstance(event, DataReceived):
                received[event.stream_id] += len(event.data)
            elif isinstance(event, StreamEnded):
                ended_after[event.stream_id] = received[event.stream_id]
        assert list(received.values()) == [PER_STREAM] * STREAMS
        assert ended_after == {streams[-1].id: PER_STREAM}  # the FIN came after all its data
    finally:
        if not room.done():
            room.set_result(None)
        await link.aclose()
