"""Per-tenant limits over real sockets: two tenants, two agents, one CSC node.

Tenant ``acme`` gets a low request rate or a low stream cap through the admin API and is
refused with 429 (HTTP, with ``Retry-After``) and ``ERR 429`` (TCP) while tenant ``beta``'s
requests all succeed in the same period; a session over ``max_sessions`` is refused before the
upgrade and the agent keeps retrying; every refusal is counted in the metrics; a tenant's stream
count returns to zero whatever way its streams end; one client address holding its share of
acme's stream slots with bodies it never finishes does not keep another address out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDict

from tenant_agent.agent import Agent
from tests.support.admin import Admin
from tests.support.inproc import Relay, agent_config, make_token, relay, wait_online
from tests.support.procs import async_wait_until, scaled

ACME, BETA = "acme@example.com", "beta@example.com"
FAST = {"registry_refresh": 0.2}


@dataclass
class TwoTenants:
    relay: Relay
    http: aiohttp.ClientSession
    admin: Admin

    @property
    def limiter(self) -> Any:
        return self.relay.node.state.limits

    def metric(self, name: str, **labels: str) -> float:
        value = self.relay.node.state.metrics.registry.get_sample_value(name, labels)
        return value or 0.0

    async def set_limits(self, tenant: str, **limits: Any) -> None:
        await self.admin.call("PATCH", f"/tenants/{tenant}", {"limits": limits})

    async def get(self, alias: str, path: str = "/small") -> tuple[int, CIMultiDict[str], Any]:
        async with self.http.get(self.relay.tunnel(path, alias)) as resp:
            body = await resp.read()
            data = await resp.json() if resp.content_type == "application/json" else body
            return resp.status, resp.headers.copy(), data

    @contextlib.asynccontextmanager
    async def tcp(self, alias: str) -> AsyncIterator[tuple[bytes, asyncio.StreamWriter]]:
        """A TCP ingress connection: the answer line and the writer (open for the block)."""
        reader, writer = await asyncio.open_connection(*self.relay.tcp_address)
        try:
            writer.write(f"CONNECT {alias}\r\n".encode())
            line = await asyncio.wait_for(reader.readline(), scaled(10))
            if line == b"OK\r\n":
                writer.write(b"ping")
                assert await asyncio.wait_for(reader.readexactly(4), scaled(10)) == b"ping"
            yield line, writer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def tcp_line(self, alias: str) -> bytes:
        async with self.tcp(alias) as (line, _):
            return line

    async def streams_drop_to(self, tenant: str, count: int) -> None:
        await async_wait_until(
            lambda: self.limiter.streams(tenant) == count,
            10,
            message=f"{tenant} streams back to {count}",
        )


@contextlib.asynccontextmanager
async def two_tenants(
    tmp_path: Path, csc: dict[str, Any] | None = None, **agent: Any
) -> AsyncIterator[TwoTenants]:
    """acme (the relay's agent) and beta (a second agent), both online."""
    settings = {**FAST, **(csc or {})}
    async with relay(tmp_path, csc=settings, agent=agent) as r, aiohttp.ClientSession() as http:
        token = make_token(r.state_dir, "beta", [BETA])
        beta = Agent(agent_config(r.csc_url, token, r.upstream))
        task = asyncio.create_task(beta.run())
        try:
            await wait_online(r.csc_url, BETA)
            yield TwoTenants(r, http, Admin(http, r))
        finally:
            beta.stop()
            await asyncio.wait_for(task, scaled(30))


async def test_a_tenant_over_its_rate_gets_429_and_the_other_is_unaffected(
    tmp_path: Path,
) -> None:
    async with two_tenants(tmp_path) as t:
        sessions = set(t.relay.node.state.sessions)
        await t.set_limits("acme", max_request_rate=0.05)  # one request per 20 s, burst 1
        answers = [await t.get(ACME) for _ in range(6)]
        beta = [await t.get(BETA) for _ in range(6)]
        tcp = [await t.tcp_line(ACME), await t.tcp_line(ACME)]
        beta_tcp = [await t.tcp_line(BETA) for _ in range(3)]
        async with t.http.get(f"{t.relay.csc_url}/v1/resolve/{ACME}") as resolved:
            resolve_status = resolved.status  # resolving is not a request

        assert [status for status, _, _ in answers] == [200] + [429] * 5
        for _, headers, body in answers[1:]:
            assert body["error"] == "rate_limited" and "at most 0.05 a second" in body["message"]
            assert 1 <= int(headers["Retry-After"]) <= 20
            assert body["request_id"] == headers["X-Request-Id"]
        assert [status for status, _, _ in beta] == [200] * 6
        assert all(line.startswith(b"ERR 429 rate_limited: too many requests") for line in tcp)
        assert beta_tcp == [b"OK\r\n"] * 3
        assert resolve_status == 200
        refused = t.metric("csc_limit_rejections_total", tenant="acme", limit="rate")
        assert refused == 7
        assert t.metric("csc_requests_total", tenant="acme", kind="http", outcome="rate_limited")
        assert t.metric("csc_limit_rejections_total", tenant="beta", limit="rate") == 0

        await t.set_limits("acme", max_request_rate=None)  # at once, no session restarted
        assert [(await t.get(ACME))[0] for _ in range(3)] == [200] * 3
        assert set(t.relay.node.state.sessions) == sessions


async def test_a_tenant_over_its_stream_cap_gets_429_until_a_stream_ends(tmp_path: Path) -> None:
    async with two_tenants(tmp_path, csc={"client_stream_share": 1.0}) as t:  # one address
        await t.set_limits("acme", max_streams=2)
        async with t.tcp(ACME) as (first, _), t.tcp(ACME) as (second, _):
            assert (first, second) == (b"OK\r\n", b"OK\r\n")
            assert t.limiter.streams("acme") == 2
            status, headers, body = await t.get(ACME)
            line = await t.tcp_line(ACME)
            beta = [(await t.get(BETA))[0] for _ in range(5)]
            beta_tcp = [await t.tcp_line(BETA) for _ in range(2)]
            async with t.tcp(BETA) as (held, _):
                assert held == b"OK\r\n"  # beta's own streams are not capped
                assert (await t.get(BETA))[0] == 200

        assert (status, headers["Retry-After"], body["error"]) == (429, "1", "tenant_limit")
        assert "at most 2 at once" in body["message"]
        assert line.startswith(b"ERR 429 tenant_limit: too many requests in progress for ")
        assert beta == [200] * 5 and beta_tcp == [b"OK\r\n"] * 2
        assert t.metric("csc_limit_rejections_total", tenant="acme", limit="streams") == 2
        await t.streams_drop_to("acme", 0)
        assert (await t.get(ACME))[0] == 200


async def test_the_stream_count_returns_to_zero_on_every_path(tmp_path: Path) -> None:
    async with two_tenants(tmp_path) as t:
        await t.set_limits("acme", max_streams=50)
        assert (await t.get(ACME))[0] == 200  # success
        assert (await t.get(ACME, "/status/503"))[0] == 503  # the portal's own error
        await t.streams_drop_to("acme", 0)

        with contextlib.suppress(aiohttp.ClientError):  # aborted mid-response
            await t.get(ACME, "/reset-mid?n=1000")
        await t.streams_drop_to("acme", 0)

        slow = t.relay.tunnel("/bytes/100000000?rate=100000", ACME)
        async with t.http.get(slow) as resp:  # the client goes away mid-download
            assert resp.status == 200
            await resp.content.readexactly(1000)
            assert t.limiter.streams("acme") == 1
            resp.close()
        await t.streams_drop_to("acme", 0)

        async with t.tcp(ACME) as (line, writer):  # a TCP client that goes away
            assert line == b"OK\r\n" and t.limiter.streams("acme") == 1
            writer.transport.abort()
        await t.streams_drop_to("acme", 0)

        async with t.http.get(slow) as resp:  # the agent's link is lost mid-download
            await resp.content.readexactly(1000)
            for session in list(t.relay.node.state.sessions.values()):
                if session.tenant == "acme":
                    session.link.close()
            with contextlib.suppress(aiohttp.ClientError):
                await resp.read()
        await t.streams_drop_to("acme", 0)
        assert t.limiter.streams("beta") == 0


async def _upgrade(t: TwoTenants) -> tuple[int, str, Any]:
    """An agent's upgrade request with acme's token: the status, Retry-After and JSON body of
    a refusal, or (101, "", None) when the CSC switched protocols."""
    headers = {
        "Authorization": f"Bearer {t.relay.token}",
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "MDEyMzQ1Njc4OWFiY2RlZg==",
    }
    async with t.http.get(f"{t.relay.csc_url}/v1/agent/connect", headers=headers) as resp:
        if resp.status == 101:
            return 101, "", None
        return resp.status, resp.headers.get("Retry-After", ""), await resp.json()


def _acme_sessions(t: TwoTenants) -> int:
    return sum(1 for s in t.relay.node.state.sessions.values() if s.tenant == "acme")


async def test_a_session_over_the_cap_is_refused_and_the_agent_keeps_retrying(
    tmp_path: Path,
) -> None:
    async with two_tenants(tmp_path, sessions=2) as t:
        await async_wait_until(lambda: _acme_sessions(t) == 2, 10, message="two sessions")
        await t.set_limits("acme", max_sessions=1)  # ends nothing that runs
        status, retry, body = await _upgrade(t)
        assert (status, retry, body["error"]) == (429, "1", "tenant_limit")
        assert "at most 1" in body["message"]
        assert _acme_sessions(t) == 2

        for session in list(t.relay.node.state.sessions.values()):
            if session.tenant == "acme":
                session.link.close()  # both slots reconnect: one gets in, one is refused
        await async_wait_until(
            lambda: t.metric("csc_limit_rejections_total", tenant="acme", limit="sessions") >= 4,
            10,
            message="the refused slot keeps retrying",
        )
        agent = t.relay.agent
        assert agent is not None and t.relay.agent_task is not None
        assert not t.relay.agent_task.done() and agent.fatal is None
        await async_wait_until(lambda: _acme_sessions(t) == 1, 10, message="one session")
        assert t.limiter.sessions("acme") == 1
        # the agent counts a refusal when its answer arrives, after the CSC counted it
        await async_wait_until(
            lambda: agent.metrics.reconnects.get("refused", 0) >= 3,
            10,
            message="the agent counted its refusals",
        )
        assert t.metric("csc_sessions_refused_total", reason="tenant_limit") >= 4
        assert (await t.get(ACME))[0] == 200 and (await t.get(BETA))[0] == 200

        await t.set_limits("acme", max_sessions=None)
        await async_wait_until(lambda: _acme_sessions(t) == 2, 10, message="second session back")


async def test_one_address_holds_only_its_share_of_a_tenants_streams(tmp_path: Path) -> None:
    """Slow uploads from 127.0.0.1 take their address's share (half of ``max_streams``); its
    next request is refused with 429 while 127.0.0.2 still gets through; each slot of the
    address comes back with its stream."""
    async with two_tenants(tmp_path) as t:
        await t.set_limits("acme", max_streams=4)
        finish = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield b"x"
            await finish.wait()
            yield b"y"

        async def upload() -> tuple[int, bytes]:
            async with t.http.post(t.relay.tunnel("/echo/up", ACME), data=slow_body()) as resp:
                return resp.status, await resp.read()

        uploads = [asyncio.create_task(upload()) for _ in range(2)]
        try:
            await async_wait_until(
                lambda: t.limiter.client_streams("acme", "127.0.0.1") == 2,
                10,
                message="two slow uploads admitted",
            )
            status, headers, body = await t.get(ACME)
            line = await t.tcp_line(ACME)
            connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
            async with (
                aiohttp.ClientSession(connector=connector) as other,
                other.get(t.relay.tunnel("/small", ACME)) as resp,
            ):
                other_status = resp.status
                await resp.read()
        finally:
            finish.set()
            done = await asyncio.wait_for(asyncio.gather(*uploads), scaled(30))

        assert (status, headers["Retry-After"], body["error"]) == (429, "1", "tenant_limit")
        assert "from your address (at most 2 at once)" in body["message"]
        assert line.startswith(b"ERR 429 tenant_limit: too many requests in progress for ")
        assert other_status == 200
        assert [status for status, _ in done] == [200, 200]
        await t.streams_drop_to("acme", 0)
        assert t.limiter.client_streams("acme", "127.0.0.1") == 0
        assert (await t.get(ACME))[0] == 200


async def test_a_tenant_without_a_cap_holds_at_most_the_nodes_default_sessions(
    tmp_path: Path,
) -> None:
    """A tenant without ``max_sessions`` of its own cannot open sessions without end (each
    holds a descriptor and link budgets of the node): ``default_max_sessions`` bounds it on
    the node, and the other tenant still connects. Its own cap, once set, replaces the
    default."""
    async with two_tenants(tmp_path, csc={"default_max_sessions": 2}, sessions=2) as t:
        await async_wait_until(lambda: _acme_sessions(t) == 2, 10, message="two sessions")
        status, retry, body = await _upgrade(t)
        assert (status, retry, body["error"]) == (429, "1", "tenant_limit")
        assert "at most 2" in body["message"]
        assert _acme_sessions(t) == 2
        assert (await t.get(ACME))[0] == 200 and (await t.get(BETA))[0] == 200

        await t.set_limits("acme", max_sessions=3)
        await async_wait_until(
            lambda: t.relay.node.state.registry.tenant("acme").limits.max_sessions == 3,  # type: ignore[union-attr]
            10,
            message="the new cap seen",
        )
        assert (await _upgrade(t))[0] == 101
