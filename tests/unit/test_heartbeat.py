"""Heartbeats at rest: the shared timer (shared/timerwheel.py), the server's skipped PINGs
(docs/protocol.md §7) and the short way for a lone PING (``answer_ping``)."""

from __future__ import annotations

import asyncio
import gc
import itertools
import weakref
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csc.relay.websocket import ServerWebSocket, run_websocket
from csc.relay.wsframes import OP_BINARY, frame_head
from shared.link import Link
from shared.linkpace import FrameCutter
from shared.protocol import Connection, LinkSettings, LinkState, Side
from shared.protocol.codec import FLAG_ACK, FrameDecoder, FrameType, encode_frame
from shared.timerwheel import LoopTimers, TimerWheel, loop_timers
from tests.unit.test_mux import Pair
from tests.unit.test_wsframes import client_frame

# -- the wheel (no loop) -------------------------------------------------------------------------


@given(
    whens=st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=40),
    resolution=st.sampled_from([0.001, 0.02, 0.1, 0.3, 1.0]),
)
@settings(max_examples=200, deadline=None)
def test_items_come_due_at_or_after_their_deadline_and_within_one_tick(
    whens: list[float], resolution: float
) -> None:
    wheel: TimerWheel[int] = TimerWheel(resolution)
    for i, when in enumerate(whens):
        wheel.add(when, i)
    seen: dict[int, float] = {}
    while (at := wheel.next_time()) is not None:
        for item in wheel.pop_due(at):
            seen[item] = at
    assert sorted(seen) == list(range(len(whens)))
    for i, when in enumerate(whens):
        assert when <= seen[i] < when + resolution + 1e-9
    assert len(wheel) == 0 and wheel.pop_due(1e9) == []


def test_moving_and_discarding_items() -> None:
    wheel: TimerWheel[str] = TimerWheel(0.5)
    wheel.add(1.0, "a")
    wheel.add(1.2, "b")
    wheel.add(3.0, "c")
    assert wheel.next_time() == 1.0
    wheel.add(2.0, "a")  # moved: never fires at 1.0
    wheel.discard("b")
    wheel.discard("b")  # twice is fine
    assert "b" not in wheel and "a" in wheel and len(wheel) == 2
    assert wheel.next_time() == 2.0  # the emptied ticks are skipped
    assert wheel.pop_due(1.9) == []
    assert wheel.pop_due(2.0) == ["a"]
    wheel.add(3.0, "c")  # the same tick again: unchanged
    assert wheel.pop_due(10.0) == ["c"]
    assert wheel.next_time() is None


def test_a_resolution_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TimerWheel(0)


def test_the_per_loop_table_does_not_keep_a_dropped_loop() -> None:
    loop = asyncio.new_event_loop()
    timers = loop_timers(loop)
    assert loop_timers(loop) is timers and timers.loop is loop
    ref = weakref.ref(loop)
    loop.close()
    del loop
    gc.collect()
    assert ref() is None
    with pytest.raises(RuntimeError):
        timers.loop  # noqa: B018


# -- the loop adapter ----------------------------------------------------------------------------


async def test_callbacks_share_one_loop_timer_and_never_fire_early() -> None:
    loop = asyncio.get_running_loop()
    timers = LoopTimers(loop, resolution=0.01)
    start = loop.time()
    fired: dict[str, float] = {}
    done = asyncio.Event()

    def callback(name: str, when: float) -> None:
        def run() -> None:
            fired[name] = loop.time()
            assert loop.time() >= when
            if len(fired) == 3:
                done.set()

        timers.schedule(when, run)

    callback("late", start + 0.06)
    callback("early", start + 0.02)
    callback("middle", start + 0.04)
    cancelled = timers.wheel
    assert len(cancelled) == 3

    def never() -> None:
        raise AssertionError("cancelled")

    timers.schedule(start + 0.03, never)
    timers.cancel(never)
    await asyncio.wait_for(done.wait(), 5)
    assert sorted(fired, key=fired.__getitem__) == ["early", "middle", "late"]
    assert len(timers) == 0 and timers._handle is None


async def test_a_failing_callback_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    timers = LoopTimers(loop, resolution=0.01)
    ran = asyncio.Event()

    def bad() -> None:
        raise RuntimeError("boom")

    timers.schedule(loop.time(), bad)
    timers.schedule(loop.time(), ran.set)
    await asyncio.wait_for(ran.wait(), 5)
    assert "timer callback" in caplog.text


async def test_links_file_their_heartbeat_in_the_loop_timer_and_leave_it_when_closed() -> None:
    sent: list[bytes] = []

    async def send(chunks: Sequence[bytes | memoryview]) -> None:
        sent.append(b"".join(chunks))

    loop = asyncio.get_running_loop()
    timers = loop_timers()
    before = len(timers)
    fast = LinkSettings(heartbeat_interval=0.05, heartbeat_timeout=10.0)
    links = []
    for _ in range(3):
        conn = Connection(Side.CLIENT, fast, accept_streams=False, now=loop.time())
        links.append(Link(conn, send))
    assert len(timers) == before + 3
    for link in links:
        link.close()
    assert len(timers) == before
    await asyncio.gather(*(link.aclose() for link in links))


async def test_a_silent_link_times_out_through_the_shared_timer() -> None:
    async def send(chunks: Sequence[bytes | memoryview]) -> None:
        pass

    loop = asyncio.get_running_loop()
    quick = LinkSettings(heartbeat_interval=0.05, heartbeat_timeout=0.2)
    conn = Connection(Side.CLIENT, quick, accept_streams=False, now=loop.time())
    link = Link(conn, send)
    started = loop.time()
    err = await asyncio.wait_for(asyncio.shield(link.closed), 5)
    assert err.code == "heartbeat_timeout"
    assert loop.time() - started >= 0.2
    await link.aclose()


# -- the server skips its PING while the client pings (§7) ---------------------------------------


def pings(frames: list[bytes | memoryview]) -> list[int]:
    """The flags of the PING frames in ``frames``."""
    decoder = FrameDecoder(1 << 20)
    out = []
    for chunk in frames:
        out += [f.flags for f in decoder.feed(bytes(chunk)) if f.type == FrameType.PING]
    return out


def run_turns(p: Pair, turns: int, *, client_pings: bool) -> list[int]:
    """``turns`` heartbeat intervals (10 s), each side's frames delivered at once; the flags of
    the PINGs the server sent."""
    server_pings: list[int] = []
    for _ in range(turns):
        p.now += 10
        p.server.handle_timer(p.now)
        if client_pings:
            p.client.handle_timer(p.now)
        while p.server.has_output or p.client.has_output:
            out = p.server.data_to_send()
            server_pings += pings(out)
            p.client.receive_data(b"".join(out), p.now)
            p.server.receive_data(b"".join(p.client.data_to_send()), p.now)
    return server_pings


def test_the_server_answers_instead_of_pinging_while_the_client_pings() -> None:
    s = LinkSettings(heartbeat_interval=10.0, heartbeat_timeout=30.0)
    p = Pair(s, s)
    p.handshake()
    sent = run_turns(p, 20, client_pings=True)
    assert sent and all(flags == FLAG_ACK for flags in sent)  # only answers
    assert p.server.state is p.client.state is LinkState.OPEN


def test_the_server_pings_again_when_the_client_stops() -> None:
    s = LinkSettings(heartbeat_interval=10.0, heartbeat_timeout=30.0)
    p = Pair(s, s)
    p.handshake()
    run_turns(p, 3, client_pings=True)
    sent = run_turns(p, 4, client_pings=False)  # the client still answers, it just never pings
    assert sent.count(0) >= 3
    assert p.server.state is p.client.state is LinkState.OPEN


def test_the_server_keeps_pinging_while_a_stream_is_open() -> None:
    s = LinkSettings(heartbeat_interval=10.0, heartbeat_timeout=30.0)
    p = Pair(s, s)
    p.handshake()
    p.open()
    sent = run_turns(p, 5, client_pings=True)
    assert sent.count(0) == 5  # a PING each turn: the RTT stays fresh for flow control


def test_the_client_never_skips() -> None:
    s = LinkSettings(heartbeat_interval=10.0, heartbeat_timeout=30.0)
    p = Pair(s, s)
    p.handshake()
    client_pings = 0
    for _ in range(5):
        p.now += 10
        p.server.handle_timer(p.now)
        p.client.handle_timer(p.now)
        client_pings += pings(p.client.data_to_send()).count(0)
        p.pump()
    assert client_pings == 5


# -- the short way for a lone PING (Connection.answer_ping, Link.answer_ping) --------------------


def ping_frame(token: bytes, flags: int = 0) -> bytes:
    return encode_frame(FrameType.PING, flags, 0, token)


def open_server(s: LinkSettings | None = None) -> Pair:
    p = Pair(s, s)
    p.handshake()
    p.take(p.server)
    return p


def test_a_lone_ping_is_answered_and_counts_as_the_peers_ping() -> None:
    s = LinkSettings(heartbeat_interval=10.0, heartbeat_timeout=30.0)
    p = open_server(s)
    p.now += 25
    ack = p.server.answer_ping(ping_frame(b"abcdefgh"), p.now)
    assert ack == ping_frame(b"abcdefgh", FLAG_ACK)
    assert not p.server.has_output and p.server.events() == []  # nothing queued
    p.now += 10  # 35 s after the last message before the PING: no timeout, it counted
    p.server.handle_timer(p.now)  # and the server skips its PING: the client's was recent (§7)
    assert not p.server.has_output and p.server.state is LinkState.OPEN


def test_other_messages_take_the_common_way_and_change_nothing() -> None:
    p = open_server()
    token = b"12345678"
    others = [
        ping_frame(token) * 2,  # two PINGs
        ping_frame(token, FLAG_ACK),  # an answer
        encode_frame(FrameType.DATA, 0, 1, token),  # same size, another type
        ping_frame(token)[:-1],  # a part of one
    ]
    deadline = p.server.next_deadline()
    for data in others:
        assert p.server.answer_ping(data, p.now + 1) is None
    assert p.server.next_deadline() == deadline
    p.server.receive_data(ping_frame(token)[:5], p.now)  # the decoder holds part of a frame
    assert p.server.answer_ping(ping_frame(token), p.now) is None
    hand = Connection(Side.SERVER, LinkSettings(), accept_streams=False, now=0.0)
    assert hand.answer_ping(ping_frame(token), 1.0) is None  # before the handshake: not taken


@given(
    messages=st.lists(
        st.one_of(
            st.binary(min_size=8, max_size=8).map(ping_frame),
            st.binary(min_size=8, max_size=8).map(lambda t: ping_frame(t) * 2),
            st.binary(min_size=8, max_size=8).map(lambda t: ping_frame(t, FLAG_ACK)),
        ),
        max_size=12,
    ),
    cuts=st.lists(st.integers(0, 40), max_size=6),
)
@settings(max_examples=100, deadline=None)
def test_the_short_way_sends_what_the_common_way_would(
    messages: list[bytes], cuts: list[int]
) -> None:
    """Whatever the messages and their cutting, answering lone PINGs the short way gives the
    same bytes, in the same order, as feeding everything."""
    stream = b"".join(messages)
    bounds = sorted({0, len(stream), *(min(c * 7, len(stream)) for c in cuts)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    common, short = open_server(), open_server()
    expected, got = [], []
    for chunk in chunks:
        common.server.receive_data(chunk, common.now)
        expected += common.server.data_to_send()
        ack = short.server.answer_ping(chunk, short.now)
        if ack is None:
            short.server.receive_data(chunk, short.now)
            got += short.server.data_to_send()
        else:
            got.append(ack)
    assert b"".join(got) == b"".join(expected)


def test_the_cutter_knows_when_a_message_starts_with_a_frame() -> None:
    cutter = FrameCutter()
    ping = ping_frame(b"abcdefgh")
    assert cutter.at_boundary
    cutter.cut(ping + ping[:5])  # a header cut short
    assert not cutter.at_boundary
    cutter.cut(ping[5:14])  # the header's end, part of the payload
    assert not cutter.at_boundary
    cutter.cut(ping[14:])
    assert cutter.at_boundary


class FakeTransport:
    """What ServerWebSocket needs of a transport; writes recorded."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default  # plain TCP: no peer name, no TLS

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def writelines(self, chunks: Sequence[bytes | memoryview]) -> None:
        self.written.append(b"".join(chunks))

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


async def test_the_websocket_answers_a_lone_ping_without_the_links_writer() -> None:
    loop = asyncio.get_running_loop()
    p = open_server()
    p.server.data_to_send()
    transport = FakeTransport()
    ws = ServerWebSocket(1 << 20)
    ws.connection_made(transport)  # type: ignore[arg-type]
    link = Link(p.server, ws.send_chunks)
    ws.attach(link)
    runner = asyncio.ensure_future(run_websocket(ws, link))
    deadline = loop.time() + 5
    while ws._waiter is None:  # the receive loop waits for a payload
        assert loop.time() < deadline
        await asyncio.sleep(0)
    transport.written.clear()
    flushes = link._flushes_started
    ws.data_received(client_frame(OP_BINARY, ping_frame(b"lonelyPG")))
    assert transport.written == [frame_head(20) + ping_frame(b"lonelyPG", FLAG_ACK)]
    assert link._flushes_started == flushes and ws._waiter is not None
    # while the transport is paused the ACK takes the common way (and its backpressure)
    ws.pause_writing()
    ws.data_received(client_frame(OP_BINARY, ping_frame(b"pausedPG")))
    assert link.backlog == 20 and len(transport.written) == 1
    ws.resume_writing()
    while link.backlog:
        assert loop.time() < deadline
        await asyncio.sleep(0)
    assert transport.written[-1] == frame_head(20) + ping_frame(b"pausedPG", FLAG_ACK)
    link.close()
    ws.connection_lost(None)
    await asyncio.wait_for(runner, 5)


async def test_the_websocket_sender_waits_only_while_the_transport_is_paused() -> None:
    transport = FakeTransport()
    ws = ServerWebSocket(1 << 20)
    ws.connection_made(transport)  # type: ignore[arg-type]
    assert ws.send_now([b"abc", b"def"]) is None  # taken at once: nothing to wait for
    assert transport.written == [frame_head(6) + b"abcdef"]
    ws.pause_writing()
    waiting = ws.send_now([b"ghi"])
    assert waiting is not None and transport.written[-1] == frame_head(3) + b"ghi"
    drained = asyncio.ensure_future(waiting)
    await asyncio.sleep(0)
    assert not drained.done()
    ws.resume_writing()
    await asyncio.wait_for(drained, 5)
    ws.pause_writing()
    lost = asyncio.ensure_future(ws.send_chunks([b"jkl"]))
    await asyncio.sleep(0)
    ws.connection_lost(None)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(lost, 5)
    with pytest.raises(ConnectionResetError):
        ws.send_now([b"mno"])
