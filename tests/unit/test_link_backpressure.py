"""A link whose peer stops reading: water marks, the hard bound, the stuck deadline, pacing.

The server side of an in-memory link answers the client's PINGs through a sender that waits
at a gate, like a socket whose buffer is full. Its backlog (answers not yet taken by the
sender) must pause reading above the high-water mark and resume at the low-water mark once the
gate opens; more than ``max_backlog`` closes the link, and so does a sender that does not
return within ``stuck_timeout``, both with ``link_stalled``; a sender that took its message at
once arms no timer at all. DATA, bounded by credit, does not
count. :class:`FrameCutter` pieces must concatenate to the message and hold at most its limit
of frames whatever the chunking.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import LinkStalled
from shared.link import DIRECT_MAX, Link, SendFn
from shared.linkpace import FrameCutter
from shared.protocol import Connection, LinkSettings, Side
from shared.protocol.codec import FrameDecoder, FrameType, encode_frame

PING = encode_frame(FrameType.PING, 0, 0, b"12345678")  # its answer has the same size


def _server_link(
    gate: asyncio.Event,
    send: SendFn | None = None,
    settings: LinkSettings | None = None,
    **kw: Any,
) -> tuple[Link, list[bytes]]:
    """An open server-side link whose sender waits for ``gate`` (or is ``send``); what it
    sent."""
    now = asyncio.get_running_loop().time()
    settings = settings or LinkSettings()
    client = Connection(Side.CLIENT, settings, accept_streams=True, now=now)
    server = Connection(Side.SERVER, settings, accept_streams=False, now=now)
    client.send_hello({})
    server.receive_data(b"".join(client.data_to_send()), now)
    server.send_welcome({}, now)
    sent: list[bytes] = []

    async def gated(chunks: Sequence[bytes | memoryview]) -> None:
        await gate.wait()
        sent.append(b"".join(chunks))

    link = Link(server, send or gated, name="server", **kw)
    return link, sent


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_reading_pauses_above_high_water_and_resumes_at_low_water() -> None:
    gate = asyncio.Event()
    link, sent = _server_link(gate, high_water=1000, low_water=200, max_backlog=100_000)
    try:
        await _settle()  # the writer took WELCOME + PING and waits at the gate
        link.feed(PING * 40)  # 800 answer bytes: below the mark
        assert link.backlog == 800 and not link.reading_paused
        await asyncio.wait_for(link.wait_readable(), 1)
        link.feed(PING * 20)
        assert link.backlog == 1200 and link.reading_paused
        reader = asyncio.ensure_future(link.wait_readable())
        await _settle()
        assert not reader.done(), "read on while the answers could not be sent"
        gate.set()
        await asyncio.wait_for(reader, 5)
        await _settle()
        assert link.backlog == 0 and not link.reading_paused
        assert sum(len(m) for m in sent) >= 60 * len(PING)
    finally:
        gate.set()
        await link.aclose()


async def test_a_backlog_above_the_hard_bound_closes_the_link() -> None:
    gate = asyncio.Event()
    link, _ = _server_link(gate, high_water=1000, low_water=200, max_backlog=4000)
    try:
        await _settle()
        with pytest.raises(LinkStalled):
            link.feed(PING * 300)  # 6000 bytes of answers in one message
        assert link.is_closed and link.closed.result().code == "link_stalled"
        assert link.backlog == 0  # dropped, not kept
        await asyncio.wait_for(link.wait_readable(), 1)  # a closed link never blocks a reader
    finally:
        gate.set()
        await link.aclose()


async def test_a_send_that_never_returns_closes_the_link_after_stuck_timeout() -> None:
    gate = asyncio.Event()
    link, _ = _server_link(gate, stuck_timeout=0.2)
    try:
        err = await asyncio.wait_for(asyncio.shield(link.closed), 5)
        assert err.code == "link_stalled"
    finally:
        await link.aclose()


async def test_silence_while_reading_is_paused_counts_as_stalled_not_as_heartbeat() -> None:
    gate = asyncio.Event()
    quick = LinkSettings(heartbeat_interval=0.1, heartbeat_timeout=0.3)
    link, _ = _server_link(gate, settings=quick, high_water=100, low_water=50)
    try:
        await _settle()
        link.feed(PING * 10)
        assert link.reading_paused  # so the peer's frames stay unread: nothing is received
        err = await asyncio.wait_for(asyncio.shield(link.closed), 5)
        assert err.code == "link_stalled"
    finally:
        gate.set()
        await link.aclose()


async def test_a_sender_that_makes_progress_is_not_stuck() -> None:
    async def slow(chunks: Sequence[bytes | memoryview]) -> None:
        await asyncio.sleep(0.05)

    link, _ = _server_link(asyncio.Event(), send=slow, stuck_timeout=0.2)
    try:
        for _ in range(10):
            link.feed(PING)
            await asyncio.sleep(0.05)
        assert not link.is_closed
    finally:
        await link.aclose()


def _counting_timeouts(monkeypatch: pytest.MonkeyPatch) -> list[float | None]:
    """Record every ``asyncio.timeout`` block entered from now on (the delays)."""
    entered: list[float | None] = []
    real = asyncio.timeout

    def counted(delay: float | None) -> asyncio.Timeout:
        entered.append(delay)
        return real(delay)

    monkeypatch.setattr(asyncio, "timeout", counted)
    return entered


async def test_a_message_the_transport_takes_at_once_needs_no_stuck_timer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entered = _counting_timeouts(monkeypatch)
    sent: list[bytes] = []

    def at_once(chunks: Sequence[bytes | memoryview]) -> None:
        sent.append(b"".join(chunks))

    link, _ = _server_link(asyncio.Event(), send=at_once, stuck_timeout=0.2)
    try:
        for _ in range(5):
            link.feed(PING)
            await _settle()
        assert b"".join(sent).count(b"12345678") == 5  # every answer went out
        assert entered == [], "a timer was armed for a send that did not wait"
        assert not link.is_closed
    finally:
        await link.aclose()


async def test_a_send_that_returns_a_wait_is_timed_and_closes_when_stuck(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entered = _counting_timeouts(monkeypatch)
    gate = asyncio.Event()

    async def drained() -> None:
        await gate.wait()

    def paused(chunks: Sequence[bytes | memoryview]) -> Awaitable[None]:
        return drained()  # written, but the transport is paused until the gate opens

    link, _ = _server_link(gate, send=paused, stuck_timeout=0.2)
    try:
        err = await asyncio.wait_for(asyncio.shield(link.closed), 5)
        assert err.code == "link_stalled"
        assert entered == [0.2]
    finally:
        gate.set()
        await link.aclose()


async def test_receive_now_takes_one_piece_and_refuses_what_may_be_more() -> None:
    link, _ = _server_link(asyncio.Event(), send=lambda chunks: None)
    try:
        pings = PING * (DIRECT_MAX // len(PING))
        link.receive_now(pings)  # at most DIRECT_MAX bytes: fed here, answered
        assert link.backlog == len(pings)
        with pytest.raises(ValueError):
            link.receive_now(PING * (DIRECT_MAX // len(PING) + 1))
        assert link.backlog == len(pings), "a refused message was fed"
    finally:
        await link.aclose()


async def test_data_within_credit_does_not_count_as_backlog() -> None:
    gate = asyncio.Event()
    link, _ = _server_link(gate, high_water=1000, low_water=200, max_backlog=4000)
    try:
        await _settle()
        stream = link.open({"kind": "tcp"})
        await stream.write(b"x" * 100_000)  # within the peer's credit: queued at once
        link.feed(PING)
        assert link.backlog == len(PING) and not link.reading_paused
    finally:
        gate.set()
        await link.aclose()


async def test_receive_cuts_a_dense_message_and_yields_between_pieces() -> None:
    gate = asyncio.Event()
    gate.set()
    link, sent = _server_link(gate)
    link.fair_slice = 0.0  # yield between every two pieces
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    other = asyncio.ensure_future(ticker())
    try:
        await _settle()
        before = ticks
        await link.receive(PING * 2000)  # 8 pieces of 256 frames
        assert ticks - before >= 7, "the receive loop did not let other tasks run"
        await _settle()
        assert sum(len(m) for m in sent) >= 2000 * len(PING)
    finally:
        other.cancel()
        await link.aclose()


def _frames(sizes: list[int]) -> bytes:
    return b"".join(
        encode_frame(FrameType.DATA, 0, 1, bytes(n))
        if n
        else encode_frame(FrameType.PING, 0, 0, bytes(8))
        for n in sizes
    )


@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=80),
    cuts=st.lists(st.integers(1, 500), max_size=20),
    limit=st.integers(1, 8),
)
def test_frame_cutter_pieces_are_the_message_at_frame_boundaries(
    sizes: list[int], cuts: list[int], limit: int
) -> None:
    wire = _frames(sizes)
    messages, pos = [], 0
    for size in cuts:  # any chunking into messages, frames and headers spanning them
        messages.append(wire[pos : pos + size])
        pos += size
    messages.append(wire[pos:])
    cutter = FrameCutter(limit)
    decoder = FrameDecoder(1 << 20)
    pieces: list[bytes] = []
    for message in filter(None, messages):
        got = cutter.cut(message)
        assert b"".join(got) == message
        pieces += got
    decoded = 0
    for piece in pieces:
        frames = decoder.feed(piece)
        assert len(frames) <= limit + 1  # at most the limit, plus one completed from before
        decoded += len(frames)
    assert decoded == len(sizes)


def test_frame_cutter_passes_bulk_messages_whole() -> None:
    message = _frames([60_000, 60_000])
    got = FrameCutter(1).cut(message)
    assert len(got) == 2
    assert FrameCutter(4).cut(message) == [message]
