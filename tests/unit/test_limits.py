"""The per-tenant limiter (csc/relay/limits.py): rate buckets, stream and session counts, no event
loop; the error table's 429s and how the metrics count refusals."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csc.metrics import CSCMetrics
from csc.relay.limits import (
    EPSILON,
    RATE,
    RETRY_AFTER_BUSY,
    SESSIONS,
    STREAMS,
    UNLIMITED,
    Admission,
    Admissions,
    TenantLimiter,
    TokenBucket,
    burst_for,
    client_cap,
    client_key,
    retry_after,
)
from csc.tenants import Limits
from shared.errors import (
    ERRORS,
    AuthFailed,
    RateLimited,
    TenantLimit,
    error_for_code,
    tcp_err_line,
)

ALIAS = "acme@example.com"


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter() -> tuple[TenantLimiter, Clock]:
    clock = Clock()
    return TenantLimiter(clock), clock


# --- the error table ----------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["tenant_limit", "rate_limited"])
def test_limit_errors_are_429_on_every_surface(code: str) -> None:
    spec = ERRORS[code]
    assert (spec.http_status, spec.close_code) == (429, 4429)
    err = error_for_code(code, "slow down")
    assert isinstance(err, TenantLimit) and err.code == code and err.retry_after == 1
    assert tcp_err_line(code, "slow down") == f"ERR 429 {code}: slow down\r\n".encode()


def test_limit_errors_name_their_limit() -> None:
    assert TenantLimit().limit == STREAMS
    assert RateLimited().limit == RATE
    assert TenantLimit(limit=SESSIONS, retry_after=3).retry_after == 3


# --- streams and rate -----------------------------------------------------------------------------


def test_unlimited_by_default_but_counted() -> None:
    lim, _ = limiter()
    for _ in range(1000):
        lim.acquire_stream("acme", UNLIMITED, ALIAS)
    assert lim.streams("acme") == 1000
    for _ in range(1000):
        lim.release_stream("acme")
    assert lim.streams("acme") == 0


def test_streams_over_the_cap_are_refused_until_one_ends() -> None:
    lim, _ = limiter()
    limits = Limits(max_streams=2)
    lim.acquire_stream("acme", limits, ALIAS)
    lim.acquire_stream("acme", limits, ALIAS)
    with pytest.raises(TenantLimit) as refused:
        lim.acquire_stream("acme", limits, ALIAS)
    err = refused.value
    assert (err.code, err.limit, err.retry_after) == ("tenant_limit", STREAMS, 1)
    assert ALIAS in err.message and "at most 2 at once" in err.message
    lim.acquire_stream("globex", limits, "globex@example.com")  # another tenant is not affected
    lim.release_stream("acme")
    lim.acquire_stream("acme", limits, ALIAS)
    assert (lim.streams("acme"), lim.streams("globex")) == (2, 1)


def test_rate_admits_a_burst_then_refuses_with_retry_after() -> None:
    lim, clock = limiter()
    limits = Limits(max_request_rate=2.0)
    for _ in range(2):  # burst: one second's worth
        lim.acquire_stream("acme", limits, ALIAS)
    with pytest.raises(RateLimited) as refused:
        lim.acquire_stream("acme", limits, ALIAS)
    assert (refused.value.code, refused.value.limit, refused.value.retry_after) == (
        "rate_limited",
        RATE,
        1,
    )
    assert "at most 2 a second" in refused.value.message
    assert lim.streams("acme") == 2  # a refused request holds nothing
    clock.now += 0.5
    lim.acquire_stream("acme", limits, ALIAS)


def test_a_slow_rate_asks_to_wait_the_whole_refill() -> None:
    lim, clock = limiter()
    limits = Limits(max_request_rate=0.2)  # one request every 5 s, burst 1
    lim.acquire_stream("acme", limits, ALIAS)
    clock.now += 1.0
    with pytest.raises(RateLimited) as refused:
        lim.acquire_stream("acme", limits, ALIAS)
    assert refused.value.retry_after == 4
    clock.now += 4.0
    lim.acquire_stream("acme", limits, ALIAS)


def test_a_request_refused_for_streams_takes_no_token() -> None:
    lim, _ = limiter()
    limits = Limits(max_streams=1, max_request_rate=2.0)
    lim.acquire_stream("acme", limits, ALIAS)
    for _ in range(5):
        with pytest.raises(TenantLimit) as refused:
            lim.acquire_stream("acme", limits, ALIAS)
        assert refused.value.limit == STREAMS
    lim.release_stream("acme")
    lim.acquire_stream("acme", limits, ALIAS)  # the second token of the burst is still there


def test_a_changed_rate_applies_to_the_next_request() -> None:
    lim, clock = limiter()
    slow = Limits(max_request_rate=1.0)
    lim.acquire_stream("acme", slow, ALIAS)
    with pytest.raises(RateLimited):
        lim.acquire_stream("acme", slow, ALIAS)
    lim.acquire_stream("acme", UNLIMITED, ALIAS)  # the operator removed the limit
    lim.acquire_stream("acme", UNLIMITED, ALIAS)
    fast = Limits(max_request_rate=10.0)
    for _ in range(10):  # a new bucket starts full
        lim.acquire_stream("acme", fast, ALIAS)
    with pytest.raises(RateLimited):
        lim.acquire_stream("acme", fast, ALIAS)
    clock.now += 0.1
    lim.acquire_stream("acme", Limits(max_request_rate=0.5), ALIAS)  # refilled, then retuned
    with pytest.raises(RateLimited) as refused:
        lim.acquire_stream("acme", Limits(max_request_rate=0.5), ALIAS)
    assert refused.value.retry_after == 2


def test_release_without_acquire_never_goes_negative() -> None:
    lim, _ = limiter()
    lim.release_stream("acme")
    lim.release_session("acme")
    assert (lim.streams("acme"), lim.sessions("acme")) == (0, 0)


# --- sessions -------------------------------------------------------------------------------------


def test_sessions_over_the_cap_are_refused() -> None:
    lim, _ = limiter()
    limits = Limits(max_sessions=1)
    lim.acquire_session("acme", limits)
    with pytest.raises(TenantLimit) as refused:
        lim.acquire_session("acme", limits)
    assert (refused.value.limit, refused.value.retry_after) == (SESSIONS, 1)
    assert "at most 1" in refused.value.message
    lim.acquire_session("globex", limits)
    lim.release_session("acme")
    lim.acquire_session("acme", limits)
    assert (lim.sessions("acme"), lim.sessions("globex")) == (1, 1)


def test_lowering_a_cap_ends_nothing_but_refuses_new_ones() -> None:
    lim, _ = limiter()
    for _ in range(3):
        lim.acquire_session("acme", UNLIMITED)
    with pytest.raises(TenantLimit):
        lim.acquire_session("acme", Limits(max_sessions=2))
    assert lim.sessions("acme") == 3
    lim.release_session("acme")
    lim.release_session("acme")
    lim.acquire_session("acme", Limits(max_sessions=2))


# --- properties -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("wait", "after"), [(0.0, 1), (0.01, 1), (1.0, 1), (1.01, 2), (4.0, 4)])
def test_retry_after_is_whole_seconds_at_least_one(wait: float, after: int) -> None:
    assert retry_after(wait) == after


TENANTS = ("acme", "globex")
caps = st.one_of(st.none(), st.integers(min_value=1, max_value=4))
operations = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.sampled_from(TENANTS), caps),
        st.tuples(st.just("release"), st.sampled_from(TENANTS), st.none()),
        st.tuples(st.just("advance"), st.floats(min_value=0, max_value=3), st.none()),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(operations, st.sampled_from(["streams", "sessions"]))
def test_counts_never_go_negative_nor_beyond_the_cap(
    ops: list[tuple[str, object, int | None]], what: str
) -> None:
    lim, clock = limiter()
    model = dict.fromkeys(TENANTS, 0)
    for op, arg, cap in ops:
        if op == "advance":
            assert isinstance(arg, float)
            clock.now += arg
            continue
        assert isinstance(arg, str)
        count = lim.streams if what == "streams" else lim.sessions
        if op == "release":
            (lim.release_stream if what == "streams" else lim.release_session)(arg)
            model[arg] = max(0, model[arg] - 1)
        else:
            limits = Limits(max_streams=cap) if what == "streams" else Limits(max_sessions=cap)
            try:
                if what == "streams":
                    lim.acquire_stream(arg, limits, ALIAS)
                else:
                    lim.acquire_session(arg, limits)
            except TenantLimit as err:
                assert cap is not None and model[arg] >= cap and err.limit == what
            else:
                assert cap is None or model[arg] < cap
                model[arg] += 1
        for tenant in TENANTS:
            assert count(tenant) == model[tenant] >= 0


@settings(max_examples=200, deadline=None)
@given(
    st.floats(min_value=0.1, max_value=50),
    st.lists(st.floats(min_value=0, max_value=0.5), min_size=1, max_size=120),
)
def test_the_bucket_admits_at_most_rate_times_t_plus_burst(rate: float, gaps: list[float]) -> None:
    bucket = TokenBucket.full(rate, 0.0)
    now = 0.0
    admitted: list[float] = []
    for gap in gaps:
        now += gap
        wait = bucket.take(now)
        if wait == 0.0:
            admitted.append(now)
        else:
            assert wait > 0
            later = TokenBucket(bucket.rate, bucket.burst, bucket.tokens, bucket.stamp)
            assert later.take(now + retry_after(wait)) == 0.0  # Retry-After is enough
    for i, j in itertools.combinations(range(len(admitted)), 2):
        assert j - i + 1 <= rate * (admitted[j] - admitted[i]) + burst_for(rate) + 1e-6


@settings(max_examples=100, deadline=None)
@given(st.floats(min_value=0.1, max_value=50), st.floats(min_value=0, max_value=10))
def test_an_idle_bucket_refills_to_its_burst_only(rate: float, idle: float) -> None:
    bucket = TokenBucket.full(rate, 0.0)
    taken = 0
    while bucket.take(0.0) == 0.0:
        taken += 1
    assert taken == int(burst_for(rate) + EPSILON)
    refilled = 0
    while bucket.take(idle) == 0.0:
        refilled += 1
    assert refilled <= min(burst_for(rate), rate * idle + 1) + EPSILON


# --- what the metrics make of the refusals --------------------------------------------------------


def test_refusals_count_under_their_limit() -> None:
    metrics = CSCMetrics(process_metrics=False)
    metrics.request_done("http", "acme", "rate_limited", 0.001)
    metrics.request_done("tcp", "acme", "rate_limited", 0.001)
    metrics.request_done("http", "acme", "tenant_limit", 0.001)
    metrics.limit_rejected("acme", SESSIONS)

    def rejected(limit: str) -> float | None:
        return metrics.registry.get_sample_value(
            "csc_limit_rejections_total", {"tenant": "acme", "limit": limit}
        )

    assert (rejected(RATE), rejected(STREAMS), rejected(SESSIONS)) == (2, 1, 1)


@pytest.mark.parametrize(
    ("err", "reason"),
    [
        (AuthFailed("token revoked", reason="revoked"), "revoked"),
        (AuthFailed("tenant 'gone' does not exist", reason="unknown_tenant"), "unknown_tenant"),
        (AuthFailed("worded in a new way", reason="expired"), "expired"),
        (AuthFailed("token expired"), "expired"),  # no reason: from the wording
        (AuthFailed("token expired", reason="not-a-label"), "expired"),
    ],
)
def test_auth_failures_count_their_stable_reason(err: AuthFailed, reason: str) -> None:
    metrics = CSCMetrics(process_metrics=False)
    metrics.auth_failed(err)
    assert metrics.registry.get_sample_value("csc_auth_failures_total", {"reason": reason}) == 1


# --- a client address's share of a tenant's streams -----------------------------------------


@pytest.mark.parametrize(
    ("client", "key"),
    [
        ("192.0.2.7:5555", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6:443", "2001:db8:1:2::/64"),
        ("[2001:db8:1:2::9]:443", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7:80", "192.0.2.7"),
        ("::1:1234", "::/64"),
        ("?", "?"),
        ("", ""),
        ("not-an-ip:1", "not-an-ip:1"),
    ],
)
def test_client_key(client: str, key: str) -> None:
    assert client_key(client) == key


@pytest.mark.parametrize(
    ("max_streams", "share", "cap"),
    [(None, 0.5, None), (10, 1.0, None), (10, 0.5, 5), (3, 0.5, 1), (1, 0.5, 1), (7, 0.3, 2)],
)
def test_client_cap(max_streams: int | None, share: float, cap: int | None) -> None:
    assert client_cap(max_streams, share) == cap


def test_one_address_is_capped_and_another_is_not() -> None:
    lim = TenantLimiter()
    lim.acquire_client("acme", "192.0.2.7", 2, "a@x")
    lim.acquire_client("acme", "192.0.2.7", 2, "a@x")
    with pytest.raises(TenantLimit) as caught:
        lim.acquire_client("acme", "192.0.2.7", 2, "a@x")
    assert caught.value.retry_after == RETRY_AFTER_BUSY
    lim.acquire_client("acme", "192.0.2.8", 2, "a@x")
    lim.acquire_client("beta", "192.0.2.7", 2, "b@x")
    lim.release_client("acme", "192.0.2.7")
    lim.acquire_client("acme", "192.0.2.7", 2, "a@x")
    for _ in range(5):  # more releases than acquires are ignored
        lim.release_client("acme", "192.0.2.7")
    assert lim.client_streams("acme", "192.0.2.7") == 0


def test_an_admission_follows_its_request_to_the_reopened_stream() -> None:
    admissions = Admissions()
    info: dict[str, object] = {"client": "192.0.2.7:1"}
    first, second = object(), object()
    held = Admission(info, "acme", "192.0.2.7")
    assert admissions.of_request(info) is None
    admissions.bind(held, first)
    assert admissions.of_request(info) is held
    assert admissions.of_request(dict(info)) is None  # another request
    admissions.bind(held, second)
    assert admissions.pop(first) is None
    assert admissions.pop(second) is held
    assert admissions.of_request(info) is None
    assert not admissions.by_request and not admissions.by_stream
