"""The HTTP tunnel over real loopback sockets: streaming, headers, errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import aiohttp

from shared import resolve_sig
from tests.support.inproc import ALIAS, relay
from tests.support.upstream import expected_sha256


async def test_get_through_tunnel(tmp_path: Path) -> None:
    async with relay(tmp_path) as r, aiohttp.ClientSession() as http:
        async with http.get(r.tunnel("/echo/hello?x=1"), headers={"X-Test": "yes"}) as resp:
            assert resp.status == 200
            body = await resp.json()
            assert "X-Request-Id" in resp.headers
        assert body["method"] == "GET"
        assert body["path"] == "/echo/hello"
        headers = {k.lower(): v for k, v in body["headers"]}
        assert headers["x-test"] == "yes"
        assert headers["x-forwarded-for"] == "127.0.0.1"
        assert headers["x-forwarded-proto"] == "http"
        assert headers["x-request-id"] == resp.headers["X-Request-Id"]


async def test_download_and_upload(tmp_path: Path) -> None:
    size = 20 * 1024 * 1024
    async with relay(tmp_path) as r, aiohttp.ClientSession() as http:
        async with http.get(r.tunnel(f"/bytes/{size}")) as resp:
            assert resp.status == 200
            assert resp.content_length == size
            digest = hashlib.sha256()
            async for chunk in resp.content.iter_any():
                digest.update(chunk)
        assert digest.hexdigest() == expected_sha256(size)
        payload = b"x" * (3 * 1024 * 1024 + 17)
        async with http.post(r.tunnel("/upload"), data=payload) as resp:
            assert resp.status == 200
            got = await resp.json()
        assert got == {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


async def test_resolve(tmp_path: Path) -> None:
    async with relay(tmp_path) as r, aiohttp.ClientSession() as http:
        async with http.get(f"{r.csc_url}/v1/resolve/ACME@Example.com") as resp:
            assert resp.status == 200
            body = await resp.json()
        # the fields of API 1 unchanged, plus the signed owner
        assert {k: body[k] for k in ("alias", "online", "tunnel")} == {
            "alias": ALIAS,
            "online": True,
            "tunnel": f"/t/{ALIAS}/",
        }
        assert body["tenant"] == {"name": "acme", "contact": ""}
        key = r.node.state.resolve_key
        assert key is not None
        assert resolve_sig.verify(
            key.public_key(), body["signature"], ALIAS, "acme", "", body["tunnel"]
        )
        async with http.get(f"{r.csc_url}/v1/resolve/nobody@example.org") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"] == "unknown_alias"
        async with http.get(f"{r.csc_url}/v1/resolve/bad alias!") as resp:
            assert resp.status == 400
            assert (await resp.json())["error"] == "bad_alias"
