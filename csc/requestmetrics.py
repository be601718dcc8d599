"""The per-request series of a CSC node, kept as plain integers and exported at scrape time.

A relayed request touches four series (``csc_streams_active``, ``csc_streams_opened_total``,
``csc_requests_total`` and the ``csc_tunnel_request_duration_seconds`` histogram). As
prometheus-client metric objects they cost about 5 us per request (a lock per update, the
histogram's bucket search in Python); here an update is a dictionary increment or a C-level
bisection, and :class:`RequestCollector` builds the same families (names, help, labels, bucket
bounds) when the registry is scraped.

Invariants: the label sets are those the caller passes (bounded by csc/metrics.py); counts only
grow except through :meth:`RequestSeries.forget_tenant`; the histogram's exported buckets are
cumulative, end with ``+Inf`` and its ``_count`` equals that last bucket.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric


def _edge(bound: float) -> str:
    """A bucket's ``le`` as prometheus-client writes it (``0.005``, ``1.0``, ``300.0``)."""
    return repr(float(bound))


def _counter(
    name: str, help_text: str, labels: list[str], table: Mapping[tuple[str, ...], int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_text, labels=labels)
    for key, count in sorted(table.items()):
        family.add_metric(list(key), count)
    return family


class _Histogram:
    __slots__ = ("counts", "total")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size  # per bucket, not cumulative; the last one is +Inf
        self.total = 0.0


class RequestSeries:
    """What the ingresses count per request (see csc/metrics.py ``CSCMetrics``)."""

    def __init__(self, kinds: Sequence[str], bounds: Sequence[float], outcomes: Sequence[str]):
        self.active = dict.fromkeys(kinds, 0)
        self.opened: dict[tuple[str, ...], int] = {}  # (tenant, kind)
        self.requests: dict[tuple[str, ...], int] = {}  # (tenant, kind, outcome)
        self.bounds = tuple(float(b) for b in bounds)
        self.durations = {outcome: _Histogram(len(self.bounds) + 1) for outcome in outcomes}

    def observe(self, outcome: str, seconds: float) -> None:
        hist = self.durations.get(outcome)
        if hist is None:
            hist = self.durations[outcome] = _Histogram(len(self.bounds) + 1)
        hist.counts[bisect_left(self.bounds, seconds)] += 1  # bucket ``le`` holds v <= le
        hist.total += seconds

    def forget_tenant(self, tenant: str) -> None:
        for table in (self.opened, self.requests):
            for key in [k for k in table if k[0] == tenant]:
                del table[key]


class RequestCollector:
    """The families of a :class:`RequestSeries`, built at each scrape."""

    def __init__(self, series: RequestSeries) -> None:
        self._series = series

    def describe(self) -> list[Metric]:
        return list(self._families(RequestSeries((), self._series.bounds, ())))

    def collect(self) -> Iterator[Metric]:
        return self._families(self._series)

    @staticmethod
    def _families(series: RequestSeries) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "csc_streams_active", "Streams in flight on this node.", labels=["kind"]
        )
        for kind, count in list(series.active.items()):
            active.add_metric([kind], count)
        yield active
        yield _counter(
            "csc_streams_opened",
            "Streams opened to agents.",
            ["tenant", "kind"],
            series.opened,
        )
        yield _counter(
            "csc_requests",
            "Bootloader requests (HTTP tunnel requests, TCP connections) by outcome.",
            ["tenant", "kind", "outcome"],
            series.requests,
        )
        durations = HistogramMetricFamily(
            "csc_tunnel_request_duration_seconds",
            "Duration of HTTP tunnel requests, arrival to last response byte, by outcome.",
            labels=["outcome"],
        )
        edges = [_edge(b) for b in series.bounds] + ["+Inf"]
        for outcome, hist in sorted(series.durations.items()):
            cumulative, buckets = 0, []
            for edge, count in zip(edges, list(hist.counts), strict=True):
                cumulative += count
                buckets.append((edge, float(cumulative)))
            durations.add_metric([outcome], buckets, hist.total)
        yield durations
