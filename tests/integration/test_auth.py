"""Agent authentication at ``/v1/agent/connect``: bad tokens, alias grants, several sessions.

A refused upgrade is HTTP 401 with the JSON error ``auth_failed``, and the CSC logs the precise
reason (bad signature, expired, wrong audience, algorithm not allowed, ...). An alias the token does not cover is
refused after HELLO with the WebSocket close code 4403. One tenant may bind the same alias from
several sessions, and the CSC spreads requests over them. The real agent, given a token the CSC
refuses, stops with exit status 3 and says why.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.protocol import Connection, LinkSettings, Side, WelcomeReceived
from shared.tokens import PUBLIC_KEY_FILE, issue_token, load_or_create_signing_key
from tests.support.inproc import ALIAS, Relay, relay
from tests.support.procs import ProcFactory, UpstreamProc, async_wait_until, scaled
from tests.support.procs import issue_token as cli_issue_token

TENANT = "acme"
AUDIENCE = "csc-agent"
ISSUER = "csc"


# --- token forgery helpers -----------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _segment(obj: Mapping[str, Any]) -> str:
    return _b64(json.dumps(obj, separators=(",", ":")).encode())


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": TENANT,
        "tenant": TENANT,
        "aliases": [ALIAS],
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "jti": "test-jti-0001",
    }
    claims.update(over)
    return claims


def _forged(state_dir: Path) -> str:
    """Well-formed claims, signed by an Ed25519 key the CSC does not know."""
    return issue_token(
        Ed25519PrivateKey.generate(),
        tenant=TENANT,
        aliases=[ALIAS],
        ttl_seconds=3600,
        audience=AUDIENCE,
        issuer=ISSUER,
    )


def _expired(state_dir: Path) -> str:
    key, _ = load_or_create_signing_key(state_dir)
    return issue_token(
        key,
        tenant=TENANT,
        aliases=[ALIAS],
        ttl_seconds=60,
        audience=AUDIENCE,
        issuer=ISSUER,
        now=time.time() - 3600,  # expired an hour minus a minute ago: far beyond any leeway
    )


def _wrong_audience(state_dir: Path) -> str:
    key, _ = load_or_create_signing_key(state_dir)
    return issue_token(
        key,
        tenant=TENANT,
        aliases=[ALIAS],
        ttl_seconds=3600,
        audience="some-other-service",
        issuer=ISSUER,
    )


def _alg_none(state_dir: Path) -> str:
    return f"{_segment({'alg': 'none', 'typ': 'JWT'})}.{_segment(_claims())}."


def _kid_null(state_dir: Path) -> str:
    """A header member PyJWT refuses with its base InvalidTokenError (the token is anonymous:
    no key signed it)."""
    return f"{_segment({'alg': 'EdDSA', 'kid': None})}.{_segment(_claims())}.c2ln"


def _hs256_with_public_key(state_dir: Path) -> str:
    """The key-confusion attack: HMAC keyed with the CSC's public key PEM (public knowledge)."""
    pem = (state_dir / PUBLIC_KEY_FILE).read_bytes()
    key, _ = load_or_create_signing_key(state_dir)
    assert pem == key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = f"{_segment({'alg': 'HS256', 'typ': 'JWT'})}.{_segment(_claims())}"
    signature = hmac.new(pem, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


# --- helpers -------------------------------------------------------------------------------


def _connect_url(r: Relay) -> str:
    return f"{r.csc_url}/v1/agent/connect"


_UPGRADE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode(),
}


async def _assert_refused(
    http: aiohttp.ClientSession,
    url: str,
    headers: Mapping[str, str],
    caplog: pytest.LogCaptureFixture,
    reason: str,
) -> None:
    """The upgrade is refused with 401 ``auth_failed`` and the CSC logs ``reason``."""
    caplog.clear()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(url, headers=headers)
    assert refused.value.status == 401
    # The same request as a plain upgrade GET, to read the JSON body of the refusal.
    async with http.get(url, headers={**_UPGRADE, **headers}) as resp:
        assert resp.status == 401
        assert resp.content_type == "application/json"
        body = await resp.json()
    assert body["error"] == "auth_failed"
    assert isinstance(body.get("message"), str) and body["message"]
    logged = [r.getMessage() for r in caplog.records if r.name == "csc.relay.gateway"]
    assert any("refused" in m and reason in m for m in logged), logged


def _hello(aliases: list[str] | None = None) -> bytes:
    conn = Connection(Side.CLIENT, LinkSettings(), accept_streams=True, now=0.0)
    info: dict[str, Any] = {"agent": "test-agent/0"}
    if aliases is not None:
        info["aliases"] = aliases
    conn.send_hello(info)
    return b"".join(conn.data_to_send())


# --- bad tokens ----------------------------------------------------------------------------

BAD_TOKENS: dict[str, tuple[Callable[[Path], str], str]] = {
    "forged": (_forged, "bad signature"),
    "expired": (_expired, "token expired"),
    "wrong_audience": (_wrong_audience, "wrong audience"),
    "alg_none": (_alg_none, "algorithm 'none' not allowed"),
    "kid_null": (_kid_null, "malformed token"),
    "hs256_public_key_as_secret": (_hs256_with_public_key, "algorithm 'HS256' not allowed"),
}


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
async def test_bad_token_is_refused_with_401(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    caplog.set_level(logging.INFO, logger="csc")
    make, reason = BAD_TOKENS[kind]
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        token = make(r.state_dir)
        before = r.node.state.auth_failures
        await _assert_refused(
            http, _connect_url(r), {"Authorization": f"Bearer {token}"}, caplog, reason
        )
        assert r.node.state.auth_failures == before + 2
        assert not r.node.state.sessions


async def test_missing_authorization_header_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="csc")
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        await _assert_refused(http, _connect_url(r), {}, caplog, "Authorization")
        # a scheme other than Bearer is no better
        await _assert_refused(
            http, _connect_url(r), {"Authorization": f"Basic {r.token}"}, caplog, "Authorization"
        )


@pytest.mark.parametrize("param", ["token", "access_token"])
async def test_token_in_query_string_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, param: str
) -> None:
    caplog.set_level(logging.INFO, logger="csc")
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        url = f"{_connect_url(r)}?{param}={r.token}"
        await _assert_refused(http, url, {}, caplog, "only in the Authorization header")
        # ... even when the header is present as well: a token in a URL is a leaked token
        await _assert_refused(
            http,
            url,
            {"Authorization": f"Bearer {r.token}"},
            caplog,
            "only in the Authorization header",
        )


async def test_valid_token_gets_welcome(tmp_path: Path) -> None:
    """The control case of the tests above: the relay's own token is accepted."""
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(_connect_url(r), headers={"Authorization": f"Bearer {r.token}"})
        try:
            await ws.send_bytes(_hello([ALIAS]))
            info = await _welcome(ws)
            assert info["aliases"] == [ALIAS]
        finally:
            await ws.close()


# --- aliases -------------------------------------------------------------------------------


async def _welcome(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    """The WELCOME that answers a HELLO already sent on ``ws``."""
    conn = Connection(Side.CLIENT, LinkSettings(), accept_streams=True, now=0.0)
    msg = await asyncio.wait_for(ws.receive(), scaled(10))
    assert msg.type == aiohttp.WSMsgType.BINARY, (msg.type, msg.data, msg.extra)
    conn.receive_data(msg.data, 0.0)
    for event in conn.events():
        if isinstance(event, WelcomeReceived):
            return event.info
    raise AssertionError("the first message was not WELCOME")


async def test_alias_not_covered_by_token_is_closed_4403(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="csc")
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(_connect_url(r), headers={"Authorization": f"Bearer {r.token}"})
        await ws.send_bytes(_hello(["other@example.com"]))
        msg = await asyncio.wait_for(ws.receive(), scaled(10))
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 4403
        assert "other@example.com" in msg.extra
        assert "alias_forbidden" in msg.extra
        await ws.close()
        assert not r.node.state.sessions
        logged = [rec.getMessage() for rec in caplog.records if rec.name == "csc.relay.gateway"]
        assert any("other@example.com" in m for m in logged), logged
        # the alias the token does cover stays unbound: nobody serves it
        async with http.get(f"{r.csc_url}/v1/resolve/{ALIAS}") as resp:
            assert resp.status == 503


async def test_same_alias_from_two_sessions_of_one_tenant(tmp_path: Path) -> None:
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        sockets = []
        try:
            for _ in range(2):
                ws = await http.ws_connect(
                    _connect_url(r), headers={"Authorization": f"Bearer {r.token}"}
                )
                sockets.append(ws)
                await ws.send_bytes(_hello([ALIAS]))
                assert (await _welcome(ws))["aliases"] == [ALIAS]
            sessions = list(r.node.state.sessions.values())
            assert len(sessions) == 2
            assert all(s.tenant == TENANT and s.grants == (ALIAS,) for s in sessions)
        finally:
            for ws in sockets:
                await ws.close()


@pytest.mark.parametrize("concurrent", [True, False], ids=["concurrent", "sequential"])
async def test_requests_are_spread_over_the_sessions(tmp_path: Path, concurrent: bool) -> None:
    """With the real agent's two sessions, 40 requests touch both of them, even when they come
    one at a time (equally loaded sessions must not all lose to the first one bound)."""
    async with relay(tmp_path, agent={"sessions": 2}) as r, aiohttp.ClientSession() as http:
        state = r.node.state
        await async_wait_until(lambda: len(state.sessions) == 2, 10, message="two sessions")
        before = {sid: s.streams_opened for sid, s in state.sessions.items()}

        async def one(i: int) -> None:
            async with http.get(r.tunnel(f"/echo/lb-{i}")) as resp:
                assert resp.status == 200
                await resp.read()

        if concurrent:
            await asyncio.gather(*(one(i) for i in range(40)))
        else:
            for i in range(40):
                await one(i)
        opened = {sid: s.streams_opened - before[sid] for sid, s in state.sessions.items()}
        assert sum(opened.values()) == 40
        assert all(n > 0 for n in opened.values()), opened


# --- the real agent ------------------------------------------------------------------------


def test_agent_with_bad_token_exits_3(procs: ProcFactory, upstream_proc: UpstreamProc) -> None:
    csc = procs.csc()
    forged = _forged(csc.state_dir)
    agent = procs.agent(csc.http_url, forged, upstream_proc.http_url, sessions=2)
    assert agent.wait(30) == 3
    _, err = agent.logs()
    assert "refused the agent (HTTP 401)" in err, err
    _, csc_err = csc.logs()
    assert "bad signature" in csc_err, csc_err


def test_agent_with_uncovered_alias_exits_3(
    procs: ProcFactory, upstream_proc: UpstreamProc
) -> None:
    csc = procs.csc()
    token = cli_issue_token(csc.state_dir, TENANT, ALIAS)
    agent = procs.agent(
        csc.http_url,
        token,
        upstream_proc.http_url,
        sessions=1,
        extra_args=["--alias", "other@example.com"],
    )
    assert agent.wait(30) == 3
    _, err = agent.logs()
    assert "4403" in err and "other@example.com" in err, err
