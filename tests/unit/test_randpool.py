"""shared/randpool.py hands out the operating system's random bytes from a block: never the
same bytes twice, a draw longer than what is left (or than a block) starts a new block, and a
forked child never repeats its parent's bytes."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import randpool
from shared.randpool import BLOCK, RandomPool, random_bytes


def test_draws_are_the_blocks_bytes_in_order_never_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []
    counter = iter(range(1_000_000))

    def urandom(n: int) -> bytes:
        reads.append(n)
        return bytes(next(counter) % 256 for _ in range(n))

    pool = RandomPool()
    monkeypatch.setattr(randpool.os, "urandom", urandom)
    first = pool.take(16)
    second = pool.take(16)
    assert reads == [BLOCK]  # one read for both
    assert first == bytes(range(16)) and second == bytes(range(16, 32))
    for _ in range(BLOCK // 16 - 2):
        pool.take(16)
    pool.take(16)  # the block is used up: a new one
    assert reads == [BLOCK, BLOCK]
    big = pool.take(BLOCK + 5)  # longer than a block: read as long as it
    assert len(big) == BLOCK + 5 and reads[-1] == BLOCK + 5


@given(st.lists(st.integers(1, 600), min_size=1, max_size=40))
def test_any_sequence_of_draws_gets_the_lengths_asked(sizes: list[int]) -> None:
    pool = RandomPool()
    drawn = [pool.take(n) for n in sizes]
    assert [len(b) for b in drawn] == sizes


def test_ids_do_not_repeat() -> None:
    ids = {random_bytes(16) for _ in range(20_000)}
    assert len(ids) == 20_000


def test_a_forked_child_does_not_repeat_its_parents_bytes() -> None:
    random_bytes(16)  # the block is filled now: the child inherits a copy of it
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next draw, then out without running the parent's cleanup
        try:
            os.write(write_end, random_bytes(16))
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        child = os.read(read_end, 16)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert len(child) == 16 and child != random_bytes(16)
