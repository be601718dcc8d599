"""The admin API over real sockets, with a real agent: a whole tenant lifecycle, revocation,
suspension, the offline answer naming the tenant, the audit log, and refused requests."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared.protocol import Connection, LinkSettings, Side
from shared.tokens import issue_token, load_or_create_signing_key
from tests.support.admin import Admin, resolve, tcp_connect_line
from tests.support.inproc import Relay, relay, start_agent, wait_online
from tests.support.procs import async_wait_until, scaled

ALIAS = "beta@example.com"
PATTERN = "*@beta.example"
TENANT_INFO = {"name": "Beta Corp", "contact": "help@beta.example"}
FAST = {"registry_refresh": 0.2}


def _beta_sessions(r: Relay) -> list[Any]:
    return [s for s in r.node.state.sessions.values() if s.tenant == "beta"]


async def _agent_exit(r: Relay) -> int:
    assert r.agent_task is not None
    code = await asyncio.wait_for(r.agent_task, scaled(5))
    r.agent = r.agent_task = None
    return code


async def _hello_and_wait_close(
    http: aiohttp.ClientSession, r: Relay, token: str, timeout: float
) -> tuple[int | None, str]:
    """A raw agent session: upgrade, HELLO, then wait for the CSC to close it."""
    ws = await http.ws_connect(
        f"{r.csc_url}/v1/agent/connect", headers={"Authorization": f"Bearer {token}"}
    )
    conn = Connection(Side.CLIENT, LinkSettings(), accept_streams=True, now=0.0)
    conn.send_hello({"agent": "test"})
    await ws.send_bytes(b"".join(conn.data_to_send()))
    async with asyncio.timeout(scaled(timeout)):
        while True:
            msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                return ws.close_code, str(msg.extra)


async def _upgrade_status(http: aiohttp.ClientSession, r: Relay, token: str) -> tuple[int, Any]:
    headers = {
        "Authorization": f"Bearer {token}",
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "MDEyMzQ1Njc4OWFiY2RlZg==",
    }
    async with http.get(f"{r.csc_url}/v1/agent/connect", headers=headers) as resp:
        return resp.status, await resp.json()


async def test_tenant_lifecycle(tmp_path: Path) -> None:
    async with relay(tmp_path, start=False, csc=FAST) as r, aiohttp.ClientSession() as http:
        admin = Admin(http, r)
        await _create_and_assign(admin, http, r)
        token = await _issue(admin)
        await _connect_and_watch(admin, http, r, token)
        await _revoke(admin, http, r, token)
        r.token = await _issue(admin)
        await start_agent(r, sessions=2)
        # online with the first session; the suspension below counts both
        await async_wait_until(lambda: len(_beta_sessions(r)) == 2, 10, message="two sessions")
        await _suspend_and_resume(admin, http, r)
        await _delete(admin, http, r)
        await _check_audit(admin, token)


async def _create_and_assign(admin: Admin, http: aiohttp.ClientSession, r: Relay) -> None:
    created = await admin.call(
        "POST",
        "/tenants",
        {"id": "beta", **TENANT_INFO, "limits": {"max_sessions": 4}},
        expect=201,
    )
    assert created["state"] == "active" and created["aliases"] == []
    assert created["limits"] == {"max_sessions": 4, "max_streams": None, "max_request_rate": None}
    status, body, _ = await resolve(http, r, ALIAS)
    assert (status, body["error"]) == (404, "unknown_alias")
    assigned = await admin.call("POST", "/tenants/beta/aliases", {"aliases": [ALIAS, PATTERN]})
    assert assigned["assigned"] == [ALIAS, PATTERN]
    # known, but no agent: 503 with whom to call, on HTTP and on TCP
    status, body, retry = await resolve(http, r, "someone@beta.example")
    assert (status, body["error"], retry) == (503, "portal_offline", "5")
    assert body["tenant"] == TENANT_INFO
    assert "help@beta.example" in body["message"]
    async with http.get(f"{r.csc_url}/t/{ALIAS}/echo/x") as resp:
        assert resp.status == 503 and (await resp.json())["tenant"] == TENANT_INFO
    line = await tcp_connect_line(r, ALIAS)
    assert line.startswith(b"ERR 503 portal_offline: ") and b"Beta Corp" in line
    assert b"help@beta.example" in line
    listed = await admin.call("GET", "/aliases?tenant=beta")
    assert [(a["alias"], a["sessions"]) for a in listed["aliases"]] == [(PATTERN, 0), (ALIAS, 0)]


async def _issue(admin: Admin) -> str:
    refused = await admin.call(
        "POST",
        "/tokens",
        {"tenant": "beta", "aliases": [ALIAS, "x@example.com", "acme@example.com"]},
        expect=409,
    )
    assert refused["error"] == "not_assigned"
    assert refused["problems"] == [
        "'x@example.com' is not assigned to tenant 'beta'",
        "'acme@example.com' belongs to tenant 'acme', not 'beta'",
    ]
    issued = await admin.call(
        "POST", "/tokens", {"tenant": "beta", "aliases": [ALIAS, PATTERN], "ttl": "1h"}, expect=201
    )
    assert issued["status"] == "active" and issued["issued_by"] == "admin"
    token: str = issued["token"]
    return token


def _jti(token: str, r: Relay) -> str:
    from shared.tokens import verify_token

    key, _ = load_or_create_signing_key(r.state_dir)
    return verify_token(token, [key.public_key()], audience="csc-agent", issuer="csc").jti


async def _connect_and_watch(
    admin: Admin, http: aiohttp.ClientSession, r: Relay, token: str
) -> None:
    r.token = token
    await start_agent(r, sessions=2)
    await wait_online(r.csc_url, ALIAS)
    await async_wait_until(lambda: len(_beta_sessions(r)) == 2, 10, message="two sessions")
    async with http.get(f"{r.csc_url}/t/{ALIAS}/bytes/50000") as resp:
        assert resp.status == 200 and len(await resp.read()) == 50000
    listed = await admin.call("GET", "/sessions?tenant=beta")
    assert len(listed["sessions"]) == 2 and listed["node"] == r.node.state.node_id
    for s in listed["sessions"]:
        assert s["tenant"] == "beta" and s["aliases"] == [ALIAS, PATTERN]
        assert s["remote"] == "127.0.0.1" and s["state"] == "active"
        assert s["token_jti"] == _jti(token, r) and s["since"].endswith("Z")
    assert sum(s["streams_total"] for s in listed["sessions"]) == 1
    assert sum(s["bytes_in"] for s in listed["sessions"]) > 50000
    assert all(s["bytes_out"] > 0 for s in listed["sessions"])
    shown = await admin.call("GET", "/tenants/beta")
    assert shown["sessions"] == 2 and len(shown["live_sessions"]) == 2
    assert [t["status"] for t in shown["tokens"]] == ["active"]


async def _revoke(admin: Admin, http: aiohttp.ClientSession, r: Relay, token: str) -> None:
    jti = _jti(token, r)
    started = time.monotonic()
    answer = await admin.call("POST", f"/tokens/{jti}/revoke")
    assert answer["sessions_closed"] == 2 and not answer["already_revoked"]
    assert answer["token"]["status"] == "revoked" and answer["token"]["revoked_by"] == "admin"
    await async_wait_until(lambda: not _beta_sessions(r), 5, message="sessions dropped")
    assert time.monotonic() - started < 5
    agent = r.agent
    assert await _agent_exit(r) == 3  # 4401 is fatal for the agent
    assert agent is not None and agent.fatal is not None and "token revoked" in agent.fatal
    status, body = await _upgrade_status(http, r, token)
    assert (status, body["error"], body["message"]) == (401, "auth_failed", "token revoked")
    status, body, _ = await resolve(http, r, ALIAS)
    assert status == 503


async def _suspend_and_resume(admin: Admin, http: aiohttp.ClientSession, r: Relay) -> None:
    suspended = await admin.call("PATCH", "/tenants/beta", {"state": "suspended"})
    assert suspended["state"] == "suspended" and suspended["sessions_closed"] == 2
    await async_wait_until(lambda: not _beta_sessions(r), 5, message="sessions closed")
    status, body, _ = await resolve(http, r, ALIAS)
    assert (status, body["error"], body["tenant"]) == (503, "tenant_suspended", TENANT_INFO)
    async with http.post(f"{r.csc_url}/t/{ALIAS}/echo/x", data=b"hi") as resp:
        assert resp.status == 503 and (await resp.json())["error"] == "tenant_suspended"
    assert (await tcp_connect_line(r, ALIAS)).startswith(b"ERR 503 tenant_suspended: ")
    status, body = await _upgrade_status(http, r, r.token)
    assert (status, body["error"]) == (503, "tenant_suspended")
    assert r.agent_task is not None and not r.agent_task.done()  # it keeps retrying
    resumed = await admin.call("PATCH", "/tenants/beta", {"state": "active"})
    assert resumed["state"] == "active"
    await wait_online(r.csc_url, ALIAS)
    # both sessions back: no reconnect attempt is under way, which the deletion would refuse
    # (401, fatal) so that the agent closes its other session itself before the CSC does
    await async_wait_until(lambda: len(_beta_sessions(r)) == 2, 10, message="two sessions")


async def _delete(admin: Admin, http: aiohttp.ClientSession, r: Relay) -> None:
    refused = await admin.call("DELETE", "/tenants/beta", expect=409)
    assert refused["error"] == "conflict" and "still has aliases" in refused["message"]
    deleted = await admin.call("DELETE", "/tenants/beta?cascade=true")
    assert deleted["aliases_freed"] == [PATTERN, ALIAS] and deleted["tokens_revoked"] == 1
    assert deleted["sessions_closed"] == 2
    assert await _agent_exit(r) == 3
    status, body, _ = await resolve(http, r, ALIAS)
    assert (status, body["error"]) == (404, "unknown_alias")
    await admin.call("GET", "/tenants/beta", expect=404)
    tokens = await admin.call("GET", "/tokens?tenant=beta")
    assert {t["status"] for t in tokens["tokens"]} == {"revoked"}


async def _check_audit(admin: Admin, first_token: str) -> None:
    entries = (await admin.call("GET", "/audit?limit=50"))["entries"]
    ids = [e["id"] for e in entries]
    assert ids == sorted(ids, reverse=True)  # newest first
    ours = [e for e in reversed(entries) if e["operator"] == "admin"]
    assert [e["action"] for e in ours] == [
        "tenant.create",
        "alias.assign",
        "alias.assign",
        "token.issue",
        "token.revoke",
        "token.issue",
        "tenant.suspend",
        "tenant.resume",
        "tenant.delete",
    ]
    assert all(e["remote"] == "127.0.0.1" and e["at"].endswith("Z") for e in ours)
    assert ours[0]["target"] == "beta" and ours[1]["target"] == ALIAS
    assert first_token not in json.dumps(entries)
    assert len((await admin.call("GET", "/audit?limit=2"))["entries"]) == 2


async def test_admin_requests_need_an_operator_token(tmp_path: Path) -> None:
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        admin = Admin(http, r)
        url = f"{admin.base}/tenants"
        async with http.get(url) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await resp.json())["error"] == "auth_failed"
        for headers in (
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Basic {admin.token}"},
        ):
            async with http.post(url, json={"id": "x"}, headers=headers) as resp:
                assert resp.status == 401 and (await resp.json())["error"] == "auth_failed"
        async with http.get(f"{admin.base}/nothing-here") as resp:
            assert resp.status == 401  # unauthenticated callers learn nothing about routes
        assert (await admin.raw("GET", "/nothing-here"))[:2] == (
            404,
            {"error": "not_found", "message": "Not Found"},
        )
        status, body, _ = await admin.raw("PUT", "/tenants")
        assert (status, body["error"]) == (405, "method_not_allowed")
        assert (await admin.call("GET", "/tenants"))["tenants"][0]["id"] == "acme"


async def test_admin_validation_errors(tmp_path: Path) -> None:
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        admin = Admin(http, r)
        bad = {"id": "Bad Id", "name": 3, "limits": {"max_sessions": -1}, "extra": 1}
        answer = await admin.call("POST", "/tenants", bad, expect=400)
        assert answer["error"] == "bad_request" and len(answer["problems"]) == 4
        assert answer["message"] == "the request has 4 problems"
        status, answer, _ = await admin.raw(
            "POST", "/tenants", data=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert status == 400 and answer["problems"][0].startswith("the body is not valid JSON")
        status, answer, _ = await admin.raw("POST", "/tenants", data=b"x" * 70_000)
        assert (status, answer["error"]) == (413, "payload_too_large")
        await admin.call("POST", "/tenants", {"id": "acme"}, expect=409)
        await admin.call("POST", "/tenants", {"id": "evil"}, expect=201)
        taken = await admin.call(
            "POST",
            "/tenants/evil/aliases",
            {"aliases": ["acme@example.com", "*@example.com"]},
            expect=409,
        )
        assert taken["error"] == "alias_taken" and len(taken["problems"]) == 2
        bad_aliases = await admin.call(
            "POST", "/tenants/evil/aliases", {"aliases": ["no good", 5]}, expect=400
        )
        assert len(bad_aliases["problems"]) == 2
        await admin.call("POST", "/tenants/ghost/aliases", {"aliases": ["g@x.org"]}, expect=404)
        await admin.call("DELETE", "/tenants/evil/aliases/acme@example.com", expect=404)
        issue = await admin.call("POST", "/tokens", {"aliases": [], "ttl": "soon"}, expect=400)
        assert len(issue["problems"]) == 3
        await admin.call("POST", "/tokens", {"tenant": "ghost", "aliases": ["g@x.org"]}, expect=404)
        await admin.call("GET", "/audit?limit=0", expect=400)
        await admin.call("DELETE", "/tenants/evil?cascade=maybe", expect=400)
        await admin.call("POST", f"/tokens/{'j' * 129}/revoke", expect=400)
        await admin.call("DELETE", "/sessions/no-such-session", expect=404)
        await admin.call("PATCH", "/tenants/evil", {"state": "paused"}, expect=400)


async def test_token_expiring_during_a_session_ends_it(tmp_path: Path) -> None:
    async with relay(tmp_path, start=False, csc=FAST) as r, aiohttp.ClientSession() as http:
        key, _ = load_or_create_signing_key(r.state_dir)
        # valid at connect (within the 30 s leeway), expired for good about 2 s later
        token = issue_token(
            key,
            tenant="acme",
            aliases=["acme@example.com"],
            ttl_seconds=3,
            audience="csc-agent",
            issuer="csc",
            now=time.time() - 31,
        )
        code, reason = await _hello_and_wait_close(http, r, token, timeout=8)
        assert code == 4401 and "token expired" in reason


async def test_disconnect_and_drain(tmp_path: Path) -> None:
    async with relay(tmp_path, agent={"sessions": 1}) as r, aiohttp.ClientSession() as http:
        admin = Admin(http, r)
        [session] = (await admin.call("GET", "/sessions"))["sessions"]
        answer = await admin.call("DELETE", f"/sessions/{session['id']}")
        assert answer == {"disconnected": session["id"], "tenant": "acme", "remote": "127.0.0.1"}
        # the agent reconnects: a new session
        await async_wait_until(
            lambda: r.node.state.sessions and session["id"] not in r.node.state.sessions,
            10,
            message="a new session",
        )
        assert not r.node.state.stop_requested.is_set()
        drained = await admin.call("POST", "/drain", expect=202)
        assert drained["draining"] and not drained["already_draining"]
        assert r.node.state.stop_requested.is_set()
        again = await admin.call("POST", "/drain", expect=202)
        assert again["already_draining"]
        actions = [e["action"] for e in (await admin.call("GET", "/audit"))["entries"]]
        assert actions[:2] == ["node.drain", "session.disconnect"]


@pytest.mark.parametrize("hello_aliases", [None, ["acme@example.com"]])
async def test_unassigned_alias_is_not_bound(
    tmp_path: Path, hello_aliases: list[str] | None
) -> None:
    """A token grant the tenant no longer holds: skipped when the agent asks for all its grants,
    refused (4403) when it asks for it by name."""
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        admin = Admin(http, r)
        await admin.call("POST", "/tenants/acme/aliases", {"aliases": ["ops@example.com"]})
        key, _ = load_or_create_signing_key(r.state_dir)
        token = issue_token(
            key,
            tenant="acme",
            aliases=["acme@example.com", "ops@example.com"],
            ttl_seconds=60,
            audience="csc-agent",
            issuer="csc",
        )
        await admin.call("DELETE", "/tenants/acme/aliases/acme@example.com")
        ws = await http.ws_connect(
            f"{r.csc_url}/v1/agent/connect", headers={"Authorization": f"Bearer {token}"}
        )
        conn = Connection(Side.CLIENT, LinkSettings(), accept_streams=True, now=0.0)
        conn.send_hello({"agent": "test", **({"aliases": hello_aliases} if hello_aliases else {})})
        await ws.send_bytes(b"".join(conn.data_to_send()))
        msg = await asyncio.wait_for(ws.receive(), scaled(10))
        if hello_aliases:
            assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 4403
            assert "not assigned to tenant acme" in msg.extra
        else:
            assert msg.type == aiohttp.WSMsgType.BINARY
            [session] = r.node.state.sessions.values()
            assert session.grants == ("ops@example.com",)
        await ws.close()
