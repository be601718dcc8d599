"""The send deadline (shared/sendwatch.py) against a transport whose buffer the test moves."""

from __future__ import annotations

import asyncio
from typing import Any

from shared.sendwatch import SendWatch

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


def _watch(transport: Buffer, handed: list[int], stalls: list[float]) -> SendWatch:
    loop = asyncio.get_running_loop()
    return SendWatch(transport, TIMEOUT, lambda: handed[0], lambda: stalls.append(loop.time()))


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
