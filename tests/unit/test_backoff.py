"""Reconnect policy: pure functions, driven without sleeping."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tenant_agent.backoff import Backoff, backoff_delay


def test_delays_double_then_cap() -> None:
    upper = [backoff_delay(n, 0.5, 30.0, rand=0.999999) for n in range(10)]
    assert [round(d, 2) for d in upper[:6]] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    assert all(round(d, 2) == 30.0 for d in upper[6:])


@given(
    attempt=st.integers(0, 10_000),
    initial=st.floats(0.01, 10),
    maximum=st.floats(10, 600),
    rand=st.floats(0, 1, exclude_max=True),
)
def test_jitter_keeps_delay_within_half_and_full_base(
    attempt: int, initial: float, maximum: float, rand: float
) -> None:
    base = min(maximum, initial * 2.0 ** min(attempt, 60))
    delay = backoff_delay(attempt, initial, maximum, rand)
    assert base / 2 <= delay <= base
    assert delay <= maximum


def test_stable_link_resets_the_sequence() -> None:
    backoff = Backoff(initial=1.0, maximum=60.0, reset_after=30.0)
    for _ in range(5):
        backoff.next_delay(0.0)
    assert backoff.attempt == 5
    backoff.connected_for(10.0)  # flapping: keep backing off
    assert backoff.next_delay(0.0) == 16.0
    backoff.connected_for(30.0)
    assert backoff.attempt == 0
    assert backoff.next_delay(0.0) == 0.5
