"""Peer links over TLS (csc/cluster/peertls.py; docs/security.md "Cluster peer links").

Handshakes of the peer-link contexts over loopback sockets (only the certificate derived from the
same secret, or issued by the operator's CA, gets through, either way round), then two CSC nodes
in one event loop on a real Redis: what crosses the wire between B and A (through a capturing
relay) is not the request's plaintext, a node with another secret or with the other
``peer_tls`` cannot link and says why, and a connection that never handshakes is closed within
the bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

import csc.cluster.peer as peer
from csc.cluster import peertls
from csc.server import Node, running_node
from shared.config import Secret
from tests.integration.test_cluster_forwarding import agent_on, node_config
from tests.support.capture import APPLICATION_DATA, CaptureRelay, tls_records
from tests.support.inproc import ALIAS, make_token
from tests.support.procs import async_wait_until, scaled
from tests.support.redis import RedisTopology
from tests.support.upstream import UpstreamServer

SECRET = b"s" * 40
#: in the request body, a header and a TCP stream: never on the wire between nodes with TLS
MARKER = b"marker-" + os.urandom(8).hex().encode()

# -- handshakes --------------------------------------------------------------------------------


def _pem(cert: x509.Certificate, key: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    return cert.public_bytes(serialization.Encoding.PEM), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _certificate(
    name: str, key: Ed25519PrivateKey, issuer: tuple[str, Ed25519PrivateKey] | None = None
) -> x509.Certificate:
    """A certificate for ``key`` issued by ``issuer`` (name, key), or self-signed as a CA."""
    issuer_name, issuer_key = issuer or (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
    return builder.sign(issuer_key, algorithm=None)


def _ca(name: str = "operator CA") -> tuple[bytes, Callable[[str], tuple[bytes, bytes]]]:
    """An operator CA: its PEM, and a function issuing a (cert, key) PEM pair for a node."""
    ca_key = Ed25519PrivateKey.generate()
    ca_pem = _pem(_certificate(name, ca_key), ca_key)[0]

    def issue(node: str) -> tuple[bytes, bytes]:
        key = Ed25519PrivateKey.generate()
        return _pem(_certificate(node, key, (name, ca_key)), key)

    return ca_pem, issue


def _like_the_derived(key: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    """The derived certificate's subject, serial and validity over another key."""
    real = x509.load_pem_x509_certificate(peertls.derived_identity(SECRET)[0])
    forged = (
        x509.CertificateBuilder()
        .subject_name(real.subject)
        .issuer_name(real.issuer)
        .public_key(key.public_key())
        .serial_number(real.serial_number)
        .not_valid_before(real.not_valid_before_utc)
        .not_valid_after(real.not_valid_after_utc)
        .sign(key, algorithm=None)
    )
    return _pem(forged, key)


async def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> str:
    """``ok`` when the client got the server application's first byte (both sides accepted
    the handshake), else how the client failed."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"x")
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(scaled(10)):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
            try:
                return "ok" if await reader.read(1) == b"x" else "closed"
            finally:
                writer.close()
    except OSError as exc:
        return type(exc).__name__
    finally:
        listener.close()


async def test_nodes_with_one_secret_handshake() -> None:
    a, b = peertls.derived_contexts(SECRET), peertls.derived_contexts(SECRET)
    assert await _handshake(a.server, b.client) == "ok"


@pytest.mark.parametrize(
    "make",
    [
        lambda: peertls.derived_contexts(b"t" * 40),
        lambda: peertls.contexts_from_pem(
            *_like_the_derived(Ed25519PrivateKey.generate()), peertls.derived_identity(SECRET)[0]
        ),
    ],
    ids=["other-secret", "same-subject-and-serial-other-key"],
)
async def test_a_dialler_refuses_any_other_certificate(make: Callable[[], peertls.PeerTLS]) -> None:
    ours, theirs = peertls.derived_contexts(SECRET), make()
    assert await _handshake(theirs.server, ours.client) == "SSLCertVerificationError"


@pytest.mark.parametrize(
    "presented",
    [
        None,
        lambda: peertls.derived_identity(b"t" * 40),
        lambda: _like_the_derived(Ed25519PrivateKey.generate()),
    ],
    ids=["none", "other-secret", "same-subject-and-serial-other-key"],
)
async def test_a_listener_refuses_any_other_certificate(
    presented: Callable[[], tuple[bytes, bytes]] | None,
) -> None:
    """The dialler trusts the listener (so it gets as far as showing its own certificate)."""
    dialler = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    dialler.check_hostname = False
    dialler.load_verify_locations(cadata=peertls.derived_identity(SECRET)[0].decode())
    if presented is not None:
        cert, key = presented()
        with peertls._private_file(cert + b"\n" + key) as path:
            dialler.load_cert_chain(path)
    assert await _handshake(peertls.derived_contexts(SECRET).server, dialler) != "ok"


async def test_an_operator_ca_admits_its_certificates_only() -> None:
    ca, issue = _ca()
    a = peertls.contexts_from_pem(*issue("a"), ca)
    b = peertls.contexts_from_pem(*issue("b"), ca)
    assert await _handshake(a.server, b.client) == "ok"
    other_ca, other_issue = _ca()
    stranger = peertls.contexts_from_pem(*other_issue("a"), other_ca)
    assert await _handshake(stranger.server, b.client) == "SSLCertVerificationError"
    assert await _handshake(a.server, stranger.client) != "ok"


async def _served_name(port: int, client: ssl.SSLContext) -> str:
    """The common name of the certificate the listener on ``port`` presents."""
    async with asyncio.timeout(scaled(10)):
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
    try:
        cert = writer.get_extra_info("ssl_object").getpeercert()
        return str(dict(pair[0] for pair in cert["subject"])["commonName"])
    finally:
        writer.close()


async def test_renewed_operator_files_are_presented_without_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca, issue = _ca()
    cert, key, anchors = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    first = issue("a, first")
    cert.write_bytes(first[0])
    key.write_bytes(first[1])
    anchors.write_bytes(ca)
    a = peertls.peer_contexts(SECRET, cert, key, anchors)
    b = peertls.contexts_from_pem(*issue("b"), ca)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=a.server)
    port = listener.sockets[0].getsockname()[1]
    try:
        assert await _served_name(port, b.client) == "a, first"
        assert not peertls.reload(a)  # nothing changed
        renewed = issue("a, renewed")
        cert.write_bytes(renewed[0])  # the certificate before its key: not usable yet
        with caplog.at_level(logging.WARNING, logger="csc.peer"):
            assert not peertls.reload(a)
        assert "cannot be used" in caplog.text
        assert await _served_name(port, b.client) == "a, first"
        key.write_bytes(renewed[1])
        assert peertls.reload(a)
        assert await _served_name(port, b.client) == "a, renewed"  # the same listener
        other_ca, other_issue = _ca("operator CA 2")
        anchors.write_bytes(ca + other_ca)  # a CA rolled over: both trusted
        assert peertls.reload(a)
        c = peertls.contexts_from_pem(*other_issue("c"), other_ca + ca)
        assert await _handshake(a.server, c.client) == "ok"
        assert await _handshake(a.server, b.client) == "ok"
    finally:
        listener.close()


# -- two nodes ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def nodes(
    tmp_path: Path, redis: RedisTopology, a: dict[str, Any], b: dict[str, Any]
) -> AsyncIterator[tuple[Node, Node, str]]:
    """Nodes A and B of one cluster, each with its own overrides of :func:`node_config`."""
    state_dir = tmp_path / "state"
    token = make_token(state_dir, "acme", [ALIAS])
    prefix = "t" + os.urandom(4).hex()
    async with (
        asyncio.timeout(scaled(60)),
        running_node(node_config(state_dir, redis.url, prefix, node_id="A", **a)) as node_a,
        running_node(node_config(state_dir, redis.url, prefix, node_id="B", **b)) as node_b,
    ):
        yield node_a, node_b, token


async def _resolve_status(http: aiohttp.ClientSession, node: Node) -> int:
    async with http.get(f"http://{node.http_address}/v1/resolve/{ALIAS}") as resp:
        return resp.status


async def _tunnel_status(http: aiohttp.ClientSession, node: Node) -> int:
    async with http.get(f"http://{node.http_address}/t/{ALIAS}/small") as resp:
        await resp.read()
        return resp.status


@contextlib.asynccontextmanager
async def _captured(
    tmp_path: Path, redis: RedisTopology, upstream: UpstreamServer, over: dict[str, Any]
) -> AsyncIterator[tuple[CaptureRelay, Node, aiohttp.ClientSession]]:
    """Nodes A (with the agent; B dials it through a :class:`CaptureRelay`) and B, both with
    ``over``: (the relay, B, a client session) once the alias is online through B."""
    relay = CaptureRelay()
    relay_address = await relay.start()
    try:
        async with nodes(tmp_path, redis, {**over, "peer_advertise": relay_address}, over) as (
            a,
            b,
            token,
        ):
            assert a.state.cluster is not None
            relay.target = a.state.cluster.server.address
            async with agent_on(a, token, upstream), aiohttp.ClientSession() as http:

                async def online() -> bool:
                    return await _resolve_status(http, b) == 200

                await async_wait_until(online, 10, message="alias online through B")
                yield relay, b, http
    finally:
        await relay.close()


@pytest.mark.parametrize("tls", [True, False], ids=["peer_tls", "plain"])
async def test_forwarded_bytes_are_not_plaintext_on_the_wire(
    tls: bool, tmp_path: Path, redis_single: RedisTopology, upstream: UpstreamServer
) -> None:
    """HTTP and TCP through B reach A's agent either way; with TLS (the default) the relay
    between B and A never sees the marker, without it does (so the capture would notice)."""
    async with _captured(tmp_path, redis_single, upstream, {"peer_tls": tls}) as (relay, b, http):
        url = f"http://{b.http_address}/t/{ALIAS}/echo/up"
        body = MARKER * 1000
        async with http.post(url, data=body, headers={"X-Marker": MARKER.decode()}) as resp:
            assert resp.status == 200
            echo = await resp.json()
        assert echo["body_bytes"] == len(body)
        assert ["X-Marker", MARKER.decode()] in echo["headers"]
        host, _, port = (b.tcp_address or "").rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"CONNECT {ALIAS}\r\n".encode())
        assert await reader.readline() == b"OK\r\n"
        writer.write(b"tcp " + MARKER)
        assert await reader.readexactly(len(MARKER) + 4) == b"tcp " + MARKER
        writer.close()
    assert len(relay.up) > len(body)  # the request went through the relay
    if tls:
        assert relay.up[:1] == b"\x16" and relay.down[:1] == b"\x16"  # TLS handshake records
        assert MARKER not in relay.up and MARKER not in relay.down
    else:
        assert MARKER in relay.up and MARKER in relay.down


async def test_a_forwarded_answer_is_one_tls_record(
    tmp_path: Path,
    redis_single: RedisTopology,
    upstream: UpstreamServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A message of many small frames (admission, head, body, FIN) goes to TLS in one write:
    TLS makes a record of every piece written, and each costs both nodes a seal or an open."""
    # the admission waits for the answer however slow a busy machine makes the agent
    monkeypatch.setattr(peer, "ADMISSION_HOLD", scaled(30))
    monkeypatch.setattr(peer, "ADMISSION_TIMEOUT", scaled(60))
    counts = []
    async with _captured(tmp_path, redis_single, upstream, {}) as (relay, b, http):
        for _ in range(5):
            start = len(relay.down)
            assert await _tunnel_status(http, b) == 200
            counts.append(tls_records(relay.down, start).count(APPLICATION_DATA))
    # one record per answer; a heartbeat may fall in between, not into every request
    assert min(counts) == 1, counts


@contextlib.asynccontextmanager
async def _b_cannot_forward(
    tmp_path: Path,
    redis: RedisTopology,
    a_over: dict[str, Any],
    b_over: dict[str, Any],
    upstream: UpstreamServer,
) -> AsyncIterator[Node]:
    """Nodes A (with the agent) and B configured so that they cannot link: B knows A has the
    route, yet a request through B gets 503 (portal_offline: no node took it). Yields A."""
    async with (
        nodes(tmp_path, redis, a_over, b_over) as (a, b, token),
        agent_on(a, token, upstream),
        aiohttp.ClientSession() as http,
    ):

        async def online() -> bool:
            return await _resolve_status(http, b) == 200

        await async_wait_until(online, 10, message="alias online through B")
        assert await _tunnel_status(http, b) == 503
        yield a


def _peer_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "csc.peer" and r.levelno >= logging.WARNING
    ]


async def test_a_node_with_another_secret_cannot_link(
    tmp_path: Path,
    redis_single: RedisTopology,
    upstream: UpstreamServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="csc.peer")
    other = {"cluster_key": Secret("o" * 40)}
    async with _b_cannot_forward(tmp_path, redis_single, {}, other, upstream) as a:
        assert a.state.cluster is not None and not a.state.cluster.server.links
    assert any("certificate was refused" in m for m in _peer_warnings(caplog)), caplog.text


@pytest.mark.parametrize("tls_on", ["A", "B"])
async def test_plain_and_tls_nodes_refuse_each_other_and_say_why(
    tls_on: str,
    tmp_path: Path,
    redis_single: RedisTopology,
    upstream: UpstreamServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="csc.peer")
    a, b = ({"peer_tls": tls_on == "A"}, {"peer_tls": tls_on == "B"})
    async with _b_cannot_forward(tmp_path, redis_single, a, b, upstream):
        pass
    warnings = _peer_warnings(caplog)
    assert any(peertls.MISMATCH_HINT in m for m in warnings), caplog.text


@pytest.mark.parametrize("tls", [True, False], ids=["peer_tls", "plain"])
async def test_a_connection_that_never_handshakes_is_closed_within_the_bound(
    tls: bool, tmp_path: Path, redis_single: RedisTopology, monkeypatch: pytest.MonkeyPatch
) -> None:
    bound = 0.5
    monkeypatch.setattr(peer, "HANDSHAKE_TIMEOUT", bound)
    config = node_config(
        tmp_path / "state", redis_single.url, "t" + os.urandom(4).hex(), peer_tls=tls
    )
    async with asyncio.timeout(scaled(60)), running_node(config) as node:
        assert node.state.cluster is not None and node.state.cluster.server.address
        host, port = node.state.cluster.server.address
        reader, writer = await asyncio.open_connection(host, port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(scaled(bound + 5)):
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read() == b""
        assert loop.time() - started >= bound * 0.9  # closed by the bound, not at once
        writer.close()


async def test_operator_certificates_forward(
    tmp_path: Path, redis_single: RedisTopology, upstream: UpstreamServer
) -> None:
    ca, issue = _ca()
    files: dict[str, dict[str, Any]] = {}
    for name in ("A", "B"):
        cert, key = issue(name)
        (tmp_path / f"{name}.crt").write_bytes(cert)
        (tmp_path / f"{name}.key").write_bytes(key)
        files[name] = {
            "peer_tls_cert": tmp_path / f"{name}.crt",
            "peer_tls_key": tmp_path / f"{name}.key",
            "peer_tls_ca": tmp_path / "ca.crt",
        }
    (tmp_path / "ca.crt").write_bytes(ca)
    async with (
        nodes(tmp_path, redis_single, files["A"], files["B"]) as (a, b, token),
        agent_on(a, token, upstream),
        aiohttp.ClientSession() as http,
    ):

        async def forwarded() -> bool:
            return await _tunnel_status(http, b) == 200

        await async_wait_until(forwarded, 10, message="request forwarded through B")
