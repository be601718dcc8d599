"""Helpers for tests of the admin API: an HTTP client with the operator token, and the
bootloader's views (resolve, TCP ``CONNECT``) that the admin changes affect."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from csc.store import ADMIN_TOKEN_FILE
from tests.support.inproc import Relay
from tests.support.procs import scaled


def admin_token(state_dir: Path) -> str:
    return (state_dir / ADMIN_TOKEN_FILE).read_text().strip()


class Admin:
    """Calls ``/v1/admin/...`` of an in-process node and checks the status of each answer."""

    def __init__(self, http: aiohttp.ClientSession, relay: Relay) -> None:
        assert relay.node.admin_address is not None
        self.http = http
        self.base = f"http://{relay.node.admin_address}/v1/admin"
        self.token = admin_token(relay.state_dir)

    async def raw(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
    ) -> tuple[int, Any, dict[str, str]]:
        sent = {"Authorization": f"Bearer {token or self.token}", **(headers or {})}
        async with self.http.request(
            method, self.base + path, json=body, data=data, headers=sent
        ) as resp:
            assert resp.content_type == "application/json", await resp.text()
            return resp.status, await resp.json(), dict(resp.headers)

    async def call(self, method: str, path: str, body: object = None, expect: int = 200) -> Any:
        status, answer, _ = await self.raw(method, path, body)
        assert status == expect, (method, path, status, answer)
        return answer


async def resolve(http: aiohttp.ClientSession, relay: Relay, alias: str) -> tuple[int, Any, str]:
    """Status, JSON body and ``Retry-After`` of ``GET /v1/resolve/{alias}``."""
    async with http.get(f"{relay.csc_url}/v1/resolve/{alias}") as resp:
        return resp.status, await resp.json(), resp.headers.get("Retry-After", "")


async def tcp_connect_line(relay: Relay, alias: str) -> bytes:
    """The first line the TCP ingress answers to ``CONNECT alias``."""
    host, port = relay.tcp_address
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"CONNECT {alias}\r\n".encode())
        return await asyncio.wait_for(reader.readline(), scaled(10))
    finally:
        writer.close()
