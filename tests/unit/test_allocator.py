"""Process-wide tuning of the relay processes (shared/allocator.py)."""

from __future__ import annotations

import gc

from shared.allocator import GC_THRESHOLDS, collect_less_often


def test_collect_less_often_sets_the_thresholds_and_returns_the_old_ones() -> None:
    before = gc.get_threshold()
    try:
        assert collect_less_often() == before
        assert gc.get_threshold() == GC_THRESHOLDS
        young, middle, old = GC_THRESHOLDS
        assert young > before[0] and middle >= before[1] and old >= before[2]
    finally:
        gc.set_threshold(*before)
