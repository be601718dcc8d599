"""``POST v1/logon`` and ``GET v1/portal`` over real sockets: 200/400/401/404/429, throttling per
user and per client address (X-Forwarded-For from trusted proxies only), request ids, and no
secret in the logs."""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from portal import store
from portal.config import PortalConfig
from portal.passwords import Passwords, Verdict
from tests.support.portal import (
    DEVICE,
    PASSWORD,
    RunningPortal,
    logon_body,
    portal_config,
    post_logon,
    running_portal,
    seed,
)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def config(tmp_path: Path) -> PortalConfig:
    cfg = portal_config(tmp_path, throttle_address_failures=11)
    seed(cfg)
    return cfg


@pytest.fixture
async def portal(config: PortalConfig) -> AsyncIterator[RunningPortal]:
    async with running_portal(config) as running:
        running.state.clock = Clock()
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_portal_info(portal: RunningPortal, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{portal.url}/v1/portal") as resp:
        assert resp.status == 200
        data = await resp.json()
    raw = base64.b64decode(data["key"])
    assert len(raw) == 32
    assert data == {
        "api": 1,
        "name": "Acme Ltd",
        "key": data["key"],
        "fingerprint": hashlib.sha256(raw).digest()[:8].hex(),
        "device_types": ["android-arm64", "win-x64"],
    }
    async with http.get(f"{portal.url}/healthz") as resp:
        assert (resp.status, await resp.json()) == (200, {"status": "ok"})


async def test_logon_ok_records_the_device(
    portal: RunningPortal, http: aiohttp.ClientSession
) -> None:
    status, headers, data = await post_logon(http, portal, logon_body(user="Alice"))
    assert status == 200, data
    assert headers["Cache-Control"] == "no-store"
    assert data["expires_in"] == 900 and len(data["session"]) >= 40
    package = data["package"]
    assert set(package) == {"id", "url", "size", "sha256", "etag"}
    assert package["url"] == f"v1/package/{package['id']}"
    assert package["sha256"] == package["id"] and package["etag"] == f'"{package["id"]}"'
    path = portal.state.builder.path_of(package["id"])
    assert hashlib.sha256(path.read_bytes()).hexdigest() == package["id"]
    assert path.stat().st_size == package["size"]
    with portal.state.db.connect() as conn:
        [device] = store.list_devices(conn)
    assert (device.device_id, device.user, device.device_type) == ("dev-1", "alice", DEVICE)
    assert (device.last_package, device.last_address) == (package["id"], "127.0.0.1")


async def test_wrong_password_and_unknown_user_look_the_same(
    portal: RunningPortal, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    verified: list[str] = []
    real = Passwords.verify

    def counting(self: Passwords, stored: str, password: str) -> Verdict:
        verified.append(stored)
        return real(self, stored, password)

    monkeypatch.setattr(Passwords, "verify", counting)
    wrong = await post_logon(http, portal, logon_body(password="not the password"))
    unknown = await post_logon(http, portal, logon_body(user="mallory"))
    invalid = await post_logon(http, portal, logon_body(user="not a valid name!"))
    expected = {"error": "logon_failed", "message": "the user name or the password is wrong"}
    for status, _, body in (wrong, unknown, invalid):
        assert (status, body) == (401, expected)
    assert len(verified) == 3  # each one cost exactly one argon2 verification


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"user": "alice"}',
        {"user": "alice", "password": PASSWORD, "device_type": DEVICE},
        logon_body(device_id="x" * 129),
        logon_body(device_id="dev\x1b[31m"),
        logon_body(password=123),
        logon_body(user=""),
        b"\xff\xfe",
        b"{" + b" " * 70_000 + b"}",
    ],
)
async def test_bad_requests(portal: RunningPortal, http: aiohttp.ClientSession, body: Any) -> None:
    status, _, data = await post_logon(http, portal, body)
    assert status == 400
    assert data["error"] == "bad_request" and data["message"]


async def test_unknown_device_type_after_good_credentials(
    portal: RunningPortal, http: aiohttp.ClientSession
) -> None:
    status, _, data = await post_logon(http, portal, logon_body(device_type="toaster"))
    assert status == 404
    assert data["error"] == "unknown_device_type"
    assert "android-arm64" in data["message"] and "win-x64" in data["message"]
    status, _, data = await post_logon(
        http, portal, logon_body(device_type="toaster", password="nope")
    )
    assert status == 401  # bad credentials say nothing about device types


async def test_user_lockout_grows_and_spares_other_users(
    portal: RunningPortal, http: aiohttp.ClientSession
) -> None:
    clock = portal.state.clock
    assert isinstance(clock, Clock)
    for _ in range(5):
        assert (await post_logon(http, portal, logon_body(password="wrong password")))[0] == 401
    status, headers, data = await post_logon(
        http, portal, logon_body()
    )  # the right one: still locked
    assert (status, data["error"], headers["Retry-After"]) == (429, "too_many_attempts", "60")
    assert (await post_logon(http, portal, logon_body(user="bob")))[
        0
    ] == 200  # same address, other user
    clock.now += 61
    for _ in range(5):
        assert (await post_logon(http, portal, logon_body(password="wrong password")))[0] == 401
    status, headers, _ = await post_logon(http, portal, logon_body())
    assert (status, headers["Retry-After"]) == (429, "120")  # the second lockout is longer
    clock.now += 121
    assert (await post_logon(http, portal, logon_body()))[0] == 200


async def test_address_lockout_uses_x_forwarded_for_from_trusted_peers(
    portal: RunningPortal, http: aiohttp.ClientSession
) -> None:
    attacker = {"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}  # rightmost counts
    for i in range(11):
        assert (await post_logon(http, portal, logon_body(user=f"guess{i}"), **attacker))[0] == 401
    status, headers, _ = await post_logon(http, portal, logon_body(), **attacker)
    assert status == 429 and int(headers["Retry-After"]) == 60
    spoofed_left = {"X-Forwarded-For": "203.0.113.7, 192.0.2.55"}
    assert (await post_logon(http, portal, logon_body(), **spoofed_left))[0] == 200
    assert (await post_logon(http, portal, logon_body()))[
        0
    ] == 200  # the proxy itself is not locked


async def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    config = portal_config(tmp_path, throttle_address_failures=3, trusted_proxies=["10.9.9.9"])
    seed(config)
    async with running_portal(config) as portal:
        for i in range(3):
            forged = {"X-Forwarded-For": f"192.0.2.{i}"}
            assert (await post_logon(http, portal, logon_body(user=f"u{i}"), **forged))[0] == 401
        assert (await post_logon(http, portal, logon_body(), **{"X-Forwarded-For": "192.0.2.99"}))[
            0
        ] == 429


async def test_request_ids_are_echoed_or_made(
    portal: RunningPortal, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{portal.url}/v1/portal", headers={"X-Request-Id": "abc-123"}) as resp:
        assert resp.headers["X-Request-Id"] == "abc-123"
    async with http.get(f"{portal.url}/nowhere", headers={"X-Request-Id": "bad id\t!"}) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == "not_found"
        made = resp.headers["X-Request-Id"]
        assert len(made) == 32 and made != "bad id\t!"
    _, headers, _ = await post_logon(http, portal, b"junk")
    assert len(headers["X-Request-Id"]) == 32
    async with http.put(f"{portal.url}/v1/logon") as resp:
        assert resp.status == 405 and (await resp.json())["error"] == "method_not_allowed"


async def test_logs_carry_request_ids_but_no_secrets(
    portal: RunningPortal, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    status, _, data = await post_logon(http, portal, logon_body(), **{"X-Request-Id": "req-42"})
    assert status == 200
    token = data["session"]
    url = f"{portal.url}/{data['package']['url']}"
    async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200
        await resp.read()
    await post_logon(http, portal, logon_body(password="wrong secret password"))
    text = caplog.text + "".join(repr(r.__dict__) for r in caplog.records)
    assert PASSWORD not in text and "wrong secret password" not in text
    assert token not in text
    assert any(getattr(r, "request_id", None) == "req-42" for r in caplog.records)
    statuses = [getattr(r, "status", None) for r in caplog.records]
    assert 200 in statuses and 401 in statuses


async def test_outdated_password_hash_is_upgraded_on_logon(
    config: PortalConfig, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    with_cost = PortalConfig(**{**config.__dict__, "password_hash_cost": "standard"})
    async with running_portal(with_cost) as portal:
        with portal.state.db.connect() as conn:
            before = store.credentials(conn, "alice")
        assert (await post_logon(http, portal, logon_body()))[0] == 200
        with portal.state.db.connect() as conn:
            after = store.credentials(conn, "alice")
    assert before is not None and after is not None
    assert "m=256" in before.password_hash and "m=65536" in after.password_hash
