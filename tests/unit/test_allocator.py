"""shared/allocator.py: when free heap memory is given back, and that giving it back works."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
from pathlib import Path

import pytest

from shared import allocator
from shared.allocator import CollectPolicy, TrimPolicy

MiB = 1024 * 1024


def test_policy_trims_once_memory_that_was_in_use_is_free() -> None:
    policy = TrimPolicy(slack=8 * MiB)
    assert policy.due(2 * MiB)  # the first sample trims what start-up left free, once
    policy.trimmed(2 * MiB)
    assert not policy.due(1 * MiB)
    assert not policy.due(9 * MiB)  # 8 MiB above the low: not more than the slack
    assert policy.due(10 * MiB)
    policy.trimmed(10 * MiB)  # trimmed pages still count as free: start from here
    assert not policy.due(10 * MiB)
    assert not policy.due(12 * MiB)
    assert not policy.due(3 * MiB)  # reused...
    assert policy.due(12 * MiB)  # ...and freed again


def test_policy_without_a_burst_trims_only_at_the_first_sample() -> None:
    policy = TrimPolicy(slack=8 * MiB)
    assert policy.due(40 * MiB)
    policy.trimmed(40 * MiB)
    assert not any(policy.due(free) for free in [40 * MiB] * 50)


def test_a_full_collection_once_a_busy_process_goes_quiet() -> None:
    policy = CollectPolicy(quiet=2)
    assert not policy.due(100)  # the first sample only sets the mark
    assert not policy.due(101)  # quiet, and never busy: nothing to collect
    assert not policy.due(150)  # busy
    assert not policy.due(190)  # still busy
    assert policy.due(191)  # quiet again: once
    assert not policy.due(192)
    assert not policy.due(193)
    assert not policy.due(300)
    assert policy.due(300)


async def test_the_loop_collects_the_cycles_a_burst_left(monkeypatch: pytest.MonkeyPatch) -> None:
    """Garbage in reference cycles that no allocation after the burst would have collected
    is gone after the loop's quiet sample."""

    class Cycle:
        def __init__(self) -> None:
            self.me = self
            self.buffer = bytearray(1024 * 1024)

    samples = iter([0, 10, 10])  # busy, then quiet
    monkeypatch.setattr(allocator, "young_collections", lambda: next(samples, 10))
    gc.disable()  # no automatic collection may happen to free them first
    try:
        for _ in range(8):
            Cycle()
        assert sum(isinstance(o, Cycle) for o in gc.get_objects()) >= 8
        task = asyncio.create_task(allocator.return_free_memory(interval=0.01))
        try:
            for _ in range(500):
                await asyncio.sleep(0.01)
                if not any(isinstance(o, Cycle) for o in gc.get_objects()):
                    break
        finally:
            task.cancel()
        assert not any(isinstance(o, Cycle) for o in gc.get_objects())
    finally:
        gc.enable()


_PROBE = """
import subprocess
import sys
from pathlib import Path

from shared.allocator import free_heap_bytes, keep_freed_memory, trim_heap
def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096
assert keep_freed_memory()
buffers = [bytearray(64 * 1024) for _ in range(800)]
held = rss()
del buffers
free, freed = free_heap_bytes(), rss()
trimmed = trim_heap()
print(held, free, freed, trimmed, rss())
"""


def test_trim_gives_freed_heap_pages_back() -> None:
    """In a process tuned like the CSC (fixed thresholds: freed buffers stay resident), a
    trim gives them back."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    held, free, freed, trimmed, after = result.stdout.split()
    assert int(free) >= 40 * MiB, result.stdout
    assert int(freed) > int(held) - 5 * MiB, "the freed buffers should still be resident"
    assert trimmed == "True"
    assert int(after) < int(freed) - 40 * MiB, result.stdout
