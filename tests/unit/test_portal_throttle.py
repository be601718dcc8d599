"""Logon throttling: lockout after N failures in a window, growing lockouts, bounded memory."""

from __future__ import annotations

import pytest

from portal.throttle import HashGate, Throttle, retry_after_header


def _throttle(**over: float) -> Throttle:
    params = {"failures": 5, "window": 300.0, "lockout": 60.0, "max_lockout": 3600.0, **over}
    return Throttle(
        failures=int(params["failures"]),
        window=params["window"],
        lockout=params["lockout"],
        max_lockout=params["max_lockout"],
    )


def _fail(t: Throttle, key: str, times: int, start: float, step: float = 1.0) -> float:
    now = start
    for _ in range(times):
        t.failure(key, now)
        now += step
    return now - step


def test_five_failures_lock_the_key_out() -> None:
    t = _throttle()
    last = _fail(t, "alice", 4, 0.0)
    assert t.retry_after("alice", last) is None
    assert t.failure("alice", last + 1) == 60.0
    assert t.retry_after("alice", last + 1) == pytest.approx(60.0)
    assert t.retry_after("alice", last + 31) == pytest.approx(30.0)
    assert t.retry_after("alice", last + 61) is None
    assert t.retry_after("bob", last + 1) is None


def test_failures_outside_the_window_do_not_count() -> None:
    t = _throttle()
    _fail(t, "alice", 4, 0.0)
    assert t.failure("alice", 400.0) is None  # the first four are older than 300 s
    assert t.retry_after("alice", 400.0) is None


def test_lockouts_double_up_to_the_maximum() -> None:
    t = _throttle(max_lockout=200.0)
    now, lockouts = 0.0, []
    for _ in range(4):
        now = _fail(t, "k", 4, now) + 1
        lockout = t.failure("k", now)
        assert lockout is not None
        lockouts.append(lockout)
        now += lockout  # wait it out
    assert lockouts == [60.0, 120.0, 200.0, 200.0]


def test_a_quiet_period_forgets_the_strikes() -> None:
    t = _throttle()
    _fail(t, "k", 5, 0.0)
    assert _fail_and_lockout(t, "k", 1000.0) == 120.0
    assert _fail_and_lockout(t, "k", 10_000.0) == 60.0  # > max_lockout without a failure


def _fail_and_lockout(t: Throttle, key: str, start: float) -> float | None:
    _fail(t, key, 4, start)
    return t.failure(key, start + 4)


def test_success_clears_and_prune_forgets() -> None:
    t = _throttle()
    _fail(t, "alice", 4, 0.0)
    t.success("alice")
    assert t.failure("alice", 5.0) is None
    _fail(t, "bob", 5, 0.0)
    assert len(t) == 2
    assert t.prune(100.0) == 0  # bob is locked out, alice recent
    assert t.prune(5000.0) == 2
    assert len(t) == 0


def test_memory_is_bounded() -> None:
    t = Throttle(failures=5, window=300, lockout=60, max_lockout=3600, max_entries=100)
    for i in range(1000):
        t.failure(f"addr-{i}", float(i) / 1000)
    assert len(t) == 100
    assert t.retry_after("addr-999", 1.0) is None


def test_invalid_parameters_and_header() -> None:
    with pytest.raises(ValueError):
        Throttle(failures=0, window=1, lockout=1, max_lockout=1)
    with pytest.raises(ValueError):
        Throttle(failures=1, window=1, lockout=10, max_lockout=1)
    assert retry_after_header(0.2) == "1"
    assert retry_after_header(59.01) == "60"


def test_hash_gate_admits_up_to_its_limit() -> None:
    gate = HashGate(2)
    assert gate.try_enter() and gate.try_enter()
    assert not gate.try_enter() and len(gate) == 2
    gate.leave()
    assert gate.try_enter()
    with pytest.raises(ValueError):
        HashGate(0)
