"""Real TLS (trustme certificates) on both CSC listeners; the agent verifies the CSC."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from csc.config import CSCConfig
from csc.server import running_node
from shared.errors import GoingAway
from tenant_agent.agent import Agent
from tests.support.capture import APPLICATION_DATA, CaptureRelay, tls_records
from tests.support.inproc import ALIAS, agent_config, make_token, tls_certs, tls_listeners
from tests.support.procs import async_wait_until, scaled
from tests.support.upstream import start_upstream_server


def _https_only(state_dir: Path, cert_file: Path, key_file: Path) -> CSCConfig:
    """A CSC with its HTTPS listener only."""
    return CSCConfig(
        listen="127.0.0.1:0",
        tcp_listen=None,
        admin_listen=None,
        metrics_listen=None,
        state_dir=state_dir,
        tls_cert=cert_file,
        tls_key=key_file,
    )


async def _wait_online(http: aiohttp.ClientSession, url: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + scaled(10)
    while True:
        async with http.get(url) as resp:
            if resp.status == 200:
                return
        assert loop.time() < deadline, "the alias did not come online over TLS"
        await asyncio.sleep(0.02)


async def test_https_and_tls_tcp_ingress_with_a_verifying_agent(tmp_path: Path) -> None:
    cert_file, key_file, ca_file = tls_certs(tmp_path)
    state_dir = tmp_path / "state"
    token = make_token(state_dir, "acme", [ALIAS])
    config = CSCConfig(
        listen="127.0.0.1:0",
        tcp_listen="127.0.0.1:0",
        admin_listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
        state_dir=state_dir,
        tls_cert=cert_file,
        tls_key=key_file,
    )
    client_ctx = ssl.create_default_context(cafile=str(ca_file))
    upstream = await start_upstream_server(tcp_echo_port=0)
    try:
        async with running_node(config) as node:
            base = f"https://{node.http_address}"
            agent = Agent(agent_config(base, token, upstream, ca_file=ca_file))
            task = asyncio.create_task(agent.run())
            connector = aiohttp.TCPConnector(ssl=client_ctx)
            async with aiohttp.ClientSession(connector=connector) as http:
                await _wait_online(http, f"{base}/v1/resolve/{ALIAS}")
                async with http.get(f"{base}/t/{ALIAS}/echo/tls") as resp:
                    assert resp.status == 200
                    headers = {k.lower(): v for k, v in (await resp.json())["headers"]}
                assert headers["x-forwarded-proto"] == "https"
            assert node.tcp_address is not None
            host, _, port = node.tcp_address.rpartition(":")
            reader, writer = await asyncio.open_connection(
                host, int(port), ssl=client_ctx, server_hostname="127.0.0.1"
            )
            writer.write(f"CONNECT {ALIAS}\r\n".encode())
            assert await reader.readline() == b"OK\r\n"
            writer.write(b"over tls")
            assert await asyncio.wait_for(reader.readexactly(8), scaled(10)) == b"over tls"
            writer.close()
            agent.stop()
            assert await asyncio.wait_for(task, scaled(30)) == 0
    finally:
        await upstream.close()


async def test_an_agent_answer_over_wss_is_one_tls_record(tmp_path: Path) -> None:
    """The agent masks a message of small frames (OPEN_OK, body, FIN) piece by piece, then
    joins the pieces before the TLS write: TLS makes a record of every piece written, and each
    costs the agent a seal and the CSC an open. The agent dials the CSC through a relay that
    keeps the bytes it passes."""
    cert_file, key_file, ca_file = tls_certs(tmp_path)
    state_dir = tmp_path / "state"
    token = make_token(state_dir, "acme", [ALIAS])
    config = _https_only(state_dir, cert_file, key_file)
    client_ctx = ssl.create_default_context(cafile=str(ca_file))
    upstream = await start_upstream_server()
    capture = CaptureRelay()
    try:
        async with running_node(config) as node:
            host, _, port = node.http_address.rpartition(":")
            capture.target = (host, int(port))
            base = f"https://{node.http_address}"
            agent = Agent(
                agent_config(f"https://{await capture.start()}", token, upstream, ca_file=ca_file)
            )
            task = asyncio.create_task(agent.run())
            connector = aiohttp.TCPConnector(ssl=client_ctx)
            counts = []
            async with aiohttp.ClientSession(connector=connector) as http:
                await _wait_online(http, f"{base}/v1/resolve/{ALIAS}")
                for _ in range(5):
                    start = len(capture.up)
                    async with http.get(f"{base}/t/{ALIAS}/small") as resp:
                        assert resp.status == 200
                        await resp.read()
                    counts.append(tls_records(capture.up, start).count(APPLICATION_DATA))
            agent.stop()
            assert await asyncio.wait_for(task, scaled(30)) == 0
        # one record per answer; a heartbeat may fall in between, not into every request
        assert min(counts) == 1, counts
    finally:
        await capture.close()
        await upstream.close()


async def test_agent_refuses_an_untrusted_csc_certificate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert_file, key_file, _ = tls_certs(tmp_path)
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    state_dir = tmp_path / "state"
    token = make_token(state_dir, "acme", [ALIAS])
    config = _https_only(state_dir, cert_file, key_file)
    upstream = await start_upstream_server()
    try:
        async with running_node(config) as node:
            base = f"https://{node.http_address}"
            agent = Agent(agent_config(base, token, upstream, ca_file=other_ca))
            task = asyncio.create_task(agent.run())
            loop = asyncio.get_running_loop()
            deadline = loop.time() + scaled(10)
            while (
                sum("TLS certificate was not accepted" in r.getMessage() for r in caplog.records)
                < 2
            ):
                assert loop.time() < deadline, "the agent did not retry"
                assert not node.state.sessions
                await asyncio.sleep(0.02)
            assert not node.state.sessions
            agent.stop()
            assert await asyncio.wait_for(task, scaled(30)) == 0
    finally:
        await upstream.close()


async def test_sessions_to_a_wss_csc_share_one_tls_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``ca_file`` (a CSC with a public certificate) the agent loads the system's CAs
    once for all its sessions and their reconnects: each default context costs tens of ms and
    most of a MiB, held for as long as its session lives."""
    cert_file, key_file, ca_file = tls_certs(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # the "system" CAs trust the test CA
    made: list[ssl.SSLContext] = []
    default_context = ssl.create_default_context

    def counting(purpose: ssl.Purpose = ssl.Purpose.SERVER_AUTH, **kw: Any) -> ssl.SSLContext:
        context = default_context(purpose, **kw)
        if purpose == ssl.Purpose.SERVER_AUTH:  # a client's, not the CSC listener's
            made.append(context)
        return context

    state_dir = tmp_path / "state"
    token = make_token(state_dir, "acme", [ALIAS])
    upstream = await start_upstream_server()
    try:
        async with running_node(_https_only(state_dir, cert_file, key_file)) as node:
            monkeypatch.setattr(ssl, "create_default_context", counting)
            base = f"https://{node.http_address}"
            agent = Agent(agent_config(base, token, upstream, sessions=3))
            task = asyncio.create_task(agent.run())
            loop = asyncio.get_running_loop()
            deadline = loop.time() + scaled(10)
            while len(node.state.sessions) < 3:
                assert loop.time() < deadline, "the sessions did not come up over TLS"
                assert not task.done(), task
                await asyncio.sleep(0.02)
            first = set(node.state.sessions)
            for session in list(node.state.sessions.values()):  # each one reconnects
                session.link.close(GoingAway("test"))
            deadline = loop.time() + scaled(10)
            while len(set(node.state.sessions) - first) < 3:
                assert loop.time() < deadline, "the sessions did not come back"
                await asyncio.sleep(0.02)
            assert len(made) == 1
            agent.stop()
            assert await asyncio.wait_for(task, scaled(30)) == 0
    finally:
        await upstream.close()


@pytest.mark.parametrize("listener", ["http", "tcp"])
async def test_a_tls_handshake_that_never_comes_is_cut_at_the_head_timeout(
    tmp_path: Path, listener: str
) -> None:
    """A client that connects to a TLS listener and sends nothing (or half a ClientHello) is
    disconnected once ``http_head_timeout`` passed, not after asyncio's 60 s default: until
    the handshake ends no request deadline runs, so this bound is the only one."""
    cert_file, key_file, _ = tls_certs(tmp_path)
    config = CSCConfig(
        listen="127.0.0.1:0",
        tcp_listen="127.0.0.1:0",
        admin_listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
        state_dir=tmp_path / "state",
        tls_cert=cert_file,
        tls_key=key_file,
        http_head_timeout=1.0,
    )
    async with running_node(config) as node:
        address = node.http_address if listener == "http" else node.tcp_address
        assert address is not None
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        for sent in (b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"):  # a ClientHello's start
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(sent)
            started = loop.time()
            async with asyncio.timeout(scaled(20)):  # asyncio's own bound would be 60 s
                assert await reader.read() == b""
            assert loop.time() - started >= 0.9
            writer.close()


async def test_a_tls_client_of_the_tcp_ingress_that_leaves_before_connect_ends_cleanly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its handler used to fail on asyncio's TLS transport (not uvloop's) once the connection
    was gone, and asyncio logged the AttributeError as an unhandled exception."""
    config, ca_file = tls_listeners(tmp_path)
    client_ctx = ssl.create_default_context(cafile=str(ca_file))
    async with running_node(config) as node:
        assert node.tcp_address is not None
        host, _, port = node.tcp_address.rpartition(":")
        _, writer = await asyncio.open_connection(
            host, int(port), ssl=client_ctx, server_hostname="127.0.0.1"
        )
        writer.close()
        counts = node.state.connections
        await async_wait_until(lambda: counts.total == 0, scaled(10), message="still counted")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
