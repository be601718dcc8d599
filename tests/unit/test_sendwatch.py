"""The send deadline and the node's bound on what slow clients hold (shared/sendwatch.py),
against transports whose buffers the test moves."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from shared.sendwatch import PRESSURE_SHARE, Hold, SendWatch, SendWatches

TIMEOUT = 0.2


class Buffer(asyncio.WriteTransport):
    """A transport that only has a write buffer (no socket: no kernel queue to ask)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get_write_buffer_size(self) -> int:
        return self.size

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def _watch(
    transport: Buffer,
    handed: list[int],
    stalls: list[float],
    group: SendWatches | None = None,
    timeout: float = TIMEOUT,
) -> SendWatch:
    loop = asyncio.get_running_loop()

    def stalled(shed: bool) -> None:
        assert not shed
        stalls.append(loop.time())

    return SendWatch(transport, timeout, lambda: handed[0], stalled, group)


async def test_a_buffer_that_never_drains_stalls_once_and_not_before_the_timeout() -> None:
    stalls: list[float] = []
    watch = _watch(Buffer(1000), [1000], stalls)
    started = asyncio.get_running_loop().time()
    watch.start()
    await asyncio.sleep(TIMEOUT * 3)
    assert len(stalls) == 1  # once, then the watch is over
    assert stalls[0] - started >= TIMEOUT
    assert not watch.watching


async def test_progress_of_any_size_keeps_the_connection() -> None:
    transport, handed, stalls = Buffer(1000), [1000], []
    watch = _watch(transport, handed, stalls)
    watch.start()
    for _ in range(12):  # refilled as fast as it drains: the size alone never moves
        await asyncio.sleep(TIMEOUT / 4)
        handed[0] += 10
    assert stalls == [] and watch.watching
    watch.stop()


async def test_the_watch_ends_when_nothing_waits() -> None:
    transport, stalls = Buffer(0), []
    watch = _watch(transport, [0], stalls)
    watch.start()
    assert not watch.watching  # nothing buffered: nothing to watch
    transport.size = 10
    watch.start()
    assert watch.watching
    transport.size = 0
    await asyncio.sleep(TIMEOUT)
    assert not watch.watching and stalls == []


class Client:
    """A watched connection in a group: its buffer, its stream's bytes, and how it ended."""

    def __init__(self, group: SendWatches, size: int, pending: int = 0, tenant: str = "") -> None:
        self.transport, self.handed = Buffer(size), [size]
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        self.ended: float | None = None  # when the group closed it
        self.watch = SendWatch(self.transport, LONG, lambda: self.handed[0], self._end, group)
        self.watch.pending, self.watch.tenant = (lambda: pending), tenant
        self.watch.start()

    async def read(self, step: int, every: float) -> None:
        """Take ``step`` bytes every ``every`` seconds (its buffer refilled as fast)."""
        while self.ended is None:
            self.handed[0] += step
            await asyncio.sleep(every)

    def _end(self, shed: bool) -> None:
        assert shed  # the deadline is never reached here
        self.ended = self.loop.time()
        self.transport.size = 0  # aborted: the buffer is dropped


#: a send deadline the tests never reach: only the group closes connections
LONG = 12.0
STALL = LONG / PRESSURE_SHARE


async def _until(done: Callable[[], bool], limit: float = 10.0) -> None:
    async with asyncio.timeout(limit):
        while not done():
            await asyncio.sleep(0.01)


async def test_under_the_limit_nobody_is_closed_and_the_sum_is_kept() -> None:
    group = SendWatches(10_000, LONG)
    clients = [Client(group, 1000, pending=500) for _ in range(4)]
    await asyncio.sleep(STALL * 1.5)
    assert [c.ended for c in clients] == [None] * 4
    assert (group.held, len(group)) == (6000, 4)
    for client in clients:
        client.watch.stop()
    assert len(group) == 0
    await _until(lambda: group.held == 0)


async def test_past_the_limit_the_longest_stalled_go_first_and_only_until_the_rest_fit() -> None:
    group = SendWatches(2500, LONG)
    first = Client(group, 1000)
    await asyncio.sleep(STALL / 2)
    later = [Client(group, 1000) for _ in range(2)]
    reading = Client(group, 1000)
    everyone = [first, *later, reading]

    async def read() -> None:
        while True:  # takes bytes all along, however few
            reading.handed[0] += 1
            await asyncio.sleep(group.interval / 4)

    task = asyncio.ensure_future(read())
    try:
        await _until(lambda: sum(c.ended is not None for c in everyone) == 2)
        await asyncio.sleep(STALL)  # and no more
    finally:
        task.cancel()
    # 4000 held: the oldest stall went first, then one of the later two; then 2000 fit
    assert first.ended is not None and first.ended - first.started >= STALL
    (gone,) = [c for c in later if c.ended is not None]
    assert gone.ended is not None and gone.ended >= first.ended
    assert gone.ended - gone.started >= STALL
    assert reading.ended is None and reading.watch.watching
    assert group.held == 2000 and len(group) == 2


async def test_a_client_is_closed_only_once_it_has_stalled_long_enough() -> None:
    group = SendWatches(0, LONG)
    client = Client(group, 1000)
    await _until(lambda: client.ended is not None)
    assert client.ended is not None and client.ended - client.started >= STALL
    assert len(group) == 0


async def test_without_a_limit_only_the_deadline_closes() -> None:
    group, stalls = SendWatches(None, TIMEOUT), []
    watch = _watch(Buffer(10**9), [0], stalls, group)
    started = asyncio.get_running_loop().time()
    watch.start()
    await _until(lambda: bool(stalls))
    assert stalls[0] - started >= TIMEOUT and len(group) == 0


async def test_then_the_slowest_readers_of_the_tenant_holding_the_most_go() -> None:
    """No client stalled, still over the limit: the tenant holding the most gives back first,
    its slowest reader first, the tenant chosen again after each (a's two slower readers go:
    3000 against b's 1000, then 2000 against 1000); b's reader, the slowest of all, stays."""
    group = SendWatches(2500, LONG)
    slow, medium, fast = (Client(group, 1000, tenant="a") for _ in range(3))
    other = Client(group, 1000, tenant="b")
    tick = group.interval / 4
    readers = [
        asyncio.ensure_future(slow.read(10, tick)),
        asyncio.ensure_future(medium.read(100, tick)),
        asyncio.ensure_future(fast.read(1000, tick)),
        asyncio.ensure_future(other.read(1, tick)),
    ]
    try:
        await _until(lambda: slow.ended is not None and medium.ended is not None)
        await asyncio.sleep(STALL)  # and no more
    finally:
        for reader in readers:
            reader.cancel()
    assert slow.ended is not None and medium.ended is not None
    assert slow.ended - slow.started >= STALL  # behind long enough to be chosen
    assert (fast.ended, other.ended) == (None, None)
    assert group.held == 2000


async def test_a_stalled_client_goes_before_the_readers_of_a_heavier_tenant() -> None:
    group = SendWatches(3500, LONG)
    readers = [Client(group, 1000, tenant="a") for _ in range(3)]
    stalled = Client(group, 1000, tenant="b")
    tasks = [asyncio.ensure_future(c.read(1, group.interval / 4)) for c in readers]
    try:
        await _until(lambda: stalled.ended is not None)
        await asyncio.sleep(STALL)
    finally:
        for task in tasks:
            task.cancel()
    assert [c.ended for c in readers] == [None] * 3
    assert group.held == 3000


async def test_a_held_body_nobody_takes_is_dropped_and_one_that_moves_is_kept() -> None:
    group = SendWatches(1000, LONG)
    taken = {"stuck": 0, "moving": 0}
    dropped: list[tuple[str, float]] = []
    loop = asyncio.get_running_loop()

    def hold(name: str) -> Hold:
        def drop(why: str) -> None:
            dropped.append((name, loop.time()))

        return Hold(group, name, lambda: 800, lambda: taken[name], lambda: "t", drop)

    stuck, moving = hold("stuck"), hold("moving")
    started = loop.time()
    stuck.join()
    moving.join()

    async def take() -> None:
        while True:
            taken["moving"] += 100
            await asyncio.sleep(group.interval / 4)

    task = asyncio.ensure_future(take())
    try:
        await _until(lambda: bool(dropped))
        await asyncio.sleep(STALL)  # 800 fit once the stuck one went
    finally:
        task.cancel()
    assert [name for name, _ in dropped] == ["stuck"]
    assert dropped[0][1] - started >= STALL
    assert not stuck.watching and moving.watching and len(group) == 1
    moving.leave()
    assert len(group) == 0


async def test_a_connection_with_two_members_is_closed_once() -> None:
    """An echo tunnel nobody reads has a send watch and a held upload, both stalled: one
    close, one count."""
    group = SendWatches(0, LONG)
    closed: list[str] = []
    first = Client(group, 1000)
    second = Hold(group, first.transport, None, lambda: 0, lambda: "", closed.append)
    second.waiting = 1000
    second.join()
    await _until(lambda: first.ended is not None or bool(closed))
    # whichever went first, the other was not closed again in the same look
    assert (first.ended is None) != (closed == [])
    first.watch.stop()  # as the connection's end does, long before the next look
    second.leave()
