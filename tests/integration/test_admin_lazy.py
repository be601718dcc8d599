"""The admin listener loads aiohttp and the admin application at its first connection
(csc/admin/listener.py): the connections that arrive meanwhile are served, not refused; a
failed load closes them and the next connection tries again; and a lone node at rest, with
an agent connected and its metrics scraped, has not loaded aiohttp at all."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from csc.admin import listener as admin_listener
from tests.support.admin import admin_token
from tests.support.inproc import relay
from tests.support.procs import (
    async_wait_until,
    issue_token,
    scaled,
    start_agent,
    start_csc,
    start_upstream,
    wait_alias_online,
)

ALIAS = "acme@example.com"


def _request(token: str) -> bytes:
    return (
        f"GET /v1/admin/tenants HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {token}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()


async def test_requests_that_arrive_while_the_api_loads_are_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = asyncio.Event()
    real = admin_listener._make_runner

    async def slow(state: Any) -> Any:
        await release.wait()
        return await real(state)

    monkeypatch.setattr(admin_listener, "_make_runner", slow)
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        admin = r.node.admin
        assert admin is not None and admin.runner is None  # nothing loaded before a connection
        token = admin_token(r.state_dir)
        host, port = admin.address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(_request(token))  # sent in full before the application exists
        await async_wait_until(lambda: any(bytes(c.data) == _request(token) for c in admin.held), 5)
        headers = {"Authorization": f"Bearer {token}"}
        second = asyncio.create_task(
            http.get(f"http://{admin.address}/v1/admin/tenants", headers=headers)
        )
        await async_wait_until(lambda: len(admin.held) == 2, 5)
        release.set()
        raw = await asyncio.wait_for(reader.read(), scaled(10))
        writer.close()
        assert raw.startswith(b"HTTP/1.1 200 OK\r\n"), raw[:200]
        assert [t["id"] for t in json.loads(raw.partition(b"\r\n\r\n")[2])["tenants"]] == ["acme"]
        async with await second as resp:
            assert resp.status == 200
        assert admin.runner is not None and not admin.held
        async with http.get(f"http://{admin.address}/console/") as resp:  # now aiohttp's own
            assert resp.status == 200


async def test_a_failed_load_closes_the_waiting_connections_and_the_next_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = admin_listener._make_runner
    failures = [RuntimeError("boom")]

    async def failing_once(state: Any) -> Any:
        if failures:
            raise failures.pop()
        return await real(state)

    monkeypatch.setattr(admin_listener, "_make_runner", failing_once)
    caplog.set_level(logging.ERROR, logger="csc.admin.listener")
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        admin = r.node.admin
        assert admin is not None
        token = admin_token(r.state_dir)
        host, port = admin.address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(_request(token))
        try:
            got = await asyncio.wait_for(reader.read(), scaled(10))
        except ConnectionResetError:
            got = b""
        writer.close()
        assert got == b""
        assert any("the admin API could not start" in rec.getMessage() for rec in caplog.records)
        headers = {"Authorization": f"Bearer {token}"}
        async with http.get(f"http://{admin.address}/v1/admin/tenants", headers=headers) as resp:
            assert resp.status == 200


async def test_a_node_stops_while_a_connection_waits_for_the_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def never(state: Any) -> Any:
        await asyncio.Event().wait()

    monkeypatch.setattr(admin_listener, "_make_runner", never)
    async with relay(tmp_path, start=False) as r:
        admin = r.node.admin
        assert admin is not None
        host, port = admin.address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /v1/admin/tenants HTTP/1.1\r\n")
        await async_wait_until(lambda: len(admin.held) == 1, 5)
    # the node stopped (no hang): the waiting connection was closed
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), scaled(5)) == b""
    writer.close()


def _maps_aiohttp(pid: int) -> bool:
    """Whether the process has mapped aiohttp's compiled modules (it imported aiohttp)."""
    return "/aiohttp/" in Path(f"/proc/{pid}/maps").read_text()


def test_a_lone_node_at_rest_has_not_loaded_aiohttp(tmp_path: Path) -> None:
    upstream = start_upstream(tmp_path, tcp_echo=False)
    csc = start_csc(tmp_path)
    agent = None
    try:
        token = issue_token(csc.state_dir, "acme", [ALIAS])
        agent = start_agent(csc.http_url, token, upstream.http_url, log_dir=tmp_path / "logs")
        wait_alias_online(csc.http_url, ALIAS)
        with urllib.request.urlopen(csc.metrics_url, timeout=scaled(10)) as resp:
            assert b"csc_agents_connected 1.0" in resp.read()
        assert not _maps_aiohttp(csc.pid)
        request = urllib.request.Request(
            csc.admin_url + "/v1/admin/tenants",
            headers={"Authorization": f"Bearer {admin_token(csc.state_dir)}"},
        )
        with urllib.request.urlopen(request, timeout=scaled(10)) as resp:
            assert [t["id"] for t in json.load(resp)["tenants"]] == ["acme"]
        assert _maps_aiohttp(csc.pid)  # the check above could see it
    finally:
        for proc in (agent, csc, upstream):
            if proc is not None:
                proc.stop()
