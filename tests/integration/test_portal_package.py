"""``GET|HEAD v1/package/{id}`` over real sockets: the session grants only its own package;
Content-Length, ETag, Range/If-Range (206), 416, HEAD; 50 simultaneous logons build one package
once; the get site's routes."""

from __future__ import annotations

import asyncio
import hashlib
import io
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from portal.config import PortalConfig
from tests.support.portal import (
    DEVICE,
    OTHER_DEVICE,
    PASSWORD,
    RunningPortal,
    add_app,
    fake_bootloader,
    portal_config,
    running_portal,
    seed,
)


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def config(tmp_path: Path) -> PortalConfig:
    cfg = portal_config(tmp_path)
    seed(cfg)
    return cfg


@pytest.fixture
async def portal(config: PortalConfig, tmp_path: Path) -> AsyncIterator[RunningPortal]:
    async with running_portal(config, bootloader_dir=fake_bootloader(tmp_path / "bl")) as p:
        p.state.clock = Clock()
        yield p


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _logon(
    http: aiohttp.ClientSession,
    portal: RunningPortal,
    user: str = "alice",
    device_type: str = DEVICE,
    device_id: str = "dev-1",
) -> dict[str, Any]:
    body = {"user": user, "password": PASSWORD, "device_type": device_type, "device_id": device_id}
    async with http.post(f"{portal.url}/v1/logon", json=body) as resp:
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = await resp.json()
        return data


async def _get(
    http: aiohttp.ClientSession, url: str, token: str | None, method: str = "GET", **headers: str
) -> tuple[int, Any, bytes]:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with http.request(method, url, headers=headers) as resp:
        return resp.status, resp.headers.copy(), await resp.read()


async def test_full_download_is_the_signed_package(
    portal: RunningPortal, http: aiohttp.ClientSession
) -> None:
    logon = await _logon(http, portal)
    package = logon["package"]
    status, headers, body = await _get(http, f"{portal.url}/{package['url']}", logon["session"])
    assert status == 200
    assert int(headers["Content-Length"]) == len(body) == package["size"]
    assert headers["ETag"] == package["etag"]
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["Content-Type"] == "application/zip"
    assert hashlib.sha256(body).hexdigest() == package["id"]
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        assert zf.namelist() == ["files/client/bin/run", "manifest.json", "manifest.sig"]


async def test_ranges_if_range_416_and_head(
    portal: RunningPortal, http: aiohttp.ClientSession
) -> None:
    logon = await _logon(http, portal)
    url, token, package = (
        f"{portal.url}/{logon['package']['url']}",
        logon["session"],
        logon["package"],
    )
    size, etag = package["size"], package["etag"]
    _, _, whole = await _get(http, url, token)
    status, headers, body = await _get(http, url, token, Range="bytes=100-")
    assert status == 206
    assert headers["Content-Range"] == f"bytes 100-{size - 1}/{size}"
    assert int(headers["Content-Length"]) == size - 100 and body == whole[100:]
    status, headers, body = await _get(http, url, token, Range="bytes=100-", **{"If-Range": etag})
    assert (status, body) == (206, whole[100:])
    status, _, body = await _get(http, url, token, Range="bytes=100-", **{"If-Range": '"old"'})
    assert (status, body) == (200, whole)  # the package changed: start over
    status, _, body = await _get(http, url, token, Range="bytes=-10")
    assert (status, body) == (206, whole[-10:])
    status, headers, body = await _get(http, url, token, Range=f"bytes={size}-")
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{size}"
    status, headers, body = await _get(http, url, token, "HEAD")
    assert (status, body) == (200, b"")
    assert int(headers["Content-Length"]) == size and headers["ETag"] == etag
    status, headers, body = await _get(http, url, token, "HEAD", Range="bytes=10-")
    assert (status, body, headers["Content-Range"]) == (206, b"", f"bytes 10-{size - 1}/{size}")


async def test_the_session_grants_only_its_own_package(
    portal: RunningPortal, http: aiohttp.ClientSession
) -> None:
    alice = await _logon(http, portal)
    bob = await _logon(http, portal, user="bob")
    assert alice["package"]["id"] != bob["package"]["id"]
    bob_url = f"{portal.url}/{bob['package']['url']}"
    status, _, body = await _get(http, bob_url, alice["session"])
    assert status == 404 and b"unknown_package" in body
    for token in (None, "", "not-a-session", alice["session"] + "x"):
        status, headers, body = await _get(http, bob_url, token)
        assert status == 401 and b"session_invalid" in body
        assert headers["WWW-Authenticate"] == "Bearer"
    status, _, _ = await _get(http, f"{portal.url}/v1/package/{'0' * 64}", bob["session"])
    assert status == 404
    status, _, _ = await _get(http, f"{portal.url}/v1/package/not-hex", bob["session"])
    assert status == 404


async def test_an_expired_session_is_refused(
    portal: RunningPortal, http: aiohttp.ClientSession
) -> None:
    logon = await _logon(http, portal)
    url = f"{portal.url}/{logon['package']['url']}"
    clock = portal.state.clock
    assert isinstance(clock, Clock)
    clock.now += 899
    assert (await _get(http, url, logon["session"], "HEAD"))[0] == 200
    clock.now += 2
    status, _, _ = await _get(http, url, logon["session"], "HEAD")
    assert status == 401


async def test_fifty_logons_at_once_build_one_package_once(
    portal: RunningPortal, http: aiohttp.ClientSession
) -> None:
    results = await asyncio.gather(*(_logon(http, portal, device_id=f"dev-{i}") for i in range(50)))
    ids = {r["package"]["id"] for r in results}
    assert len(ids) == 1
    assert portal.state.builder.builds == 1
    assert len({r["session"] for r in results}) == 50
    assert len(list(portal.state.builder.directory.glob("*.zip"))) == 1
    again = await _logon(http, portal, device_id="dev-late")
    assert again["package"]["id"] in ids and portal.state.builder.builds == 1


async def test_a_new_version_gives_a_new_package(
    portal: RunningPortal, config: PortalConfig, http: aiohttp.ClientSession
) -> None:
    first = await _logon(http, portal)
    add_app(portal.state.db, config.state_dir, "client", "5.2.0", DEVICE, {"bin/run": b"v5.2"})
    second = await _logon(http, portal)
    assert first["package"]["id"] != second["package"]["id"]
    other = await _logon(http, portal, device_type=OTHER_DEVICE)
    assert other["package"]["id"] not in (first["package"]["id"], second["package"]["id"])
    # the first session still downloads its own (older) package
    status, _, body = await _get(http, f"{portal.url}/{first['package']['url']}", first["session"])
    assert status == 200 and hashlib.sha256(body).hexdigest() == first["package"]["id"]


async def test_get_site_routes(portal: RunningPortal, http: aiohttp.ClientSession) -> None:
    status, headers, body = await _get(http, f"{portal.url}/get/", None)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'href="android-arm64/"' in body and b"Acme Ltd" in body
    status, _, body = await _get(http, f"{portal.url}/get/win-x64/", None)
    assert status == 200 and b'href="../csc-bootloader.pyz"' in body
    status, _, body = await _get(http, f"{portal.url}/get/toaster/", None)
    assert status == 404 and b"android-arm64" in body
    status, headers, body = await _get(http, f"{portal.url}/get/csc-bootloader.pyz", None)
    assert status == 200 and body.startswith(b"#!/usr/bin/env python3\n")
    assert "attachment" in headers["Content-Disposition"]
    async with http.get(f"{portal.url}/get/win-x64", allow_redirects=False) as resp:
        assert (resp.status, resp.headers["Location"]) == (301, "win-x64/")
    async with http.get(f"{portal.url}/get", allow_redirects=False) as resp:
        assert (resp.status, resp.headers["Location"]) == (301, "get/")


async def test_bootloader_download_unavailable_is_a_503(
    tmp_path: Path, config: PortalConfig, http: aiohttp.ClientSession
) -> None:
    empty = tmp_path / "empty" / "bootloader"
    empty.mkdir(parents=True)
    async with running_portal(config, bootloader_dir=empty) as portal:
        status, _, body = await _get(http, f"{portal.url}/get/csc-bootloader.pyz", None)
        assert status == 503 and b"bootloader_unavailable" in body
        assert (await _get(http, f"{portal.url}/get/", None))[0] == 200
