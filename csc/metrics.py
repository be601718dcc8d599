"""Prometheus metrics of a CSC node (names ``csc_*``; docs/metrics.md describes every one).

:class:`CSCMetrics` holds the node's metric objects on its own ``CollectorRegistry`` (injected,
so tests and several nodes in one process never share state). The gateway and the ingresses
call one method per event (a session opened, a request done, ...). Totals that grow per chunk
(bytes relayed, flow-control stalls) are plain integers in a :class:`shared.link.LinkCounters`
per tenant that every link of that tenant adds to; they and the gauges derived from live state
(sessions per tenant) are read by a custom collector at scrape time, so the hot path never
touches a labelled metric. :func:`start_metrics_listener` serves the registry on the node's own
``metrics_listen`` listener (loopback by default; shared/metrics_http.py, without aiohttp), never
on the public listener: the series name every tenant with its traffic.

Invariants: every label value comes from a bounded set: tenant ids (created by the operator),
``kind`` (``http``/``tcp``), ``direction`` (``in``/``out``), ``outcome``/``reason`` (``ok`` or a
code of :data:`shared.errors.ERRORS`, or a fixed reason of this module) and ``limit`` (a fixed
set). An alias, a path, an address or a request id is never a label value; an unexpected code
is exported as ``internal``. Counters only grow, except that :meth:`CSCMetrics.forget_tenant`
removes a deleted tenant's series.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric

from csc import __version__
from csc.requestmetrics import RequestCollector, RequestSeries
from shared.config import parse_hostport
from shared.errors import ERRORS, AgentLost, CSCError, GoingAway
from shared.link import LinkCounters
from shared.metrics_http import MetricsServer, serve_metrics
from shared.oserrors import describe_os_error

OK = "ok"
KINDS = ("http", "tcp")
#: Outcomes of ``GET /v1/resolve/{alias}`` (their series exist from the start, at 0).
RESOLVE_OUTCOMES = (OK, "bad_alias", "unknown_alias", "portal_offline")
#: Limits a request or a session can be refused for.
LIMITS = frozenset(
    {
        "body_size",
        "header_size",
        "streams_per_session",
        "streams_per_tenant",
        "client_rate",
        "rate",
        "streams",
        "sessions",
    }
)
#: Error codes that mean a limit refused the request, and which limit (the tenant's limits of
#: csc/relay/limits.py: ``rate``, ``streams``; a session refused for ``sessions`` is counted by the
#: gateway).
LIMIT_OF_CODE = {
    "payload_too_large": "body_size",
    "headers_too_large": "header_size",
    "too_many_streams": "streams_per_session",
    "rate_limited": "rate",
    "tenant_limit": "streams",
}
#: Bounds of the tunnel request duration histogram, in seconds (the request's whole life,
#: body transfer included).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

#: How shared/tokens.py (and the gateway) word an ``auth_failed``: message prefix -> reason.
_AUTH_PREFIXES = (
    ("missing 'Authorization", "missing_token"),
    ("tokens are accepted only in the Authorization", "token_in_query"),
    ("malformed token", "malformed"),
    ("algorithm ", "algorithm"),
    ("no key for algorithm", "algorithm"),
    ("bad signature", "bad_signature"),
    ("token expired", "expired"),
    ("token not yet valid", "not_yet_valid"),
    ("wrong audience", "audience"),
    ("invalid claim 'aud'", "audience"),
    ("wrong issuer", "issuer"),
    ("missing claim", "claims"),
    ("invalid claim", "claims"),
    ("invalid tenant id", "claims"),
    ("invalid alias in claims", "claims"),
    ("claim ", "claims"),
    ("tenant ", "unknown_tenant"),
)
#: Every value the ``reason`` label of ``csc_auth_failures_total`` can take.
AUTH_REASONS = frozenset({reason for _, reason in _AUTH_PREFIXES} | {"revoked", "other"})


def auth_reason(message: str) -> str:
    """The bounded reason label of an ``auth_failed`` refusal, from its message."""
    if "revoked" in message:
        return "revoked"
    for prefix, reason in _AUTH_PREFIXES:
        if message.startswith(prefix):
            return reason
    return "other"


def known_code(code: str) -> str:
    """``code`` when it is ``ok`` or a code of shared/errors.py, else ``internal``."""
    return code if code == OK or code in ERRORS else "internal"


def outcome_of(error: CSCError | None) -> str:
    """The outcome label of a stream that ended with ``error`` (None: it succeeded)."""
    return OK if error is None else known_code(error.code)


def session_close_reason(error: CSCError | None, close_code: int | None) -> str:
    """Why an agent session ended: the link's error, except that a link that merely lost its
    WebSocket to a normal close (1000/1001: the agent stopped or drained) is ``going_away``."""
    if error is None or error.code == AgentLost.code:
        return GoingAway.code if close_code in (1000, 1001) else AgentLost.code
    return known_code(error.code)


class _Session(Protocol):
    @property
    def tenant(self) -> str: ...

    @property
    def expires_at(self) -> float: ...


class ClusterView(Protocol):
    """What the metrics read of a node's cluster membership (csc/cluster/node.py)."""

    @property
    def redis_errors(self) -> int: ...

    @property
    def redis_reconnects(self) -> int: ...

    @property
    def lookups(self) -> dict[str, int]: ...

    @property
    def live_nodes(self) -> int: ...

    @property
    def peer_links(self) -> int: ...

    @property
    def peer_streams(self) -> int: ...


M = TypeVar("M", bound=MetricWrapperBase)


def _child(cache: dict[tuple[str, ...], M], metric: M, key: tuple[str, ...]) -> M:
    """The labelled child of ``metric`` for ``key``, looked up in ``cache`` first."""
    child = cache.get(key)
    if child is None:
        child = cache[key] = metric.labels(*key)
    return child


def add_process_collectors(registry: CollectorRegistry) -> None:
    """prometheus-client's ``process_*`` and ``python_*`` collectors, on ``registry``."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


class CSCMetrics:
    """The metrics of one CSC node; see docs/metrics.md."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, process_metrics: bool = True
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self._links: dict[str, LinkCounters] = {}
        self._sessions: Callable[[], Iterable[_Session]] = tuple
        self._cluster: Callable[[], ClusterView | None] = lambda: None
        self.draining: Callable[[], bool] = lambda: False
        self.pending_end: int = 0
        #: the node's open connections and their bound (None: none), read at scrape time
        self.connections: Callable[[], tuple[int, int | None]] = lambda: (0, None)
        #: the node's window growth held and its bound (csc/relay/growth.py), at scrape time
        self.window_growth: Callable[[], tuple[int, int]] = lambda: (0, 0)
        #: bytes held for slow clients and portals, and their bound (shared/sendwatch.py)
        self.client_buffers: Callable[[], tuple[int, int | None]] = lambda: (0, None)
        self._session_metrics(reg)
        self._request_metrics(reg)
        reg.register(_LiveCollector(self))
        if process_metrics:
            add_process_collectors(reg)
        self._resolved = {o: self.resolves.labels(o) for o in RESOLVE_OUTCOMES}
        self._closed: dict[tuple[str, ...], Counter] = {}
        self._limits: dict[tuple[str, ...], Counter] = {}
        self._sessions_opened: dict[tuple[str, ...], Counter] = {}
        self._handovers: dict[tuple[str, ...], Counter] = {}

    def _session_metrics(self, reg: CollectorRegistry) -> None:
        info = Gauge(
            "csc_build_info", "Version of the running CSC (always 1).", ["version"], registry=reg
        )
        info.labels(__version__).set(1)
        self.sessions_opened = Counter(
            "csc_sessions_opened", "Agent sessions established.", ["tenant"], registry=reg
        )
        self.sessions_closed = Counter(
            "csc_sessions_closed",
            "Agent sessions ended, by the error code that ended them.",
            ["tenant", "reason"],
            registry=reg,
        )
        self.session_handovers = Counter(
            "csc_session_handovers",
            "Agent sessions that gave their place against the tenant's session limit to their "
            "agent's new session (a token renewal at the limit).",
            ["tenant"],
            registry=reg,
        )
        self.sessions_refused = Counter(
            "csc_sessions_refused",
            "Agent connections refused (token, alias grants, draining), by error code.",
            ["reason"],
            registry=reg,
        )
        self.connections_refused = Counter(
            "csc_connections_refused",
            "Connections refused as they were accepted, by listener and reason "
            "(client_connections, node_connections, proxy_header).",
            ["listener", "reason"],
            registry=reg,
        )
        self.connections_stalled = Counter(
            "csc_connections_stalled",
            "Client connections closed because the client took none of the bytes waiting for "
            "it for client_send_timeout, by listener.",
            ["listener"],
            registry=reg,
        )
        self.connections_shed = Counter(
            "csc_connections_shed",
            "Client connections closed early to bring the bytes held for slow clients and "
            "slow portals back under client_buffer_limit, by listener.",
            ["listener"],
            registry=reg,
        )
        for listener in ("http", "tcp"):  # every series from the start, at 0
            self.connections_stalled.labels(listener)
            self.connections_shed.labels(listener)
        self.auth_failures = Counter(
            "csc_auth_failures",
            "Agent tokens refused at /v1/agent/connect, by reason.",
            ["reason"],
            registry=reg,
        )

    def _request_metrics(self, reg: CollectorRegistry) -> None:
        #: streams active / opened, requests and their durations: plain counts on the hot path
        self.series = RequestSeries(KINDS, DURATION_BUCKETS, (OK,))
        reg.register(RequestCollector(self.series))
        self.resolves = Counter(
            "csc_resolve", "GET /v1/resolve/{alias} answers by outcome.", ["outcome"], registry=reg
        )
        self.limit_rejections = Counter(
            "csc_limit_rejections",
            "Requests or sessions refused by a configured limit.",
            ["tenant", "limit"],
            registry=reg,
        )

    # -- wiring ----------------------------------------------------------------------------

    def track_cluster(self, source: Callable[[], ClusterView | None]) -> None:
        """Where the node's cluster membership is found at scrape time (None: alone)."""
        self._cluster = source

    def connection_refused(self, listener: str, reason: str) -> None:
        """A connection refused as it was accepted (csc/relay/conncap.py)."""
        self.connections_refused.labels(listener, reason).inc()

    def connection_stalled(self, listener: str, shed: bool) -> None:
        """A client connection closed by its send deadline, or early for the node's bound
        (``shed``; shared/sendwatch.py)."""
        (self.connections_shed if shed else self.connections_stalled).labels(listener).inc()

    def track_sessions(self, source: Callable[[], Iterable[_Session]]) -> None:
        """Where the live agent sessions are found at scrape time."""
        self._sessions = source

    def link_counters(self, tenant: str) -> LinkCounters:
        """The totals every link of ``tenant`` adds to (bytes and stalls)."""
        counters = self._links.get(tenant)
        if counters is None:
            counters = self._links[tenant] = LinkCounters()
        return counters

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)

    # -- agent sessions ----------------------------------------------------------------------

    def session_opened(self, tenant: str) -> None:
        _child(self._sessions_opened, self.sessions_opened, (tenant,)).inc()

    def session_closed(self, tenant: str, error: CSCError | None, close_code: int | None) -> None:
        """A session ended with the link's ``error`` and the WebSocket's ``close_code``."""
        reason = session_close_reason(error, close_code)
        _child(self._closed, self.sessions_closed, (tenant, reason)).inc()

    def session_handover(self, tenant: str) -> None:
        _child(self._handovers, self.session_handovers, (tenant,)).inc()

    def session_refused(self, code: str) -> None:
        self.sessions_refused.labels(known_code(code)).inc()

    def auth_failed(self, err: CSCError) -> None:
        """A token was refused: counted by reason, and as a refused session."""
        reason = getattr(err, "reason", None)
        if reason not in AUTH_REASONS:
            reason = auth_reason(err.message)
        self.auth_failures.labels(reason).inc()
        self.session_refused(err.code)

    def auth_failures_total(self) -> int:
        """Refused tokens so far, all reasons together."""
        return int(
            sum(
                sample.value
                for family in self.auth_failures.collect()
                for sample in family.samples
                if sample.name.endswith("_total")
            )
        )

    # -- bootloader requests -----------------------------------------------------------------

    def resolved(self, outcome: str) -> None:
        outcome = known_code(outcome)
        child = self._resolved.get(outcome)
        if child is None:
            child = self._resolved[outcome] = self.resolves.labels(outcome)
        child.inc()

    def stream_started(self, tenant: str | None, kind: str) -> None:
        """A stream was opened to the tenant's agent (pair with :meth:`stream_finished`)."""
        series = self.series
        series.active[kind] += 1
        key = (tenant or "", kind)
        series.opened[key] = series.opened.get(key, 0) + 1

    def stream_finished(self, kind: str) -> None:
        self.series.active[kind] -= 1

    def request_done(self, kind: str, tenant: str | None, outcome: str, seconds: float) -> None:
        """A bootloader request ended: ``outcome`` is ``ok`` or the error code it ended with;
        ``tenant`` is None when the alias named no tenant."""
        if kind not in KINDS:
            raise ValueError(f"unknown stream kind {kind!r}")
        outcome = known_code(outcome)
        tenant = tenant or ""
        series = self.series
        key = (tenant, kind, outcome)
        series.requests[key] = series.requests.get(key, 0) + 1
        if kind == "http":
            series.observe(outcome, seconds)
        limit = LIMIT_OF_CODE.get(outcome)
        if limit is not None:
            self.limit_rejected(tenant, limit)

    def limit_rejected(self, tenant: str | None, limit: str) -> None:
        """A configured limit refused something of ``tenant`` (None: not known yet)."""
        if limit not in LIMITS:
            raise ValueError(f"unknown limit {limit!r}; expected one of {sorted(LIMITS)}")
        _child(self._limits, self.limit_rejections, (tenant or "", limit)).inc()

    # -- tenants -------------------------------------------------------------------------------

    def tenants(self) -> list[str]:
        """Tenants with series (link totals) on this node."""
        return sorted(self._links)

    def forget_tenant(self, tenant: str) -> None:
        """Remove every series labelled with ``tenant`` (call when the tenant is deleted)."""
        self._links.pop(tenant, None)
        for cache, metric in (
            (self._sessions_opened, self.sessions_opened),
            (self._handovers, self.session_handovers),
            (self._closed, self.sessions_closed),
            (self._limits, self.limit_rejections),
        ):
            for key in [k for k in cache if k[0] == tenant]:
                metric.remove(*key)
                del cache[key]
        self.series.forget_tenant(tenant)


class _LiveCollector:
    """Series read from live state at scrape time: sessions per tenant, link totals."""

    def __init__(self, metrics: CSCMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return [*self._families({}, {}, {}), *self._node_families()]

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        per_tenant = dict.fromkeys(m._links, 0)
        expiry: dict[str, float] = {}
        for session in m._sessions():
            tenant = session.tenant
            per_tenant[tenant] = per_tenant.get(tenant, 0) + 1
            expiry[tenant] = min(expiry.get(tenant, session.expires_at), session.expires_at)
        yield from self._families(per_tenant, m._links, expiry)
        yield from self._node_families()

    @staticmethod
    def _families(
        per_tenant: dict[str, int], links: dict[str, LinkCounters], expiry: dict[str, float]
    ) -> Iterator[Metric]:
        sessions = GaugeMetricFamily(
            "csc_agent_sessions", "Live agent sessions on this node.", labels=["tenant"]
        )
        for tenant, count in sorted(per_tenant.items()):
            sessions.add_metric([tenant], count)
        yield sessions
        expires = GaugeMetricFamily(
            "csc_session_token_expiry_timestamp_seconds",
            "The earliest expiry (Unix seconds) of the tokens of the tenant's live agent "
            "sessions on this node: when the first of them will be ended unless renewed.",
            labels=["tenant"],
        )
        for tenant, when in sorted(expiry.items()):
            expires.add_metric([tenant], when)
        yield expires
        yield GaugeMetricFamily(
            "csc_agents_connected",
            "Tenants with at least one live agent session on this node.",
            value=sum(1 for count in per_tenant.values() if count),
        )
        relayed = CounterMetricFamily(
            "csc_bytes",
            "Stream payload bytes relayed: in = bootloader to agent, out = agent to bootloader.",
            labels=["tenant", "direction"],
        )
        stalls = CounterMetricFamily(
            "csc_flow_control_stalls",
            "Writes toward an agent that waited for flow-control credit.",
            labels=["tenant"],
        )
        for tenant, counters in sorted(links.items()):
            relayed.add_metric([tenant, "in"], counters.data_sent)
            relayed.add_metric([tenant, "out"], counters.data_received)
            stalls.add_metric([tenant], counters.stalls)
        yield relayed
        yield stalls

    def _node_families(self) -> Iterator[Metric]:
        m = self._metrics
        yield GaugeMetricFamily(
            "csc_node_draining",
            "1 while this node drains (SIGTERM or admin drain).",
            value=1 if m.draining() else 0,
        )
        open_now, bound = m.connections()
        yield GaugeMetricFamily(
            "csc_connections",
            "Connections open on the public and TCP listeners, agent links included.",
            value=open_now,
        )
        if bound is not None:
            yield GaugeMetricFamily(
                "csc_connections_max",
                "The bound on csc_connections (max_connections); refused beyond: node_full.",
                value=bound,
            )
        held, budget = m.window_growth()
        yield GaugeMetricFamily(
            "csc_window_growth_bytes",
            "Bytes by which the stream windows of this node's agent sessions have grown beyond "
            "initial_window, all tenants together.",
            value=held,
        )
        yield GaugeMetricFamily(
            "csc_window_growth_max_bytes",
            "The bound on csc_window_growth_bytes (node_window_growth); past it windows stop "
            "growing.",
            value=budget,
        )
        waiting, limit = m.client_buffers()
        yield GaugeMetricFamily(
            "csc_client_buffered_bytes",
            "Bytes the public and TCP listeners hold that the other end does not take "
            "(answers for slow clients, request bodies and tunnelled bytes for slow portals), "
            "as of the last look.",
            value=waiting,
        )
        if limit is not None:
            yield GaugeMetricFamily(
                "csc_client_buffer_limit_bytes",
                "The bound on csc_client_buffered_bytes (client_buffer_limit); past it, "
                "connections whose bytes do not move are closed early.",
                value=limit,
            )
        yield GaugeMetricFamily(
            "csc_sessions_pending_end",
            "Live sessions that lost their right to run (revoked, expired, suspended) and are "
            "not closed yet, as of the last check.",
            value=m.pending_end,
        )
        view = m._cluster()
        lookups = CounterMetricFamily(
            "csc_route_lookups",
            "Streams routed: to a session on this node, forwarded to another node, or none found.",
            labels=["result"],
        )
        counts = view.lookups if view is not None else {}
        for result in ("local", "remote", "miss"):
            lookups.add_metric([result], counts.get(result, 0))
        yield lookups
        for family, name, help_text, attr, alone in _CLUSTER_FAMILIES:
            value = getattr(view, attr) if view is not None else alone
            yield family(name, help_text, value=value)


#: Single-value series read from the node's cluster membership: family, name, help, attribute
#: of :class:`ClusterView`, and the value of a node without a cluster.
_CLUSTER_FAMILIES: tuple[tuple[Callable[..., Metric], str, str, str, int], ...] = (
    (CounterMetricFamily, "csc_redis_errors", "Failed Redis operations.", "redis_errors", 0),
    (
        CounterMetricFamily,
        "csc_redis_reconnects",
        "Times the event subscription was set up again.",
        "redis_reconnects",
        0,
    ),
    (
        GaugeMetricFamily,
        "csc_cluster_nodes",
        "Live nodes this node sees in the directory (itself included).",
        "live_nodes",
        1,
    ),
    (
        GaugeMetricFamily,
        "csc_peer_links",
        "Links from this node to other nodes that are up.",
        "peer_links",
        0,
    ),
    (
        GaugeMetricFamily,
        "csc_peer_streams_active",
        "Streams other nodes forwarded that this node relays to its agents now.",
        "peer_streams",
        0,
    ),
)


async def start_metrics_listener(
    metrics: CSCMetrics, listen: str, ssl_ctx: ssl.SSLContext | None
) -> MetricsServer:
    """Serve ``GET /metrics`` (and nothing else) on ``listen`` (shared/metrics_http.py: no
    aiohttp); OSError naming the setting when it cannot be bound."""
    host, port = parse_hostport(listen)
    try:
        return await serve_metrics(metrics.render, CONTENT_TYPE_LATEST, host, port, ssl_ctx=ssl_ctx)
    except OSError as exc:
        reason = describe_os_error(exc, listen)
        raise OSError(exc.errno, f"metrics_listen: {reason}") from None
