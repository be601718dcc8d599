"""``/metrics`` of the CSC and of the agent, scraped over real sockets before and after traffic.

Every counter is checked for the exact amount the traffic moved it (bytes included: they count
stream payload only, so they equal the bodies sent and received), histograms for their count
and sum, gauges for their value once the traffic settled. Every scrape is also checked for label
values that would make series unbounded or leak data: no alias, no address, no path.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.config import Secret
from shared.errors import GoingAway
from shared.protocol import Connection, LinkSettings, Side
from shared.tokens import issue_token, load_or_create_signing_key
from tenant_agent.agent import EXIT_FATAL, Agent
from tenant_agent.config import AgentConfig
from tests.support.inproc import ALIAS, Relay, relay, start_agent, wait_online
from tests.support.procs import async_wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

AGENT_METRICS = {"metrics_listen": "127.0.0.1:0"}
OTHER_ALIAS = "nobody@example.org"
ALLOWED_LABELS = {
    # ours
    *(
        "tenant",
        "kind",
        "outcome",
        "reason",
        "direction",
        "limit",
        "slot",
        "state",
        "code",
        "result",
        "listener",
    ),
    *("version", "le"),
    # prometheus-client: python_info, python_gc_*
    *("implementation", "major", "minor", "patchlevel", "generation"),
}

# --- label hygiene -----------------------------------------------------------------------------

_IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")
_HOST_PORT = re.compile(r"^\[?[\w.:-]*\]?:\d{1,5}$")


def label_problem(value: str, aliases: Iterable[str] = (ALIAS, OTHER_ALIAS)) -> str | None:
    """What is wrong with ``value`` as a label value (None: nothing)."""
    lowered = value.lower()
    if "@" in value or any(alias.lower() in lowered for alias in aliases):
        return "an alias"
    if "/" in value:
        return "a path"
    if _IPV4.search(value) or "::" in value or _HOST_PORT.match(value):
        return "an address"
    try:
        ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        return None
    return "an address"


def assert_bounded_labels(text: str) -> int:
    """Check every sample of an exposition; return how many were checked."""
    checked = 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, sample
            for value in sample.labels.values():
                problem = label_problem(value)
                assert problem is None, f"{sample.name}{sample.labels}: a label value is {problem}"
            checked += 1
    return checked


def test_the_label_checker_catches_aliases_addresses_and_paths() -> None:
    for bad in (
        ALIAS,
        ALIAS.upper(),
        "x@y",
        "/t/acme@example.com/echo",
        "/echo/x",
        "127.0.0.1",
        "127.0.0.1:8080",
        "::1",
        "[::1]:443",
        "fe80::1",
        "2001:db8::5",
        "portal.example.com:443",
        "localhost:9",
    ):
        assert label_problem(bad) is not None, bad
    for good in ("acme", "http", "upstream_refused", "0.005", "+Inf", "3.11.7", "0.1.0", ""):
        assert label_problem(good) is None, good


# --- scraping ----------------------------------------------------------------------------------


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def val(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


class Delta:
    """How much each series moved between two scrapes (a missing series counts as 0)."""

    def __init__(self, before: Samples, after: Samples) -> None:
        self.before, self.after = before, after

    def __call__(self, name: str, **labels: str) -> float:
        return val(self.after, name, **labels) - val(self.before, name, **labels)


async def scrape(http: aiohttp.ClientSession, url: str) -> Samples:
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    assert assert_bounded_labels(text) > 0
    return parse(text)


async def settled(
    http: aiohttp.ClientSession, url: str, done: Callable[[Samples], bool], what: str
) -> Samples:
    """Scrape until ``done`` holds (requests are counted just after their last byte)."""
    latest: Samples = {}

    async def check() -> bool:
        nonlocal latest
        latest = await scrape(http, url)
        return done(latest)

    await async_wait_until(check, 10, interval=0.02, message=what)
    return latest


def csc_metrics(r: Relay) -> str:
    return r.metrics_url


def agent_metrics(r: Relay) -> str:
    assert r.agent is not None and r.agent.metrics_server.address
    return f"http://{r.agent.metrics_server.address}/metrics"


def idle(samples: Samples, name: str) -> bool:
    return val(samples, name, kind="http") == 0 and val(samples, name, kind="tcp") == 0


async def tcp_exchange(r: Relay, alias: str, payload: bytes) -> tuple[bytes, bytes]:
    """CONNECT ``alias``; send ``payload`` and half-close on OK; (first line, bytes back)."""
    reader, writer = await asyncio.open_connection(*r.tcp_address)
    try:
        writer.write(f"CONNECT {alias}\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), 10)
        back = b""
        if line == b"OK\r\n":
            writer.write(payload)
            writer.write_eof()
            back = await asyncio.wait_for(reader.read(), 10)
        return line, back
    finally:
        writer.close()


async def status_of(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as resp:
        await resp.read()
        return resp.status


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- the CSC and the agent under traffic ------------------------------------------------------


async def test_metrics_are_on_their_own_listener_not_the_public_one(tmp_path: Path) -> None:
    """The public listener (bootloaders, agents) answers 404 for /metrics: the series name
    every tenant; the metrics listener serves them, and only them."""
    async with relay(tmp_path) as r, aiohttp.ClientSession() as http:
        assert r.node.metrics_address != r.node.http_address
        assert await status_of(http, f"{r.csc_url}/metrics") == 404
        samples = await scrape(http, r.metrics_url)
        assert val(samples, "csc_sessions_opened_total", tenant="acme") >= 1
        base = r.metrics_url.removesuffix("/metrics")
        for path in ("/healthz", f"/v1/resolve/{ALIAS}", "/v1/agent/connect"):
            assert await status_of(http, base + path) == 404, path


def test_the_metrics_listener_is_loopback_by_default() -> None:
    from csc.config import CSCConfig

    host, _ = CSCConfig().metrics_listen_address or ("", 0)
    assert ipaddress.ip_address(host).is_loopback


async def test_requests_bytes_and_latency_move_by_exactly_the_traffic(tmp_path: Path) -> None:
    async with relay(tmp_path, agent=AGENT_METRICS) as r, aiohttp.ClientSession() as http:
        csc0, agent0 = await scrape(http, csc_metrics(r)), await scrape(http, agent_metrics(r))
        loop = asyncio.get_running_loop()
        started = loop.time()
        down = 0
        for i in range(3):
            async with http.get(r.tunnel(f"/echo/{i}")) as resp:
                assert resp.status == 200
                down += len(await resp.read())
        upload = b"u" * 300_001
        async with http.post(r.tunnel("/upload"), data=upload) as resp:
            assert resp.status == 200
            down += len(await resp.read())
        async with http.get(r.tunnel("/bytes/1000000")) as resp:
            assert resp.status == 200
            down += len(await resp.read())
        elapsed = loop.time() - started
        tcp = bytes(range(256)) * 1000
        assert await tcp_exchange(r, ALIAS, tcp) == (b"OK\r\n", tcp)
        assert await status_of(http, f"{r.csc_url}/t/not%20an%20alias/x") == 400
        assert await status_of(http, r.tunnel("/x", alias=OTHER_ALIAS)) == 404
        assert (await tcp_exchange(r, OTHER_ALIAS, b""))[0].startswith(b"ERR 404")
        for alias, status in ((ALIAS, 200), (OTHER_ALIAS, 404), ("bad alias!", 400)):
            assert await status_of(http, f"{r.csc_url}/v1/resolve/{alias}") == status

        req = "csc_requests_total"

        def csc_done(s: Samples) -> bool:
            moved = Delta(csc0, s)
            return (
                idle(s, "csc_streams_active")
                and moved(req, tenant="acme", kind="http", outcome="ok") == 5
                and moved(req, tenant="acme", kind="tcp", outcome="ok") == 1
            )

        csc1 = await settled(http, csc_metrics(r), csc_done, "CSC requests counted")
        d = Delta(csc0, csc1)
        assert d(req, tenant="", kind="http", outcome="bad_alias") == 1
        assert d(req, tenant="", kind="http", outcome="unknown_alias") == 1
        assert d(req, tenant="", kind="tcp", outcome="unknown_alias") == 1
        hist = "csc_tunnel_request_duration_seconds"
        assert d(f"{hist}_count", outcome="ok") == 5
        assert d(f"{hist}_bucket", outcome="ok", le="+Inf") == 5
        assert 0 < d(f"{hist}_sum", outcome="ok") <= elapsed  # one request at a time
        assert d(f"{hist}_count", outcome="bad_alias") == 1
        assert d(f"{hist}_count", outcome="unknown_alias") == 1
        assert d(f"{hist}_count", outcome="portal_offline") == 0
        assert d("csc_streams_opened_total", tenant="acme", kind="http") == 5
        assert d("csc_streams_opened_total", tenant="acme", kind="tcp") == 1
        assert d("csc_bytes_total", tenant="acme", direction="in") == len(upload) + len(tcp)
        assert d("csc_bytes_total", tenant="acme", direction="out") == down + len(tcp)
        for outcome in ("ok", "unknown_alias", "bad_alias"):
            assert d("csc_resolve_total", outcome=outcome) == 1
        assert d("csc_resolve_total", outcome="portal_offline") == 0
        assert d("csc_sessions_opened_total", tenant="acme") == 0

        agent1 = await settled(
            http,
            agent_metrics(r),
            lambda s: idle(s, "csc_agent_streams_active"),
            "agent streams finished",
        )
        a = Delta(agent0, agent1)
        assert a("csc_agent_streams_opened_total", kind="http") == 5
        assert a("csc_agent_streams_opened_total", kind="tcp") == 1
        assert a("csc_agent_bytes_total", direction="in") == len(upload) + len(tcp)
        assert a("csc_agent_bytes_total", direction="out") == down + len(tcp)
        errors = [k for k in agent1 if k[0] == "csc_agent_upstream_errors_total"]
        assert errors == []


async def test_sessions_gauges_and_portal_offline(tmp_path: Path) -> None:
    async with relay(tmp_path) as r, aiohttp.ClientSession() as http:
        s0 = await scrape(http, csc_metrics(r))
        assert val(s0, "csc_agent_sessions", tenant="acme") == 2
        assert val(s0, "csc_agents_connected") == 1
        assert val(s0, "csc_sessions_opened_total", tenant="acme") == 2
        assert val(s0, "csc_build_info", version="0.1.0") == 1

        await r.stop_agent()
        s1 = await settled(
            http,
            csc_metrics(r),
            lambda s: val(s, "csc_agent_sessions", tenant="acme") == 0,
            "sessions gone",
        )
        assert val(s1, "csc_agents_connected") == 0
        d = Delta(s0, s1)
        assert d("csc_sessions_closed_total", tenant="acme", reason="going_away") == 2
        assert d("csc_sessions_closed_total", tenant="acme", reason="agent_lost") == 0

        assert await status_of(http, r.tunnel("/echo/x")) == 503
        assert await status_of(http, f"{r.csc_url}/v1/resolve/{ALIAS}") == 503
        assert (await tcp_exchange(r, ALIAS, b""))[0].startswith(b"ERR 503 portal_offline")
        d = Delta(s1, await scrape(http, csc_metrics(r)))
        assert d("csc_requests_total", tenant="acme", kind="http", outcome="portal_offline") == 1
        assert d("csc_requests_total", tenant="acme", kind="tcp", outcome="portal_offline") == 1
        assert d("csc_tunnel_request_duration_seconds_count", outcome="portal_offline") == 1
        assert d("csc_resolve_total", outcome="portal_offline") == 1
        assert d("csc_streams_opened_total", tenant="acme", kind="http") == 0


def _hello(aliases: list[str]) -> bytes:
    conn = Connection(Side.CLIENT, LinkSettings(), accept_streams=True, now=0.0)
    conn.send_hello({"agent": "test-agent/0", "aliases": aliases})
    return b"".join(conn.data_to_send())


async def test_auth_failures_by_reason(tmp_path: Path) -> None:
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        connect = f"{r.csc_url}/v1/agent/connect"
        key, _ = load_or_create_signing_key(r.state_dir)
        claims = {"tenant": "acme", "aliases": [ALIAS], "issuer": "csc"}
        expired = issue_token(
            key, **claims, ttl_seconds=60, audience="csc-agent", now=time.time() - 3600
        )
        elsewhere = issue_token(key, **claims, ttl_seconds=60, audience="another-service")
        before = await scrape(http, csc_metrics(r))
        failures_before = r.node.state.auth_failures
        attempts = {
            "missing_token": (connect, {}),
            "token_in_query": (f"{connect}?token={r.token}", {}),
            "malformed": (connect, {"Authorization": "Bearer not-a-token"}),
            "expired": (connect, {"Authorization": f"Bearer {expired}"}),
            "audience": (connect, {"Authorization": f"Bearer {elsewhere}"}),
        }
        for url, headers in attempts.values():
            async with http.get(url, headers=headers) as resp:
                assert resp.status == 401

        # a good token asking for an alias it does not cover: refused after HELLO
        ws = await http.ws_connect(connect, headers={"Authorization": f"Bearer {r.token}"})
        await ws.send_bytes(_hello([OTHER_ALIAS]))
        assert (await ws.receive()).type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 4403

        d = Delta(before, await scrape(http, csc_metrics(r)))
        for reason in attempts:
            assert d("csc_auth_failures_total", reason=reason) == 1, reason
        assert d("csc_auth_failures_total", reason="other") == 0
        assert d("csc_sessions_refused_total", reason="auth_failed") == len(attempts)
        assert d("csc_sessions_refused_total", reason="alias_forbidden") == 1
        assert r.node.state.auth_failures == failures_before + len(attempts)
        assert d("csc_sessions_opened_total", tenant="acme") == 0


async def test_agent_counts_reconnects_after_a_forced_disconnect(tmp_path: Path) -> None:
    async with relay(tmp_path, agent=AGENT_METRICS) as r, aiohttp.ClientSession() as http:
        a0 = await scrape(http, agent_metrics(r))
        c0 = await scrape(http, csc_metrics(r))
        for slot in ("0", "1"):
            assert val(a0, "csc_agent_session_state", slot=slot, state="up") == 1
            assert val(a0, "csc_agent_session_state", slot=slot, state="backoff") == 0
        assert val(a0, "csc_agent_build_info", version="0.1.0") == 1
        assert val(a0, "csc_agent_sessions_draining") == 0

        for session in list(r.node.state.sessions.values()):
            session.link.close(GoingAway("forced disconnect"))

        def reconnected(s: Samples) -> bool:
            up = [val(s, "csc_agent_session_state", slot=n, state="up") for n in ("0", "1")]
            moved = Delta(a0, s)("csc_agent_reconnects_total", reason="going_away")
            return moved == 2 and up == [1, 1]

        a1 = await settled(http, agent_metrics(r), reconnected, "agent reconnected")
        reconnects = {k: v for k, v in a1.items() if k[0] == "csc_agent_reconnects_total"}
        assert sum(reconnects.values()) == 2, reconnects
        c1 = await settled(
            http,
            csc_metrics(r),
            lambda s: Delta(c0, s)("csc_sessions_opened_total", tenant="acme") == 2,
            "sessions back",
        )
        d = Delta(c0, c1)
        assert d("csc_sessions_closed_total", tenant="acme", reason="going_away") == 2
        assert val(c1, "csc_agent_sessions", tenant="acme") == 2
        await wait_online(r.csc_url)


async def test_agent_counts_upstream_errors_when_the_upstream_is_down(tmp_path: Path) -> None:
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        down = closed_port()
        await start_agent(
            r,
            upstream=f"http://127.0.0.1:{down}",
            tcp_upstream=f"127.0.0.1:{down}",
            **AGENT_METRICS,
        )
        await wait_online(r.csc_url)
        a0 = await scrape(http, agent_metrics(r))
        c0 = await scrape(http, csc_metrics(r))
        assert await status_of(http, r.tunnel("/echo/x")) == 502
        assert (await tcp_exchange(r, ALIAS, b"x"))[0].startswith(b"ERR 502 upstream_refused")

        a1 = await settled(
            http,
            agent_metrics(r),
            lambda s: (
                idle(s, "csc_agent_streams_active")
                and Delta(a0, s)("csc_agent_streams_opened_total", kind="tcp") == 1
            ),
            "agent streams finished",
        )
        a = Delta(a0, a1)
        errors = "csc_agent_upstream_errors_total"
        assert a(errors, kind="http", code="upstream_refused") == 1
        assert a(errors, kind="tcp", code="upstream_refused") == 1
        assert a("csc_agent_streams_opened_total", kind="http") == 1

        c1 = await settled(
            http, csc_metrics(r), lambda s: idle(s, "csc_streams_active"), "CSC streams finished"
        )
        d = Delta(c0, c1)
        for kind in ("http", "tcp"):
            assert (
                d("csc_requests_total", tenant="acme", kind=kind, outcome="upstream_refused") == 1
            )
        assert d("csc_tunnel_request_duration_seconds_count", outcome="upstream_refused") == 1


async def test_no_label_value_is_an_alias_an_address_or_a_path(tmp_path: Path) -> None:
    """Every sample of both endpoints, after traffic that carried aliases, paths and client
    addresses everywhere (each scrape is checked by :func:`scrape`)."""
    async with relay(tmp_path, agent=AGENT_METRICS) as r, aiohttp.ClientSession() as http:
        assert await status_of(http, r.tunnel("/echo/some/deep/path?q=1")) == 200
        assert await status_of(http, r.tunnel("/status/404")) == 404
        assert await status_of(http, r.tunnel("/x", alias=OTHER_ALIAS)) == 404
        assert await status_of(http, f"{r.csc_url}/v1/resolve/{OTHER_ALIAS}") == 404
        assert (await tcp_exchange(r, ALIAS.upper(), b"ping"))[1] == b"ping"
        for url in (csc_metrics(r), agent_metrics(r)):
            async with http.get(url) as resp:
                text = await resp.text()
            assert assert_bounded_labels(text) > 20
            lowered = text.lower()
            assert "acme@" not in lowered and "/echo" not in text and "127.0.0.1" not in text


async def test_agent_stops_clearly_when_metrics_listen_is_taken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="csc_agent")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = AgentConfig(
            csc=f"http://127.0.0.1:{closed_port()}",
            token=Secret("token"),
            upstream=f"http://127.0.0.1:{closed_port()}",
            metrics_listen=f"127.0.0.1:{port}",
        )
        code = await asyncio.wait_for(Agent(config).run(), 10)
    assert code == EXIT_FATAL
    assert any("cannot serve metrics" in rec.getMessage() for rec in caplog.records)
