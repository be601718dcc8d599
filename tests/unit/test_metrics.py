"""The metrics classes without a network: label sets, reasons, forgetting a tenant, link totals,
and docs/metrics.md against what the registries really hold."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry

from csc.metrics import (
    AUTH_REASONS,
    CSCMetrics,
    auth_reason,
    known_code,
    outcome_of,
    session_close_reason,
)
from shared.config import ConfigError
from shared.errors import (
    AgentLost,
    AuthFailed,
    GoingAway,
    HeartbeatTimeout,
    UpstreamRefused,
    UpstreamTimeout,
)
from shared.link import Link, LinkCounters
from shared.protocol import LinkSettings
from shared.tokens import issue_token, verify_token
from tenant_agent.cli import _overrides, build_parser
from tenant_agent.config import load_agent_config
from tenant_agent.metrics import (
    CONNECT_REASONS,
    AgentMetrics,
    reconnect_reason,
    session_end_reason,
)
from tenant_agent.websocket import HandshakeError
from tests.support.linkpair import handshaken

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample called ``name``: sorted label pairs -> value."""
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == name
    }


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


# --- auth failure reasons ------------------------------------------------------------------


def _token(key: Ed25519PrivateKey, **over: object) -> str:
    values: dict[str, object] = {
        "tenant": "acme",
        "aliases": ["acme@example.com"],
        "ttl_seconds": 3600,
        "audience": "csc-agent",
        "issuer": "csc",
        **over,
    }
    return issue_token(key, **values)  # type: ignore[arg-type]


def _refusal(token: str, key: Ed25519PrivateKey) -> str:
    with pytest.raises(AuthFailed) as refused:
        verify_token(token, [key.public_key()], audience="csc-agent", issuer="csc")
    return refused.value.message


def test_auth_reasons_of_real_token_failures() -> None:
    key = Ed25519PrivateKey.generate()
    other = Ed25519PrivateKey.generate()
    cases = {
        "malformed": "not-a-token",
        "bad_signature": _token(other),
        "expired": _token(key, ttl_seconds=60, now=time.time() - 3600),
        "not_yet_valid": _token(key, now=time.time() + 3600),
        "audience": _token(key, audience="someone-else"),
        "issuer": _token(key, issuer="someone-else"),
        "algorithm": "eyJhbGciOiJub25lIn0.eyJ0ZW5hbnQiOiJhY21lIn0.",
    }
    for reason, token in cases.items():
        assert auth_reason(_refusal(token, key)) == reason, token


def test_auth_reasons_of_the_gateway_and_unknown_messages() -> None:
    assert auth_reason("missing 'Authorization: Bearer <token>' header") == "missing_token"
    assert auth_reason("tokens are accepted only in the Authorization header") == "token_in_query"
    assert auth_reason("missing claim 'jti'") == "claims"
    assert auth_reason("token revoked") == "revoked"
    assert auth_reason("tenant 'acme' does not exist") == "unknown_tenant"
    assert auth_reason("something nobody foresaw about acme@example.com") == "other"
    assert {"missing_token", "expired", "other", "revoked"} <= AUTH_REASONS


def test_codes_outside_the_error_table_become_internal() -> None:
    assert known_code("ok") == "ok"
    assert known_code("portal_offline") == "portal_offline"
    assert known_code("acme@example.com") == "internal"
    assert outcome_of(None) == "ok"
    assert outcome_of(UpstreamRefused()) == "upstream_refused"


def test_session_close_reasons() -> None:
    assert session_close_reason(AgentLost(), 1001) == "going_away"
    assert session_close_reason(None, 1000) == "going_away"
    assert session_close_reason(AgentLost(), 1006) == "agent_lost"
    assert session_close_reason(HeartbeatTimeout(), 1006) == "heartbeat_timeout"
    assert session_close_reason(GoingAway(), None) == "going_away"


# --- CSCMetrics --------------------------------------------------------------------------


def test_each_instance_has_its_own_registry() -> None:
    one, two = CSCMetrics(process_metrics=False), CSCMetrics(process_metrics=False)
    one.resolved("ok")
    assert value(one.registry, "csc_resolve_total", outcome="ok") == 1
    assert value(two.registry, "csc_resolve_total", outcome="ok") == 0


def test_request_done_counts_outcome_duration_and_limits() -> None:
    m = CSCMetrics(process_metrics=False)
    reg = m.registry
    m.request_done("http", "acme", "ok", 0.02)
    m.request_done("http", "acme", "ok", 0.2)
    m.request_done("http", None, "payload_too_large", 0.001)
    m.request_done("tcp", "acme", "too_many_streams", 0.001)
    m.request_done("tcp", "acme", "no-such-code", 0.001)
    assert value(reg, "csc_requests_total", tenant="acme", kind="http", outcome="ok") == 2
    count = "csc_tunnel_request_duration_seconds_count"
    assert value(reg, count, outcome="ok") == 2
    assert value(reg, "csc_tunnel_request_duration_seconds_sum", outcome="ok") == pytest.approx(
        0.22
    )
    bucket = "csc_tunnel_request_duration_seconds_bucket"
    assert value(reg, bucket, outcome="ok", le="0.025") == 1
    assert value(reg, bucket, outcome="ok", le="0.25") == 2
    assert value(reg, count, outcome="too_many_streams") is None  # tcp has no histogram
    assert value(reg, "csc_limit_rejections_total", tenant="", limit="body_size") == 1
    limit = "streams_per_session"
    assert value(reg, "csc_limit_rejections_total", tenant="acme", limit=limit) == 1
    assert value(reg, "csc_requests_total", tenant="acme", kind="tcp", outcome="internal") == 1


def test_bad_kind_or_limit_is_a_programming_error() -> None:
    m = CSCMetrics(process_metrics=False)
    with pytest.raises(ValueError, match="kind"):
        m.request_done("udp", "acme", "ok", 0.1)
    with pytest.raises(ValueError, match="limit"):
        m.limit_rejected("acme", "acme@example.com")


def test_streams_active_goes_up_and_down() -> None:
    m = CSCMetrics(process_metrics=False)
    m.stream_started("acme", "http")
    m.stream_started("acme", "tcp")
    m.stream_started("beta", "http")
    assert value(m.registry, "csc_streams_active", kind="http") == 2
    m.stream_finished("http")
    assert value(m.registry, "csc_streams_active", kind="http") == 1
    assert value(m.registry, "csc_streams_opened_total", tenant="acme", kind="http") == 1


@dataclass
class _Session:
    tenant: str
    expires_at: float = 1_800_000_000.0


def test_live_series_come_from_sessions_and_link_counters() -> None:
    m = CSCMetrics(process_metrics=False)
    live = [_Session("acme"), _Session("acme"), _Session("beta")]
    m.track_sessions(lambda: live)
    acme = m.link_counters("acme")
    assert m.link_counters("acme") is acme
    acme.data_sent, acme.data_received, acme.stalls = 10, 2000, 3
    m.link_counters("gone")
    reg = m.registry
    assert samples(reg, "csc_agent_sessions") == {
        (("tenant", "acme"),): 2,
        (("tenant", "beta"),): 1,
        (("tenant", "gone"),): 0,
    }
    assert value(reg, "csc_agents_connected") == 2
    assert value(reg, "csc_bytes_total", tenant="acme", direction="in") == 10
    assert value(reg, "csc_bytes_total", tenant="acme", direction="out") == 2000
    assert value(reg, "csc_flow_control_stalls_total", tenant="acme") == 3


def test_forget_tenant_removes_every_series_of_that_tenant() -> None:
    m = CSCMetrics(process_metrics=False)
    for tenant in ("acme", "beta"):
        m.link_counters(tenant).data_sent = 5
        m.session_opened(tenant)
        m.session_closed(tenant, AgentLost(), 1006)
        m.stream_started(tenant, "http")
        m.request_done("http", tenant, "ok", 0.1)
        m.limit_rejected(tenant, "streams_per_tenant")
    m.forget_tenant("acme")
    tenants = {
        s.labels["tenant"]
        for family in m.registry.collect()
        for s in family.samples
        if "tenant" in s.labels
    }
    assert tenants == {"beta"}
    assert m.tenants() == ["beta"]
    m.session_opened("acme")  # a tenant created again under the same id starts from zero
    assert value(m.registry, "csc_sessions_opened_total", tenant="acme") == 1


def test_auth_failed_counts_reason_and_refusal() -> None:
    m = CSCMetrics(process_metrics=False)
    m.auth_failed(AuthFailed("token expired"))
    m.auth_failed(AuthFailed("bad signature"))
    m.auth_failed(AuthFailed("bad signature"))
    assert value(m.registry, "csc_auth_failures_total", reason="bad_signature") == 2
    assert value(m.registry, "csc_sessions_refused_total", reason="auth_failed") == 3
    assert m.auth_failures_total() == 3


# --- AgentMetrics --------------------------------------------------------------------------


def test_slot_state_is_one_hot() -> None:
    m = AgentMetrics(process_metrics=False)
    m.slot_state(0, "connecting")
    m.slot_state(1, "up")
    m.slot_state(0, "backoff")
    assert samples(m.registry, "csc_agent_session_state") == {
        (("slot", "0"), ("state", "backoff")): 1,
        (("slot", "0"), ("state", "connecting")): 0,
        (("slot", "0"), ("state", "up")): 0,
        (("slot", "1"), ("state", "backoff")): 0,
        (("slot", "1"), ("state", "connecting")): 0,
        (("slot", "1"), ("state", "up")): 1,
    }
    with pytest.raises(ValueError):
        m.slot_state(0, "sleeping")


def test_agent_streams_and_upstream_errors() -> None:
    m = AgentMetrics(process_metrics=False)
    for kind, error in (
        ("http", None),
        ("http", UpstreamRefused()),
        ("tcp", UpstreamTimeout()),
        ("http", GoingAway()),  # not the upstream's fault
    ):
        m.stream_started(kind)
        m.stream_finished(kind, error)
    reg = m.registry
    assert value(reg, "csc_agent_streams_opened_total", kind="http") == 3
    assert value(reg, "csc_agent_streams_active", kind="http") == 0
    assert samples(reg, "csc_agent_upstream_errors_total") == {
        (("code", "upstream_refused"), ("kind", "http")): 1,
        (("code", "upstream_timeout"), ("kind", "tcp")): 1,
    }


def test_reconnect_reasons() -> None:
    assert reconnect_reason(ConnectionRefusedError()) == "connect_failed"
    assert reconnect_reason(TimeoutError()) == "connect_timeout"
    assert reconnect_reason(HandshakeError("bad response")) == "handshake_failed"
    assert reconnect_reason(HeartbeatTimeout()) == "heartbeat_timeout"
    assert session_end_reason(AgentLost(), "going_away: the CSC is shutting down") == "going_away"
    assert session_end_reason(AgentLost(), "") == "agent_lost"
    assert session_end_reason(HeartbeatTimeout(), "going_away: x") == "heartbeat_timeout"
    assert session_end_reason(None, "acme@example.com: hi") == "agent_lost"
    m = AgentMetrics(process_metrics=False)
    m.reconnect("goaway")
    m.reconnect("/some/path")
    assert value(m.registry, "csc_agent_reconnects_total", reason="goaway") == 1
    assert value(m.registry, "csc_agent_reconnects_total", reason="internal") == 1


def test_agent_live_series() -> None:
    m = AgentMetrics(process_metrics=False)
    m.links.data_received, m.links.data_sent, m.links.stalls = 7, 9, 2
    m.track_draining(lambda: 1)
    m.track_spread(lambda: (3, 2))
    reg = m.registry
    assert value(reg, "csc_agent_bytes_total", direction="in") == 7
    assert value(reg, "csc_agent_bytes_total", direction="out") == 9
    assert value(reg, "csc_agent_flow_control_stalls_total") == 2
    assert value(reg, "csc_agent_sessions_draining") == 1
    assert value(reg, "csc_agent_cluster_nodes") == 3
    assert value(reg, "csc_agent_session_nodes") == 2


# --- the link's counters -------------------------------------------------------------------


async def _linked_pair(
    settings: LinkSettings, counters: tuple[LinkCounters, LinkCounters]
) -> tuple[Link, Link]:
    """Two links joined back to back in memory (client, server), handshake done."""
    client, server = handshaken(settings, asyncio.get_running_loop().time())
    links: dict[str, Link] = {}

    def sender(peer: str):  # type: ignore[no-untyped-def]
        async def send(chunks: object) -> None:
            links[peer].feed(b"".join(chunks))  # type: ignore[arg-type]

        return send

    async def ignore(stream: object) -> None:
        await asyncio.Event().wait()  # never consumes: the sender runs out of credit

    links["client"] = Link(
        client, sender("server"), on_stream=ignore, counters=counters[0], name="client"
    )
    links["server"] = Link(server, sender("client"), counters=counters[1], name="server")
    return links["client"], links["server"]


async def test_links_count_payload_bytes_and_stalls() -> None:
    window = 16 * 1024
    settings = LinkSettings(initial_window=window, max_frame=16 * 1024)
    agent, csc = LinkCounters(), LinkCounters()
    client, server = await _linked_pair(settings, (agent, csc))
    try:
        stream = server.open({"kind": "tcp"})
        writer = asyncio.ensure_future(stream.write(b"x" * (window + 100)))
        for _ in range(200):
            if csc.stalls and agent.data_received == window:
                break
            await asyncio.sleep(0)  # let the in-memory link deliver
        assert csc.stalls == 1
        assert csc.data_sent == window
        assert agent.data_received == window
        assert not writer.done()
        peer = client.streams[stream.id]
        peer.consumed(window)  # credit goes back: the rest follows
        await asyncio.wait_for(writer, 5)
        assert csc.data_sent == window + 100
        assert agent.data_received == window + 100
        assert agent.data_sent == 0 and agent.stalls == 0
    finally:
        await client.aclose()
        await server.aclose()


# --- docs/metrics.md ---------------------------------------------------------------------

_ROW = re.compile(r"^\| `([a-z_]+)` \| (counter|gauge|histogram) \|([^|]*)\|")


def _documented(section: str) -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (type, labels) of the table rows under the ``## {section}`` heading."""
    text = DOCS.read_text(encoding="utf-8")
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, frozenset[str]]] = {}
    for line in body.splitlines():
        match = _ROW.match(line)
        if match:
            labels = frozenset(re.findall(r"`([a-z_]+)`", match[3]))
            rows[match[1]] = (match[2], labels)
    return rows


def _registered(registry: CollectorRegistry, prefix: str) -> dict[str, tuple[str, frozenset[str]]]:
    found: dict[str, tuple[str, frozenset[str]]] = {}
    for family in registry.collect():
        if not family.name.startswith(prefix):
            continue
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = {k for s in family.samples for k in s.labels if k != "le"}
        found[name] = (family.type, frozenset(labels))
    return found


def test_the_earliest_token_expiry_per_tenant_is_exported() -> None:
    m = CSCMetrics()
    m.track_sessions(
        lambda: [
            _Session("acme", 1_800_000_900.0),
            _Session("acme", 1_800_000_000.0),
            _Session("beta", 1_900_000_000.0),
        ]
    )
    text = m.render().decode()
    assert 'csc_session_token_expiry_timestamp_seconds{tenant="acme"} 1.8e+09' in text
    assert 'csc_session_token_expiry_timestamp_seconds{tenant="beta"} 1.9e+09' in text


def _exercised_csc() -> CSCMetrics:
    """Metrics with one sample in every labelled family (labels show only on samples)."""
    m = CSCMetrics()
    m.link_counters("acme")
    m.session_opened("acme")
    m.session_closed("acme", None, 1001)
    m.session_handover("acme")
    m.auth_failed(AuthFailed("token expired"))
    m.stream_started("acme", "http")
    m.request_done("http", "acme", "ok", 0.1)
    m.limit_rejected("acme", "body_size")
    m.connection_refused("http", "client_connections")
    m.track_sessions(lambda: [_Session("acme", 1_800_000_000.0)])
    m.connections = lambda: (3, 100)  # csc_connections_max shows only with a bound
    m.client_buffers = lambda: (0, 1 << 28)  # and csc_client_buffer_limit_bytes with one
    return m


def _exercised_agent() -> AgentMetrics:
    m = AgentMetrics()
    m.slot_state(0, "up")
    m.reconnect("goaway")
    m.stream_started("http")
    m.stream_finished("http", UpstreamRefused())
    m.track_token_expiry(lambda: 1_800_000_000.0)
    return m


def test_the_token_expiry_is_exported_only_when_known() -> None:
    m = AgentMetrics(process_metrics=False)
    assert b"csc_agent_token_expiry_timestamp_seconds" not in m.render()
    m.track_token_expiry(lambda: 1_800_000_000.0)
    assert b"csc_agent_token_expiry_timestamp_seconds 1.8e+09" in m.render()


def test_docs_list_every_csc_metric_with_its_type_and_labels() -> None:
    documented = _documented("The CSC")
    registered = _registered(_exercised_csc().registry, "csc_")
    assert documented == registered


def test_docs_list_every_agent_metric_with_its_type_and_labels() -> None:
    documented = _documented("The agent")
    registered = _registered(_exercised_agent().registry, "csc_agent_")
    assert documented == registered


def test_both_programs_export_process_metrics() -> None:
    for registry in (_exercised_csc().registry, _exercised_agent().registry):
        names = {family.name for family in registry.collect()}
        assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_info"} <= names
        assert "python_gc_objects_collected" in names


# --- the agent's metrics_listen setting ------------------------------------------------------

_AGENT_ENV = {"CSC_AGENT_CSC": "http://127.0.0.1:1", "CSC_AGENT_TOKEN": "t"}


def test_metrics_listen_is_off_by_default_and_parsed_from_flag_and_env() -> None:
    env = {**_AGENT_ENV, "CSC_AGENT_UPSTREAM": "http://127.0.0.1:2"}
    assert load_agent_config(file=None, env=env).metrics_listen_address is None
    on = load_agent_config(file=None, env={**env, "CSC_AGENT_METRICS_LISTEN": "127.0.0.1:9465"})
    assert on.metrics_listen_address == ("127.0.0.1", 9465)
    off = load_agent_config(file=None, env={**env, "CSC_AGENT_METRICS_LISTEN": "off"})
    assert off.metrics_listen is None
    args = build_parser().parse_args(["--metrics-listen", "[::1]:0"])
    assert _overrides(args)["metrics_listen"] == "[::1]:0"


def test_a_bad_metrics_listen_is_reported_with_its_name() -> None:
    env = {**_AGENT_ENV, "CSC_AGENT_UPSTREAM": "http://127.0.0.1:2"}
    with pytest.raises(ConfigError) as bad:
        load_agent_config(file=None, env=env, overrides={"metrics_listen": "no-port-here"})
    assert bad.value.problems == [
        "option --metrics-listen: 'no-port-here' is not a host:port "
        "(expected HOST:PORT or [IPv6]:PORT)"
    ]
    with pytest.raises(ConfigError) as bad:
        load_agent_config(file=None, env={**env, "CSC_AGENT_METRICS_LISTEN": "127.0.0.1:x"})
    assert len(bad.value.problems) == 1
    assert "CSC_AGENT_METRICS_LISTEN" in bad.value.problems[0]


def test_docs_name_every_fixed_agent_reconnect_reason() -> None:
    row = next(
        line
        for line in DOCS.read_text(encoding="utf-8").splitlines()
        if line.startswith("| `csc_agent_reconnects_total` |")
    )
    named = set(re.findall(r"`([a-z_]+)`", row))
    assert set(CONNECT_REASONS) <= named, set(CONNECT_REASONS) - named
