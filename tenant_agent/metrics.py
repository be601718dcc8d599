"""Prometheus metrics of the tenant agent (names ``csc_agent_*``; docs/metrics.md lists them).

:class:`AgentMetrics` keeps the agent's counts as plain integers: the agent calls one method per
event (a slot changes state, a slot reconnects, a stream starts or ends), and every session's
link adds its bytes and flow-control stalls to the one :class:`shared.link.LinkCounters` of
:attr:`AgentMetrics.links`. Only when they are exported (``metrics_listen``, off by default, or
a test reading :attr:`AgentMetrics.registry`) is prometheus-client imported and a collector
registered that turns them into metric families at scrape time; :class:`MetricsServer` answers
``GET /metrics`` (shared/metrics_http.py, without aiohttp). An agent without metrics pays for
neither.

Invariants: counters only grow; every label value comes from a bounded set: ``slot``
(0..sessions-1), ``state`` (:data:`SLOT_STATES`), ``kind`` (``http``/``tcp``), ``code``
(:data:`UPSTREAM_CODES`), ``direction`` (``in``/``out``) and ``reason`` (a code of
:data:`shared.errors.ERRORS` or one of :data:`CONNECT_REASONS`). An alias, a path, an address
or a request id is never a label value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from shared.errors import ERRORS, AgentLost, CSCError
from shared.link import LinkCounters
from tenant_agent import __version__
from tenant_agent.websocket import HandshakeError, HandshakeRefused

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from shared.metrics_http import MetricsServer as MetricsHTTP

KINDS = ("http", "tcp")
#: What a session slot is doing: dialling the CSC, serving a live session, or waiting to retry.
SLOT_STATES = ("connecting", "up", "backoff")
#: Stream errors counted as upstream errors (the portal or the TCP upstream failed).
UPSTREAM_CODES = frozenset(
    {"upstream_refused", "upstream_reset", "upstream_error", "upstream_timeout"}
)
#: Reconnect reasons that are not error codes: why a connection attempt failed, ``goaway``
#: (the CSC drained the session and the slot connected its successor), ``duplicate_node``
#: (the session shared a CSC node with another of the agent's: tenant_agent/spread.py) or
#: ``token_renewed`` (the session was replaced by one with the new token: tenant_agent/token.py).
CONNECT_REASONS = (
    "connect_failed",
    "connect_timeout",
    "handshake_failed",
    "refused",
    "goaway",
    "duplicate_node",
    "token_renewed",
)


def reconnect_reason(exc: BaseException) -> str:
    """The reason label of a failed connection attempt."""
    if isinstance(exc, CSCError):
        return exc.code if exc.code in ERRORS else "internal"
    if isinstance(exc, HandshakeRefused):
        return "refused"
    if isinstance(exc, HandshakeError):
        return "handshake_failed"
    if isinstance(exc, TimeoutError):  # before OSError: it is one
        return "connect_timeout"
    return "connect_failed"


def session_end_reason(link_error: CSCError | None, close_reason: str | None) -> str:
    """The reason label of a session that ended: the link's own error when it has a precise
    one, else the code the CSC put in its close reason (``code: message``), else agent_lost."""
    if link_error is not None and link_error.code != AgentLost.code:
        return link_error.code if link_error.code in ERRORS else "internal"
    code = (close_reason or "").partition(":")[0]
    return code if code in ERRORS else AgentLost.code


class AgentMetrics:
    """The counts of one agent process; see docs/metrics.md."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, process_metrics: bool = True
    ) -> None:
        #: The totals every session's link adds to.
        self.links = LinkCounters()
        self.reconnects: dict[str, int] = {}
        self.slots: dict[int, str] = {}
        self.active = dict.fromkeys(KINDS, 0)
        self.opened = dict.fromkeys(KINDS, 0)
        self.upstream_errors: dict[tuple[str, str], int] = {}
        self._draining: Callable[[], int] = lambda: 0
        self._spread: Callable[[], tuple[int, int]] = lambda: (1, 0)
        self._token_expiry: Callable[[], float | None] = lambda: None
        self._registry = registry
        self._process_metrics = process_metrics
        self._exported = False

    @property
    def registry(self) -> CollectorRegistry:
        """The registry these metrics are exported on (made and filled on first use)."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            self._registry = CollectorRegistry()
        if not self._exported:
            self._exported = True
            self._registry.register(_Collector(self))
            if self._process_metrics:
                from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

                ProcessCollector(registry=self._registry)
                PlatformCollector(registry=self._registry)
                GCCollector(registry=self._registry)
        return self._registry

    def track_draining(self, source: Callable[[], int]) -> None:
        """How to count, at scrape time, the sessions draining after a GOAWAY."""
        self._draining = source

    @property
    def draining(self) -> int:
        return self._draining()

    def track_spread(self, source: Callable[[], tuple[int, int]]) -> None:
        """How to read, at scrape time, the CSC cluster's size as the agent knows it and the
        distinct CSC nodes its live sessions are on."""
        self._spread = source

    @property
    def spread(self) -> tuple[int, int]:
        return self._spread()

    def track_token_expiry(self, source: Callable[[], float | None]) -> None:
        """How to read, at scrape time, the expiry of the token in use (None: unknown)."""
        self._token_expiry = source

    @property
    def token_expiry(self) -> float | None:
        return self._token_expiry()

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    # -- sessions ------------------------------------------------------------------------------

    def slot_state(self, slot: int, state: str) -> None:
        if state not in SLOT_STATES:
            raise ValueError(f"unknown slot state {state!r}")
        self.slots[slot] = state

    def slot_ended(self, slot: int) -> None:
        """The slot is gone (``sessions = auto`` met the tenant's session limit, or the
        cluster shrank): unreported."""
        self.slots.pop(slot, None)

    def reconnect(self, reason: str) -> None:
        if reason not in ERRORS and reason not in CONNECT_REASONS:
            reason = "internal"
        self.reconnects[reason] = self.reconnects.get(reason, 0) + 1

    # -- streams -------------------------------------------------------------------------------

    def stream_started(self, kind: str) -> None:
        """A stream of ``kind`` (``http``/``tcp``) is being served."""
        self.opened[kind] += 1
        self.active[kind] += 1

    def stream_finished(self, kind: str, error: CSCError | None) -> None:
        """The stream ended, with ``error`` if it failed."""
        self.active[kind] -= 1
        if error is not None and error.code in UPSTREAM_CODES:
            key = (kind, error.code)
            self.upstream_errors[key] = self.upstream_errors.get(key, 0) + 1


class _Collector:
    """Turns the counts of an :class:`AgentMetrics` into metric families at scrape time."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return list(self._families(AgentMetrics()))

    def collect(self) -> Iterator[Metric]:
        return self._families(self._metrics)

    @staticmethod
    def _families(m: AgentMetrics) -> Iterator[Metric]:
        yield from _session_families(m)
        yield from _stream_families(m)


def _session_families(m: AgentMetrics) -> list[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    info = GaugeMetricFamily(
        "csc_agent_build_info", "Version of the running agent (always 1).", labels=["version"]
    )
    info.add_metric([__version__], 1)
    reconnects = CounterMetricFamily(
        "csc_agent_reconnects",
        "Times a session slot connected again, by why the previous attempt or session ended.",
        labels=["reason"],
    )
    for reason, count in sorted(m.reconnects.items()):
        reconnects.add_metric([reason], count)
    states = GaugeMetricFamily(
        "csc_agent_session_state",
        "1 for the state each session slot is in, 0 for the others.",
        labels=["slot", "state"],
    )
    for slot, current in sorted(m.slots.items()):
        for state in SLOT_STATES:
            states.add_metric([str(slot), state], 1 if state == current else 0)
    draining = GaugeMetricFamily(
        "csc_agent_sessions_draining",
        "Sessions the CSC asked to drain that still finish their streams.",
        value=m.draining,
    )
    cluster, held = m.spread
    nodes = GaugeMetricFamily(
        "csc_agent_cluster_nodes",
        "Live CSC nodes that take agents, as the CSC told this agent (1: a lone node).",
        value=cluster,
    )
    spread = GaugeMetricFamily(
        "csc_agent_session_nodes", "Distinct CSC nodes the live sessions are on.", value=held
    )
    families: list[Metric] = [info, reconnects, states, draining, nodes, spread]
    expiry = m.token_expiry
    if expiry is not None:
        families.append(
            GaugeMetricFamily(
                "csc_agent_token_expiry_timestamp_seconds",
                "When the agent token in use expires (its exp claim), in Unix seconds.",
                value=expiry,
            )
        )
    return families


def _stream_families(m: AgentMetrics) -> list[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    active = GaugeMetricFamily("csc_agent_streams_active", "Streams being served.", labels=["kind"])
    opened = CounterMetricFamily(
        "csc_agent_streams_opened", "Streams the CSC opened.", labels=["kind"]
    )
    for kind in KINDS:
        active.add_metric([kind], m.active[kind])
        opened.add_metric([kind], m.opened[kind])
    errors = CounterMetricFamily(
        "csc_agent_upstream_errors",
        "Streams that failed because the upstream refused, reset, timed out or misbehaved.",
        labels=["kind", "code"],
    )
    for (kind, code), count in sorted(m.upstream_errors.items()):
        errors.add_metric([kind, code], count)
    relayed = CounterMetricFamily(
        "csc_agent_bytes",
        "Stream payload bytes relayed: in = CSC to upstream, out = upstream to CSC.",
        labels=["direction"],
    )
    relayed.add_metric(["in"], m.links.data_received)
    relayed.add_metric(["out"], m.links.data_sent)
    stalls = CounterMetricFamily(
        "csc_agent_flow_control_stalls",
        "Writes toward the CSC that waited for flow-control credit.",
        value=m.links.stalls,
    )
    return [active, opened, errors, relayed, stalls]


class MetricsServer:
    """``GET /metrics`` on its own listener (shared/metrics_http.py)."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics
        self.address = ""
        self._server: MetricsHTTP | None = None

    async def start(self, host: str, port: int) -> str:
        """Listen on ``host:port`` (port 0: any); return the bound ``host:port``.

        Raises OSError when the address cannot be bound."""
        from prometheus_client import CONTENT_TYPE_LATEST

        from shared.metrics_http import serve_metrics

        self._server = await serve_metrics(self.metrics.render, CONTENT_TYPE_LATEST, host, port)
        self.address = self._server.address
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            await self._server.stop()
            self._server = None
