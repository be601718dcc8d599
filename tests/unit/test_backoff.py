"""Reconnect policy: pure functions, driven without sleeping."""

from __future__ import annotations

import email.utils

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tenant_agent.backoff import Backoff, backoff_delay, parse_retry_after, retry_after_delay


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


NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("30", 30.0),
        (" 0 ", 0.0),
        ("9" * 40, float("inf")),
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        ("\u0661", None),
        (email.utils.formatdate(NOW + 90, usegmt=True), 90.0),
        (email.utils.formatdate(NOW - 90, usegmt=True), 0.0),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_retry_after_delay_is_at_least_the_wait_asked_and_bounded() -> None:
    assert retry_after_delay(0.7, None, 300, 0.5) == 0.7
    assert retry_after_delay(0.7, 10, 300, 0.0) == 10
    assert retry_after_delay(0.7, 10, 300, 0.999) == pytest.approx(10.999)
    assert retry_after_delay(0.7, float("inf"), 300, 0.0) == 300
    assert retry_after_delay(0.7, 1e9, 300, 0.999) <= 330
    assert retry_after_delay(20.0, 1, 300, 0.5) == 20.0  # the backoff is already longer
