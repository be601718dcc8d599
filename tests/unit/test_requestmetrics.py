"""The per-request series kept as plain counts export exactly what prometheus-client's own
metric objects would (csc/requestmetrics.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from csc.metrics import DURATION_BUCKETS
from csc.requestmetrics import RequestCollector, RequestSeries

durations = st.lists(
    st.one_of(
        st.sampled_from([float(b) for b in DURATION_BUCKETS]),  # exactly on a bound
        st.floats(min_value=0.0, max_value=1000.0, allow_nan=False),
    ),
    max_size=40,
)


def _samples(
    registry: CollectorRegistry, name: str
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        if family.name == name
        for s in family.samples
        if not s.name.endswith("_created")
    }


@given(durations, st.sampled_from(["ok", "upstream_timeout"]))
def test_histogram_matches_prometheus_client(values: list[float], outcome: str) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram(
        "csc_tunnel_request_duration_seconds",
        "Duration of HTTP tunnel requests, arrival to last response byte, by outcome.",
        ["outcome"],
        buckets=DURATION_BUCKETS,
        registry=theirs,
    )
    reference.labels("ok")  # the series exists from the start, as in the node
    series = RequestSeries(("http", "tcp"), DURATION_BUCKETS, ("ok",))
    ours.register(RequestCollector(series))
    for value in values:
        reference.labels(outcome).observe(value)
        series.observe(outcome, value)
    name = "csc_tunnel_request_duration_seconds"
    expected, got = _samples(theirs, name), _samples(ours, name)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if key[0].endswith("_sum"):  # the same additions, perhaps rounded in another order
            assert abs(got[key] - value) <= 1e-9 * max(1.0, abs(value))
        else:
            assert got[key] == value, key


def test_counters_and_forget_tenant() -> None:
    registry = CollectorRegistry()
    series = RequestSeries(("http", "tcp"), DURATION_BUCKETS, ("ok",))
    registry.register(RequestCollector(series))
    series.active["http"] += 2
    series.opened[("acme", "http")] = 3
    series.requests[("acme", "http", "ok")] = 3
    series.requests[("zeta", "tcp", "portal_offline")] = 1
    assert registry.get_sample_value("csc_streams_active", {"kind": "http"}) == 2
    assert registry.get_sample_value("csc_streams_active", {"kind": "tcp"}) == 0
    labels = {"tenant": "acme", "kind": "http"}
    assert registry.get_sample_value("csc_streams_opened_total", labels) == 3
    assert registry.get_sample_value("csc_requests_total", {**labels, "outcome": "ok"}) == 3
    series.forget_tenant("acme")
    assert registry.get_sample_value("csc_requests_total", {**labels, "outcome": "ok"}) is None
    assert registry.get_sample_value("csc_streams_opened_total", labels) is None
    zeta = {"tenant": "zeta", "kind": "tcp", "outcome": "portal_offline"}
    assert registry.get_sample_value("csc_requests_total", zeta) == 1
