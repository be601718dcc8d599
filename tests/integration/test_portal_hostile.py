"""The portal against a hostile client, over real sockets: bounded JSON bodies and odd headers get
400/ignored (never 500), a full password-check queue answers 503 with ``Retry-After``, the
failure throttle keys a user by client address too, and a password change ends the user's
sessions."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from portal import store
from portal.config import PortalConfig
from portal.passwords import Passwords, Verdict
from tests.support.portal import (
    RunningPortal,
    logon_body,
    portal_config,
    post_logon,
    running_portal,
    seed,
)
from tests.support.procs import scaled


@pytest.fixture
def config(tmp_path: Path) -> PortalConfig:
    cfg = portal_config(tmp_path, throttle_address_failures=50)
    seed(cfg)
    return cfg


@pytest.fixture
async def portal(config: PortalConfig) -> AsyncIterator[RunningPortal]:
    async with running_portal(config) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 30_000 + b"]" * 30_000,
        b"[" * 60_000,
        b"[" * 100_000,
        b'{"user": ' + b"{" * 5_000 + b"}" * 5_000 + b"}",
        b'{"user": "' + b"a" * 20_000 + b'"}',
        b'{"user": ' + b"1" * 20_000 + b"}",
        b'{"user": "\\ud800", "password": "correct horse", "device_type": "x", "device_id": "d"}',
        b'{"user": "alice", "password": "\\udfff\\ud800", "device_type": "x", "device_id": "d"}',
        b'{"user": "alice", "password": "correct horse", "device_type": "\\ud800", '
        b'"device_id": "d"}',
        b'{"user": "al\\u0000ice", "password": "correct horse", "device_type": "x", '
        b'"device_id": "d"}',
    ],
    ids=[
        "deep",
        "deep-open",
        "deep-large",
        "deep-field",
        "long",
        "huge-int",
        "sur-user",
        "sur-pw",
        "sur-dt",
        "nul",
    ],
)
async def test_hostile_json_is_a_400_with_the_error_shape(
    portal: RunningPortal, http: aiohttp.ClientSession, body: bytes
) -> None:
    status, headers, data = await post_logon(http, portal, body)
    assert status == 400, data
    assert set(data) == {"error", "message"} and data["error"] == "bad_request"
    assert headers["Content-Type"].startswith("application/json")
    assert "Traceback" not in data["message"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Range": "bytes=" + "9" * 4000 + "-"},
        {"Range": "bytes=-" + "9" * 4000},
        {"Range": "bytes=\u0661\u0662-"},
        {"If-Range": "x" * 4000, "Range": "bytes=0-"},
        {"Authorization": "Bearer " + "a" * 6000},
        {"X-Forwarded-For": ("1.2.3.4, " * 700) + "::ffff:999.1.1.1"},
        {"X-Request-Id": "\u00e9" * 100},
        {"X-Forwarded-Prefix": "/t/x", "X-Forwarded-Host": "h", "X-CSC-Resolve-Key": "=" * 4000},
    ],
)
async def test_hostile_headers_never_make_a_500(
    portal: RunningPortal, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    url = f"{portal.url}/v1/package/{'0' * 64}"
    for target in (url, f"{portal.url}/v1/portal", f"{portal.url}/get/"):
        async with http.get(target, headers=headers) as resp:
            assert resp.status < 500, (target, resp.status, await resp.text())
            assert resp.headers["X-Request-Id"]


async def test_a_full_password_check_queue_answers_503_with_retry_after(
    tmp_path: Path, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = portal_config(tmp_path, hash_workers=1, hash_queue=1)
    seed(config)
    release = threading.Event()
    real_verify = Passwords.verify

    def slow_verify(self: Passwords, stored: str, password: str) -> Verdict:
        release.wait(scaled(30.0))
        return real_verify(self, stored, password)

    monkeypatch.setattr(Passwords, "verify", slow_verify)
    async with running_portal(config) as portal:
        first = asyncio.create_task(post_logon(http, portal, logon_body()))
        second = asyncio.create_task(post_logon(http, portal, logon_body(user="bob")))
        deadline = asyncio.get_running_loop().time() + scaled(10.0)
        while len(portal.state.hash_gate) < 2:  # one verifying, one waiting
            assert asyncio.get_running_loop().time() < deadline, "the logons never queued"
            await asyncio.sleep(0.01)
        status, headers, data = await post_logon(http, portal, logon_body())
        assert (status, data["error"]) == (503, "busy")
        assert int(headers["Retry-After"]) >= 1
        release.set()
        assert (await first)[0] == 200 and (await second)[0] == 200
        assert len(portal.state.hash_gate) == 0
        assert (await post_logon(http, portal, logon_body()))[0] == 200


def test_the_queue_default_follows_the_worker_count(tmp_path: Path) -> None:
    assert portal_config(tmp_path, hash_workers=3).hash_queue_limit == 3 * 16
    assert portal_config(tmp_path, hash_workers=3, hash_queue=5).hash_queue_limit == 5


async def test_a_user_locked_out_from_one_address_still_logs_on_from_another(
    portal: RunningPortal, http: aiohttp.ClientSession
) -> None:
    attacker = {"X-Forwarded-For": "203.0.113.7"}
    for _ in range(5):
        status, _, _ = await post_logon(
            http, portal, logon_body(password="wrong password"), **attacker
        )
        assert status == 401
    status, headers, data = await post_logon(http, portal, logon_body(), **attacker)
    assert (status, data["error"]) == (429, "too_many_attempts") and headers["Retry-After"]
    owner = {"X-Forwarded-For": "198.51.100.20"}
    assert (await post_logon(http, portal, logon_body(), **owner))[0] == 200
    assert (await post_logon(http, portal, logon_body(), **attacker))[
        0
    ] == 429  # still locked there


async def test_a_password_change_ends_the_users_sessions(
    portal: RunningPortal, http: aiohttp.ClientSession
) -> None:
    status, _, alice = await post_logon(http, portal, logon_body())
    assert status == 200
    status, _, bob = await post_logon(http, portal, logon_body(user="bob"))
    assert status == 200

    async def download(logon: dict[str, Any]) -> int:
        headers = {"Authorization": f"Bearer {logon['session']}"}
        async with http.get(f"{portal.url}/{logon['package']['url']}", headers=headers) as resp:
            await resp.read()
            return resp.status

    assert await download(alice) == 200
    new_hash = Passwords("test").hash("a brand new password")
    with portal.state.db.connect() as conn:
        store.set_password_hash(conn, "alice", new_hash)
    assert await download(alice) == 401
    assert await download(bob) == 200  # other users keep theirs
    status, _, again = await post_logon(http, portal, logon_body(password="a brand new password"))
    assert status == 200 and await download(again) == 200
    with portal.state.db.connect() as conn:
        store.remove_user(conn, "bob")
    assert await download(bob) == 401


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /v1/portal HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"s" * 9000 + b"\r\n\r\n",
        b"GET /v1/portal?" + b"a=1&" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/logon HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 30 + b"\r\n\r\n",
        b"POST /v1/logon HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=["long-header", "long-query", "content-length", "chunk-size"],
)
async def test_malformed_http_is_a_400_and_one_log_line_without_traceback(
    portal: RunningPortal, caplog: pytest.LogCaptureFixture, request_bytes: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    host, port = portal.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request_bytes)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n"), scaled(10.0))
    finally:
        writer.close()
    assert head.split()[1] == b"400"
    deadline = asyncio.get_running_loop().time() + scaled(10.0)
    while not any("malformed HTTP request" in r.getMessage() for r in caplog.records):
        assert asyncio.get_running_loop().time() < deadline, "no log line"
        await asyncio.sleep(0.01)
    for record in caplog.records:
        assert record.exc_info is None and record.levelno < logging.ERROR, record.getMessage()
        assert "sss" not in record.getMessage() and "a=1&a=1" not in record.getMessage()
