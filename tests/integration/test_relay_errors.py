"""Every bootloader-facing error of the relay, by status and JSON ``error`` code (and TCP ERR)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import aiohttp
import pytest

from tests.support.inproc import ALIAS, make_token, relay, start_agent, wait_online
from tests.support.procs import scaled


async def _json(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, object], object]:
    async with http.get(url) as resp:
        return resp.status, await resp.json(), resp.headers


async def test_bad_and_unknown_alias(tmp_path: Path) -> None:
    async with relay(tmp_path) as r, aiohttp.ClientSession() as http:
        status, body, _ = await _json(http, f"{r.csc_url}/t/not%20an%20alias/x")
        assert (status, body["error"]) == (400, "bad_alias")
        status, body, _ = await _json(http, r.tunnel("/x", alias="other@example.org"))
        assert (status, body["error"]) == (404, "unknown_alias")
        assert "request_id" in body


async def test_portal_offline_is_503_with_retry_after(tmp_path: Path) -> None:
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        status, body, headers = await _json(http, r.tunnel("/echo/x"))
        assert (status, body["error"]) == (503, "portal_offline")
        assert headers["Retry-After"].isdigit()  # type: ignore[index]
        status, body, _ = await _json(http, f"{r.csc_url}/v1/resolve/{ALIAS}")
        assert (status, body["error"]) == (503, "portal_offline")


async def test_upstream_refused_is_502(tmp_path: Path) -> None:
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        await start_agent(r, upstream="http://127.0.0.1:9")
        await wait_online(r.csc_url)
        status, body, _ = await _json(http, r.tunnel("/anything"))
        assert (status, body["error"]) == (502, "upstream_refused")


async def test_upstream_refused_hides_the_portal_address(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The device gets the code, the tenant and the request id; the address stays in the
    agent's log."""
    caplog.set_level(logging.INFO, logger="csc_agent")
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        await start_agent(r, upstream="http://127.0.0.1:9")
        await wait_online(r.csc_url)
        async with http.get(r.tunnel("/v1/portal")) as resp:
            text = await resp.text()
            body = json.loads(text)
        assert resp.status == 502
        assert "127.0.0.1" not in text and ":9" not in text, text
        assert body["message"] == "the portal refused the connection"
        assert body["tenant"]["name"] and body["request_id"]
        logged = [r.getMessage() for r in caplog.records if r.name.startswith("csc_agent")]
        assert any("127.0.0.1:9" in line and body["request_id"] in line for line in logged)
        recent = r.node.state.errors
        assert "127.0.0.1" not in json.dumps([e.message for e in recent.recent()])


async def test_upstream_timeout_is_504(tmp_path: Path) -> None:
    async with (
        relay(tmp_path, agent={"upstream_timeout": 0.3}) as r,
        aiohttp.ClientSession() as http,
    ):
        status, body, _ = await _json(http, r.tunnel("/slow-head?delay=3"))
        assert (status, body["error"]) == (504, "upstream_timeout")


async def test_agent_lost_mid_response_aborts_the_client(tmp_path: Path) -> None:
    async with (
        relay(tmp_path) as r,
        aiohttp.ClientSession() as http,
        http.get(r.tunnel("/bytes/100000000?rate=2000000")) as resp,
    ):
        assert resp.status == 200
        await resp.content.readexactly(100_000)
        assert r.agent is not None
        for session in list(r.agent.sessions):
            await session.ws.close()
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_upstream_reset_mid_response_aborts_the_client(tmp_path: Path) -> None:
    async with (
        relay(tmp_path) as r,
        aiohttp.ClientSession() as http,
        http.get(r.tunnel("/reset-mid?n=200000")) as resp,
    ):
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def _tcp_exchange(host: str, port: int, line: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(line)
    await writer.drain()
    answer = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    return answer


async def test_tcp_ingress_errors(tmp_path: Path) -> None:
    async with relay(tmp_path, start=False) as r:
        host, port = r.tcp_address
        assert (await _tcp_exchange(host, port, b"HELLO\r\n")).startswith(b"ERR 400 bad_request")
        got = await _tcp_exchange(host, port, b"CONNECT bad alias!\r\n")
        assert got.startswith(b"ERR 400 bad_alias")
        got = await _tcp_exchange(host, port, b"CONNECT nobody@example.org\r\n")
        assert got.startswith(b"ERR 404 unknown_alias")
        got = await _tcp_exchange(host, port, f"CONNECT {ALIAS}\r\n".encode())
        assert got.startswith(b"ERR 503 portal_offline")


async def test_tcp_ingress_echo_with_half_close(tmp_path: Path) -> None:
    async with relay(tmp_path) as r:
        host, port = r.tcp_address
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"CONNECT {ALIAS.upper()}\r\n".encode())
        assert await reader.readline() == b"OK\r\n"
        payload = bytes(range(256)) * 4096
        writer.write(payload)
        writer.write_eof()
        echoed = await asyncio.wait_for(reader.read(), 10)
        assert echoed == payload
        writer.close()


async def test_tcp_upstream_refused(tmp_path: Path) -> None:
    async with relay(tmp_path, agent={"tcp_upstream": "127.0.0.1:9"}) as r:
        host, port = r.tcp_address
        got = await _tcp_exchange(host, port, f"CONNECT {ALIAS}\r\n".encode())
        assert got.startswith(b"ERR 502 upstream_refused")
        assert b"127.0.0.1" not in got, got


async def test_alias_held_by_another_tenant_is_refused(tmp_path: Path) -> None:
    async with relay(tmp_path) as r:
        rogue = make_token(tmp_path / "csc-state", "rogue", ["rogue@example.net"])
        # a token for the same alias but another tenant, signed by the CSC's own key
        from shared.tokens import issue_token, load_or_create_signing_key

        key, _ = load_or_create_signing_key(r.state_dir)
        stolen = issue_token(
            key, tenant="rogue", aliases=[ALIAS], ttl_seconds=60, audience="csc-agent", issuer="csc"
        )
        assert rogue
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(
                f"{r.csc_url}/v1/agent/connect", headers={"Authorization": f"Bearer {stolen}"}
            )
            from shared.protocol import Connection, LinkSettings, Side

            conn = Connection(Side.CLIENT, LinkSettings(), accept_streams=True, now=0.0)
            conn.send_hello({"agent": "test"})
            await ws.send_bytes(b"".join(conn.data_to_send()))
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.CLOSE
            assert ws.close_code == 4409
            assert "alias_taken" in msg.extra


async def test_hello_naming_no_alias_skips_the_token_aliases_of_another_tenant(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An empty alias list in HELLO binds the token's aliases that are the tenant's; one held by
    another tenant is skipped and logged (docs/operations.md), not refused with 4409."""
    from shared.protocol import Connection, LinkSettings, Side, WelcomeReceived
    from shared.tokens import issue_token, load_or_create_signing_key

    caplog.set_level(logging.INFO, logger="csc.relay.gateway")
    async with relay(tmp_path, start=False) as r:
        make_token(r.state_dir, "rogue", ["rogue@example.net"])
        key, _ = load_or_create_signing_key(r.state_dir)
        both = issue_token(
            key,
            tenant="rogue",
            aliases=["rogue@example.net", ALIAS],
            ttl_seconds=60,
            audience="csc-agent",
            issuer="csc",
        )
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(
                f"{r.csc_url}/v1/agent/connect", headers={"Authorization": f"Bearer {both}"}
            )
            conn = Connection(Side.CLIENT, LinkSettings(), accept_streams=True, now=0.0)
            conn.send_hello({"agent": "test", "aliases": []})
            await ws.send_bytes(b"".join(conn.data_to_send()))
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.BINARY, (msg.type, msg.extra, ws.close_code)
            conn.receive_data(msg.data, 0.0)
            welcome = [e for e in conn.events() if isinstance(e, WelcomeReceived)]
            assert welcome and welcome[0].info["aliases"] == ["rogue@example.net"]
            await ws.close()
    assert any("skipped" in m and ALIAS in m for m in caplog.messages), caplog.messages


async def test_tcp_connect_line_too_long_is_refused_while_reading(tmp_path: Path) -> None:
    """A long first line without a newline is answered as soon as it passes the line limit,
    not buffered until the handshake timeout (an hour here)."""
    async with relay(tmp_path, start=False, csc={"tcp_handshake_timeout": 3600.0}) as r:
        host, port = r.tcp_address
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"CONNECT " + b"a" * 4096)
        await writer.drain()
        answer = await asyncio.wait_for(reader.readline(), scaled(10))
        assert answer.startswith(b"ERR 400 bad_request"), answer
        assert b"longer than 512 bytes" in answer
        assert await asyncio.wait_for(reader.read(), scaled(10)) == b""  # closed
        writer.close()
