"""The byte stream of a peer link (csc/cluster/peerwire.py): short chunks fed to the link at
once while its receive loop waits, the rest queued, in order either way; reading paused while
too much waits or the link's answers back up; the loop ended by the link's close."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from csc.cluster.peerwire import READ_HIGH, PeerWire
from shared.errors import CSCError, ProtocolError
from shared.link import DIRECT_MAX, Link


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.pauses = 0
        self.closing = False
        self.written: list[bytes] = []

    def pause_reading(self) -> None:
        assert not self.paused
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        assert self.paused
        self.paused = False

    def is_closing(self) -> bool:
        return self.closing

    def writelines(self, list_of_data: Any) -> None:
        self.written.extend(bytes(d) for d in list_of_data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class FakeLink:
    """What the wire uses of a Link: it records what it was fed directly."""

    def __init__(self) -> None:
        self.fed: list[bytes] = []
        self.reading_paused = False
        self.closed: asyncio.Future[CSCError] = asyncio.get_running_loop().create_future()
        self.readable = asyncio.Event()
        self.readable.set()
        self.fault: CSCError | None = None
        self.pause_after_feed = False

    @property
    def is_closed(self) -> bool:
        return self.closed.done()

    def receive_now(self, data: bytes) -> None:
        if self.fault is not None:
            self.closed.set_result(self.fault)
            raise self.fault
        self.fed.append(data)
        if self.pause_after_feed:
            self.reading_paused = True
            self.readable.clear()

    async def wait_readable(self) -> None:
        await self.readable.wait()

    def drain(self) -> None:
        self.reading_paused = False
        self.readable.set()


def wire_with(link: FakeLink | None = None) -> tuple[PeerWire, FakeTransport]:
    wire = PeerWire()
    transport = FakeTransport()
    wire.connection_made(transport)
    if link is not None:
        wire.attach(cast(Link, link))
    return wire, transport


async def waiting_read(wire: PeerWire) -> asyncio.Task[bytes]:
    task = asyncio.ensure_future(wire.read())
    for _ in range(3):
        await asyncio.sleep(0)
    return task


async def test_short_chunks_go_to_the_link_while_the_reader_waits() -> None:
    link = FakeLink()
    wire, _ = wire_with(link)
    reader = await waiting_read(wire)
    wire.data_received(b"one")
    wire.data_received(b"two")
    await asyncio.sleep(0)
    assert link.fed == [b"one", b"two"]
    assert not reader.done()  # nothing for the loop to take
    reader.cancel()


async def test_chunks_that_arrive_while_nobody_waits_are_read_in_order() -> None:
    link = FakeLink()
    wire, _ = wire_with(link)
    wire.data_received(b"a")
    wire.data_received(b"b")
    assert link.fed == []
    assert await wire.read() == b"ab"


async def test_a_short_chunk_behind_a_queued_one_is_queued_too() -> None:
    link = FakeLink()
    wire, _ = wire_with(link)
    reader = await waiting_read(wire)
    big = b"x" * (DIRECT_MAX + 1)
    wire.data_received(big)  # too long to feed at once: queued, the reader woken
    wire.data_received(b"after")  # before the reader ran: must not overtake it
    assert link.fed == []
    assert await reader == big + b"after"


async def test_nothing_is_fed_at_once_before_a_link_is_attached() -> None:
    wire, _ = wire_with()
    reader = await waiting_read(wire)
    wire.data_received(b"hello")
    assert await reader == b"hello"


async def test_reading_pauses_past_the_high_mark_and_resumes_when_taken() -> None:
    wire, transport = wire_with(FakeLink())
    chunk = b"y" * (64 * 1024)
    for _ in range(READ_HIGH // len(chunk) + 1):
        wire.data_received(chunk)
    assert transport.paused
    data = await wire.read()
    assert len(data) == (READ_HIGH // len(chunk) + 1) * len(chunk)
    assert not transport.paused


async def test_answers_backing_up_pause_the_socket_until_the_link_drains() -> None:
    link = FakeLink()
    link.pause_after_feed = True
    wire, transport = wire_with(link)
    reader = await waiting_read(wire)
    wire.data_received(b"request")
    assert link.fed == [b"request"]
    assert transport.paused  # no more bytes while the link's answers back up
    for _ in range(3):
        await asyncio.sleep(0)
    assert transport.paused and not reader.done()
    link.drain()
    for _ in range(3):
        await asyncio.sleep(0)
    assert not transport.paused  # read again, the reader waiting for the next bytes
    assert not reader.done()
    wire.data_received(b"next")
    assert link.fed[-1] == b"next"
    reader.cancel()


async def test_the_reader_ends_when_the_link_closes() -> None:
    link = FakeLink()
    wire, _ = wire_with(link)
    reader = await waiting_read(wire)
    link.closed.set_result(ProtocolError("silent peer"))
    assert await asyncio.wait_for(reader, 1) == b""


async def test_a_fault_in_a_chunk_fed_at_once_ends_the_reader() -> None:
    link = FakeLink()
    link.fault = ProtocolError("bad frame")
    wire, _ = wire_with(link)
    reader = await waiting_read(wire)
    wire.data_received(b"garbage")
    assert await asyncio.wait_for(reader, 1) == b""


async def test_end_of_stream_after_what_was_queued() -> None:
    wire, _ = wire_with(FakeLink())
    wire.data_received(b"last")
    wire.eof_received()
    assert await wire.read() == b"last"
    assert await wire.read() == b""


async def test_send_waits_for_the_drain_and_fails_once_the_connection_is_lost() -> None:
    wire, transport = wire_with(FakeLink())
    assert wire.send([b"a", b"b"]) is None
    assert transport.written == [b"a", b"b"]
    wire.pause_writing()
    waiting = wire.send([b"c"])
    assert waiting is not None
    drained = asyncio.ensure_future(waiting)
    await asyncio.sleep(0)
    assert not drained.done()
    wire.resume_writing()
    await asyncio.wait_for(drained, 1)
    wire.pause_writing()
    waiting = wire.send([b"d"])
    assert waiting is not None
    lost = asyncio.ensure_future(waiting)
    await asyncio.sleep(0)
    wire.connection_lost(None)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(lost, 1)
    transport.closing = True
    with pytest.raises(ConnectionResetError):
        wire.send([b"e"])
