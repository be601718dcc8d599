"""The console's side of the admin listener over real sockets: its files without a token and
with the security headers, nothing else reachable without one, and the API it reads (recent
errors, node status, aliases with their online state)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from csc.admin.console import ASSETS, CONTENT_SECURITY_POLICY
from csc.admin.errorlog import DEFAULT_CAPACITY
from tests.support.admin import Admin, tcp_connect_line
from tests.support.inproc import ALIAS, Relay, relay
from tests.support.procs import async_wait_until, scaled

SECURITY = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}


def _console(r: Relay, path: str = "") -> str:
    return f"http://{r.node.admin_address}/console/{path}"


def _assert_secure(headers: Any) -> None:
    for name, value in SECURITY.items():
        assert headers.get(name) == value, (name, headers.get(name))
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert "unsafe-inline" not in headers["Content-Security-Policy"]


async def _raw_get(address: str, target: str) -> bytes:
    """The status line the admin listener answers to ``GET target`` sent byte for byte."""
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return await asyncio.wait_for(reader.readline(), scaled(10))
    finally:
        writer.close()


async def test_console_files_need_no_token_and_carry_security_headers(tmp_path: Path) -> None:
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        for name, content_type in ASSETS.items():
            path = "" if name == "index.html" else name
            async with http.get(_console(r, path)) as resp:
                assert resp.status == 200, name
                assert resp.headers["Content-Type"] == content_type
                _assert_secure(resp.headers)
                assert len(await resp.read()) > 100
        async with http.get(_console(r)) as resp:
            page = await resp.text()
        assert '<script src="console.js"' in page and "<title>CSC console</title>" in page
        async with http.head(_console(r)) as resp:
            assert resp.status == 200
            _assert_secure(resp.headers)
        async with http.get(_console(r).rstrip("/"), allow_redirects=False) as resp:
            assert (resp.status, resp.headers["Location"]) == (301, "/console/")
            _assert_secure(resp.headers)
        for missing in ("nope.js", "..%2Fadmin-token", "static/index.html"):
            async with http.get(_console(r, missing)) as resp:
                assert resp.status == 404, missing
                assert (await resp.json())["error"] == "not_found"
                _assert_secure(resp.headers)
        async with http.post(_console(r), data=b"x") as resp:
            assert resp.status == 405
            _assert_secure(resp.headers)


async def test_only_the_console_is_open_without_a_token(tmp_path: Path) -> None:
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        base = f"http://{r.node.admin_address}"
        for path in ("/v1/admin/node", "/v1/admin/errors", "/consolex", "/favicon.ico"):
            async with http.get(base + path) as resp:
                assert resp.status == 401, path
                assert "Content-Security-Policy" not in resp.headers
        # dot segments cannot walk from the console into the API
        for target in (
            "/console/../v1/admin/tenants",
            "/console/%2e%2e/v1/admin/tenants",
            "/console/..%2Fv1%2Fadmin%2Ftenants",
        ):
            line = await _raw_get(r.node.admin_address or "", target)
            assert line.split()[1] in (b"401", b"404"), (target, line)


async def test_recent_errors_of_every_ingress(tmp_path: Path) -> None:
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        admin = Admin(http, r)
        request_ids: list[str] = []
        for url in (
            f"{r.csc_url}/v1/resolve/nobody@example.com",
            f"{r.csc_url}/v1/resolve/{ALIAS}",
            f"{r.csc_url}/t/nobody@example.com/x",
            f"{r.csc_url}/t/bad%20alias!/x",
        ):
            async with http.get(url, headers={"X-Request-Id": f"req-{len(request_ids)}"}) as resp:
                assert resp.status >= 400
                request_ids.append(resp.headers["X-Request-Id"])
        assert request_ids == ["req-0", "req-1", "req-2", "req-3"]
        assert (await tcp_connect_line(r, "nobody@example.com")).startswith(b"ERR 404 ")
        assert (await tcp_connect_line(r, ALIAS)).startswith(b"ERR 503 ")

        answer = await admin.call("GET", "/errors")
        assert answer["node"] == r.node.state.node_id
        assert (answer["capacity"], answer["total"]) == (DEFAULT_CAPACITY, 6)
        seen = [
            (e["seq"], e["kind"], e["error"], e["status"], e["tenant"]) for e in answer["errors"]
        ]
        assert seen == [
            (6, "tcp", "portal_offline", 503, "acme"),
            (5, "tcp", "unknown_alias", 404, None),
            (4, "http", "bad_alias", 400, None),
            (3, "http", "unknown_alias", 404, None),
            (2, "resolve", "portal_offline", 503, "acme"),
            (1, "resolve", "unknown_alias", 404, None),
        ]
        http_ids = [e["request_id"] for e in reversed(answer["errors"]) if e["kind"] != "tcp"]
        assert http_ids == request_ids
        tcp_ids = {e["request_id"] for e in answer["errors"] if e["kind"] == "tcp"}
        assert len(tcp_ids) == 2 and all(len(i) == 32 for i in tcp_ids)
        first = answer["errors"][-1]
        assert first["at"].endswith("Z")
        assert first["message"] == "no tenant serves the alias nobody@example.com"
        assert "127.0.0.1" not in json.dumps(answer)  # no client address is kept

        limited = await admin.call("GET", "/errors?limit=2")
        assert [e["seq"] for e in limited["errors"]] == [6, 5] and limited["total"] == 6
        acme = await admin.call("GET", "/errors?tenant=acme")
        assert [e["seq"] for e in acme["errors"]] == [6, 2]
        for bad in ("limit=0", "limit=1001", "limit=x"):
            refused = await admin.call("GET", f"/errors?{bad}", expect=400)
            assert refused["problems"] == ["query limit: expected a whole number from 1 to 1000"]
        status, body, _ = await admin.raw("GET", "/errors", token="wrong")
        assert (status, body["error"]) == (401, "auth_failed")
        node = await admin.call("GET", "/node")
        assert node.pop("tasks") > 0  # this process's asyncio tasks: the test's own too
        assert node == {
            "node": r.node.state.node_id,
            "draining": False,
            "sessions": 0,
            "streams": 0,
            "errors_total": 6,
        }


async def test_aliases_online_state_and_node_status(tmp_path: Path) -> None:
    async with relay(tmp_path, agent={"sessions": 2}) as r, aiohttp.ClientSession() as http:
        admin = Admin(http, r)
        await admin.call("POST", "/tenants/acme/aliases", {"aliases": ["spare@example.com"]})
        await async_wait_until(lambda: len(r.node.state.sessions) == 2, 10, message="2 sessions")
        rows = {a["alias"]: a for a in (await admin.call("GET", "/aliases"))["aliases"]}
        assert (rows[ALIAS]["online"], rows[ALIAS]["sessions"]) == (True, 2)
        # assigned after the agent connected, so no session serves it
        assert (rows["spare@example.com"]["online"], rows["spare@example.com"]["sessions"]) == (
            False,
            0,
        )
        node = await admin.call("GET", "/node")
        assert (node["sessions"], node["draining"]) == (2, False)

        await r.stop_agent()

        async def offline() -> bool:
            listed = (await admin.call("GET", "/aliases?tenant=acme"))["aliases"]
            row = {a["alias"]: a for a in listed}[ALIAS]
            return not row["online"] and row["sessions"] == 0

        await async_wait_until(offline, 10, message=f"{ALIAS} offline")
        await admin.call("POST", "/drain", expect=202)
        node = await admin.call("GET", "/node")
        assert (node["sessions"], node["draining"]) == (0, True)
