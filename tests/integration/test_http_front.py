"""The public listener against hostile or odd clients, over real loopback sockets: deadlines
and buffer bounds, slow bodies, the agent's framing checked, absolute-form targets, and the
JSON shape of every answer the listener gives by itself (csc/relay/http_front.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from pathlib import Path
from typing import Any

import pytest

from csc.config import CSCConfig
from shared.linkstream import LinkStream
from tenant_agent.upstream import Upstreams
from tests.support.attacks import read_response, read_until_closed
from tests.support.inproc import ALIAS, Relay, relay
from tests.support.procs import scaled


def _settings(**given: Any) -> dict[str, Any]:
    """Only the settings this CSC knows (so the file also runs against an older listener)."""
    return {k: v for k, v in given.items() if k in CSCConfig.__dataclass_fields__}


def _http_address(r: Relay) -> tuple[str, int]:
    host, _, port = r.node.http_address.rpartition(":")
    return host.strip("[]"), int(port)


async def _connect(r: Relay) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*_http_address(r))


def _error(body: bytes) -> str:
    doc = json.loads(body)
    assert set(doc) >= {"error", "message", "request_id"}
    return str(doc["error"])


async def test_head_deadline_and_idle_keepalive(tmp_path: Path) -> None:
    """A client that never finishes its head is answered 408 and closed; an idle kept-alive
    connection is closed (before: held for about an hour)."""
    csc = _settings(http_head_timeout=1.0, http_keepalive_timeout=1.0)
    async with relay(tmp_path, csc=csc, start=False) as r:
        reader, writer = await _connect(r)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        status, _, body = await read_response(reader)
        assert (status, _error(body)) == (408, "request_timeout")
        assert await read_until_closed(reader) == b""
        writer.close()
        reader, writer = await _connect(r)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        assert await read_until_closed(reader) == b""  # the keep-alive timeout
        writer.close()


async def test_head_buffer_bounds(tmp_path: Path) -> None:
    """A head over the size limit gets 431; unfinished heads of all connections together stay
    within their total (a connection that would pass it is closed)."""
    csc = _settings(http_max_head_size=4096, http_head_buffer_total=16384)
    async with relay(tmp_path, csc=csc, start=False) as r:
        reader, writer = await _connect(r)
        writer.write(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 8192)
        status, _, body = await read_response(reader)
        assert (status, _error(body)) == (431, "headers_too_large")
        writer.close()
        conns = [await _connect(r) for _ in range(8)]
        for _, w in conns:
            w.write(b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"a" * 3000)
            await w.drain()
        closed = 0
        for rd, _ in conns:
            try:
                async with asyncio.timeout(scaled(0.5) if closed else scaled(10)):
                    closed += await rd.read() == b""
            except (TimeoutError, ConnectionError):
                pass
        assert closed >= 1
        front = r.node.front
        assert front is not None and front.head_bytes <= 16384
        for _, w in conns:
            w.close()


async def test_stalled_body_frees_the_stream_slot(tmp_path: Path) -> None:
    """A body that stops arriving fails with 408 and its stream ends (before: the slot was
    held until open_timeout)."""
    csc = _settings(http_body_timeout=1.0, open_timeout=scaled(60))
    async with relay(tmp_path, csc=csc) as r:
        reader, writer = await _connect(r)
        head = f"POST /t/{ALIAS}/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
        writer.write(head.encode() + b"x")
        status, _, body = await read_response(reader)
        assert (status, _error(body)) == (408, "request_timeout")
        async with asyncio.timeout(scaled(10)):
            await r.node.state.idle.wait()
        writer.close()


async def test_slow_body_below_the_minimum_rate(tmp_path: Path) -> None:
    csc = _settings(
        http_body_timeout=30.0, http_body_min_rate=10_000, http_body_grace=1.0, open_timeout=60.0
    )
    async with relay(tmp_path, csc=csc) as r:
        reader, writer = await _connect(r)
        head = f"POST /t/{ALIAS}/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
        writer.write(head.encode())
        answer = asyncio.ensure_future(read_response(reader))
        for _ in range(int(scaled(20) / 0.25)):  # a byte every 250 ms: pacing, not syncing
            if answer.done():
                break
            writer.write(b"x")
            await asyncio.sleep(0.25)
        status, _, body = await answer
        assert (status, _error(body)) == (408, "request_timeout")
        writer.close()


@pytest.mark.parametrize("sent", [5, 15])
async def test_body_not_matching_the_agents_length_aborts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sent: int
) -> None:
    """An agent announcing 10 bytes and sending 5 (or 15): the client connection is aborted and
    never reused, so the next response cannot be read as part of this one."""

    async def lying(self: Upstreams, stream: LinkStream) -> None:
        stream.accept({"status": 200, "headers": [["Content-Length", "10"]]})
        await stream.write(b"y" * 3)
        await asyncio.sleep(0.1)  # so that the head goes out before the body is complete
        await stream.write(b"y" * (sent - 3))
        stream.write_eof()

    monkeypatch.setattr(Upstreams, "_http", lying)
    async with relay(tmp_path) as r:
        reader, writer = await _connect(r)
        request = f"GET /t/{ALIAS}/x HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        writer.write(request + request)
        got = await read_until_closed(reader)
        head, _, body = got.partition(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 502"):  # the mismatch was seen before the head went out
            assert b'"upstream_error"' in body
        else:
            assert head.startswith(b"HTTP/1.1 200")
            assert len(body) < 10 or b"HTTP/1.1" not in body[10:]
            assert got.count(b"HTTP/1.1 200") == 1
        writer.close()


async def test_absolute_form_target(tmp_path: Path) -> None:
    async with relay(tmp_path) as r:
        reader, writer = await _connect(r)
        target = f"http://{r.node.http_address}/t/{ALIAS}/echo/abs?q=1"
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, _, body = await read_response(reader)
        assert status == 200
        assert json.loads(body)["path"] == "/echo/abs"
        writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"GET /nothing-here HTTP/1.1\r\nHost: x\r\n\r\n", 404, "not_found"),
        (b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405, None),
        (b"GET / HTTP/1.1\r\nHost x\r\n\r\n", 400, "bad_request"),
        (
            b"POST /t/a/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
            "bad_request",
        ),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\nHost: x\n\n", 400, "bad_request"),
        (
            b"POST /t/a/ HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            400,
            "bad_request",
        ),
        (b"POST /t/a/ HTTP/1.1\r\nContent-Length: 999999\r\n\r\n", 413, "payload_too_large"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431, "headers_too_large"),
    ],
)
async def test_own_errors_are_json(
    tmp_path: Path, request_bytes: bytes, status: int, code: str | None
) -> None:
    async with relay(tmp_path, csc={"max_body_size": 1000}, start=False) as r:
        reader, writer = await _connect(r)
        writer.write(request_bytes)
        got, fields, body = await read_response(reader)
        assert got == status
        assert fields["content-type"].startswith("application/json")
        error = _error(body)
        assert code is None or error == code
        writer.close()


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_agent_that_never_answers_gets_504_after_open_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """An agent that accepts a stream and never answers: 504 ``upstream_timeout`` once
    ``open_timeout`` passed (with and without a request body), and the stream's slot is free."""
    answered = asyncio.Event()

    async def silent(self: Upstreams, stream: LinkStream) -> None:
        await answered.wait()

    monkeypatch.setattr(Upstreams, "_http", silent)
    async with relay(tmp_path, csc=_settings(open_timeout=1.0)) as r:
        reader, writer = await _connect(r)
        body = b"x" * 10 if method == "POST" else b""
        head = f"{method} /t/{ALIAS}/x HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        started = asyncio.get_running_loop().time()
        writer.write(head.encode() + body)
        status, _, answer = await read_response(reader)
        assert (status, _error(answer)) == (504, "upstream_timeout")
        assert asyncio.get_running_loop().time() - started >= 1.0
        async with asyncio.timeout(scaled(10)):
            await r.node.state.idle.wait()
        writer.close()
        answered.set()


def _small_window_socket() -> socket.socket:
    """A client socket that takes few bytes before the sender must wait for it to read."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    return sock


async def _ask_download(r: Relay) -> socket.socket:
    """A client with a small receive buffer that has asked for a 256 MiB download."""
    loop, sock = asyncio.get_running_loop(), _small_window_socket()
    await loop.sock_connect(sock, _http_address(r))
    request = f"GET /t/{ALIAS}/bytes/{256 * 1024 * 1024} HTTP/1.1\r\nHost: x\r\n\r\n"
    await loop.sock_sendall(sock, request.encode())
    return sock


def _stalled(r: Relay, listener: str) -> float | None:
    name = "csc_connections_stalled_total"
    return r.node.state.metrics.registry.get_sample_value(name, {"listener": listener})


def _connections(r: Relay) -> int:
    """Connections the node counts (its agent's links among them)."""
    return r.node.state.connections.total


async def _until_connections(r: Relay, count: int, limit: float) -> None:
    """Wait until the node counts ``count`` connections and has no stream."""
    async with asyncio.timeout(limit):
        while _connections(r) != count:
            await asyncio.sleep(0.05)
        await r.node.state.idle.wait()


async def test_a_client_that_stops_reading_a_response_is_closed(tmp_path: Path) -> None:
    """A bootloader that asks for a big download and reads none of it: once no byte has left
    for ``client_send_timeout``, the connection is closed and the stream ended (before: the
    connection, its stream and the window's bytes were held for as long as the client lived)."""
    csc = _settings(client_send_timeout=1.0)
    async with relay(tmp_path, csc=csc) as r:
        loop, before = asyncio.get_running_loop(), _connections(r)
        sock = await _ask_download(r)
        assert (await loop.sock_recv(sock, 1024)).startswith(b"HTTP/1.1 200")
        await _until_connections(r, before, scaled(20))
        assert (_stalled(r, "http"), _stalled(r, "tcp")) == (1, 0)
        sock.close()
        # the node serves on: the next client gets its answer
        reader, writer = await _connect(r)
        writer.write(f"GET /t/{ALIAS}/small HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert (await read_response(reader))[0] == 200
        writer.close()


async def test_a_slow_reader_that_keeps_reading_is_served(tmp_path: Path) -> None:
    """The send deadline counts from the last byte the client took, not from when the CSC
    started to wait: a client reading slowly but steadily is never cut off."""
    timeout = scaled(2.0)
    async with relay(tmp_path, csc=_settings(client_send_timeout=timeout)) as r:
        loop, before = asyncio.get_running_loop(), _connections(r)
        sock = await _ask_download(r)
        got, until = 0, loop.time() + 3 * timeout
        while loop.time() < until:  # a few KiB every 50 ms: far slower than the relay
            chunk = await loop.sock_recv(sock, 4096)
            assert chunk, f"closed by the CSC after {got} bytes"
            got += len(chunk)
            await asyncio.sleep(0.05)
        assert _connections(r) == before + 1
        assert _stalled(r, "http") == 0
        sock.close()
        await _until_connections(r, before, scaled(20))


async def test_a_tcp_client_that_stops_reading_is_closed(tmp_path: Path) -> None:
    """The TCP listener too: a client that sends to an echo portal and never reads what comes
    back is closed once nothing has left for ``client_send_timeout``."""
    async with relay(tmp_path, csc=_settings(client_send_timeout=1.0)) as r:
        loop, before = asyncio.get_running_loop(), _connections(r)
        sock = _small_window_socket()
        await loop.sock_connect(sock, r.tcp_address)
        await loop.sock_sendall(sock, f"CONNECT {ALIAS}\r\n".encode())
        assert await loop.sock_recv(sock, 4) == b"OK\r\n"

        async def flood() -> None:
            with contextlib.suppress(OSError):
                while True:  # the echo sends it all back; none of it is read
                    await loop.sock_sendall(sock, b"x" * 65536)

        sending = asyncio.ensure_future(flood())
        try:
            await _until_connections(r, before, scaled(20))
            assert (_stalled(r, "http"), _stalled(r, "tcp")) == (0, 1)
        finally:
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending
            sock.close()


def _shed(r: Relay, listener: str) -> float | None:
    name = "csc_connections_shed_total"
    return r.node.state.metrics.registry.get_sample_value(name, {"listener": listener})


async def _stalled_download(r: Relay) -> socket.socket:
    """A client that asks for a big download, reads the status line and then nothing."""
    sock = await _ask_download(r)
    assert (await asyncio.get_running_loop().sock_recv(sock, 12)).startswith(b"HTTP/1.1 200")
    return sock


async def _stalled_tunnel(r: Relay) -> tuple[socket.socket, asyncio.Future[None]]:
    """A TCP client that floods the echo portal and reads none of what comes back."""
    loop, sock = asyncio.get_running_loop(), _small_window_socket()
    await loop.sock_connect(sock, r.tcp_address)
    await loop.sock_sendall(sock, f"CONNECT {ALIAS}\r\n".encode())
    assert await loop.sock_recv(sock, 4) == b"OK\r\n"

    async def flood() -> None:
        with contextlib.suppress(OSError):
            while True:
                await loop.sock_sendall(sock, b"x" * 65536)

    return sock, asyncio.ensure_future(flood())


async def _stop(clients: list[tuple[socket.socket, asyncio.Future[None]]]) -> None:
    """Stop each client's sending task and close its socket."""
    for sock, sending in clients:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        sock.close()


async def _until_closed(r: Relay, count: int, limit: float) -> None:
    """Wait until the node counts ``count`` connections (its streams may still end)."""
    async with asyncio.timeout(limit):
        while _connections(r) != count:
            await asyncio.sleep(0.1)


def _closed_for(caplog: pytest.LogCaptureFixture, text: str, count: int) -> list[logging.LogRecord]:
    """The log lines of connections closed early that contain ``text``: ``count`` of them,
    each naming the relay's tenant."""
    closing = [rec for rec in caplog.records if text in rec.getMessage()]
    assert len(closing) == count
    assert {getattr(rec, "tenant", None) for rec in closing} == {"acme"}
    return closing


async def test_past_the_client_buffer_limit_stalled_clients_are_closed_early(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients that stop reading hold their stream's window and their write buffer (0.5 to
    1.5 MiB each here) until ``client_send_timeout``: a few thousand of them are a node's
    memory. Past ``client_buffer_limit`` (0 here: any byte waiting is over it) the clients
    behind for a twelfth of that timeout are closed, on both listeners, each logged with its
    tenant (before: every one was held for the whole send
    deadline, 60 s here). Which clients go first is tests/unit/test_sendwatch.py's."""
    caplog.set_level(logging.INFO, logger="csc")
    csc = _settings(client_send_timeout=60.0, client_buffer_limit=0)
    async with relay(tmp_path, csc=csc) as r:
        loop, before = asyncio.get_running_loop(), _connections(r)
        downloads = [await _stalled_download(r) for _ in range(4)]
        tunnels = [await _stalled_tunnel(r) for _ in range(2)]
        try:
            await _until_closed(r, before, 40)  # well before the send deadline
            assert (_shed(r, "http"), _shed(r, "tcp")) == (4, 2)
            assert (_stalled(r, "http"), _stalled(r, "tcp")) == (0, 0)
            for sock in downloads:  # each was cut off
                taken = 0
                with contextlib.suppress(ConnectionResetError):
                    while chunk := await loop.sock_recv(sock, 65536):
                        taken += len(chunk)
                assert taken < 16 * 1024 * 1024
        finally:
            await _stop(tunnels)
            for sock in downloads:
                sock.close()
        await _until_connections(r, before, scaled(20))
    closing = _closed_for(caplog, "client_buffer_limit", 6)
    # a stalled client that still took a few bytes in the last seconds goes as a slow one
    assert all(
        "nothing taken in" in rec.getMessage() or "the slowest of" in rec.getMessage()
        for rec in closing
    )


#: How long the portal leaves the request bodies of the next test unread.
PORTAL_DELAY = 15.0


async def test_past_the_client_buffer_limit_bodies_a_portal_does_not_take_are_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A request body the portal does not read (a slow portal, or a hostile tenant answering
    its own clients late) holds up to 0.5 MiB per connection in the CSC, read ahead of the
    stream's credit: past ``client_buffer_limit``, a connection whose body nobody took for a
    twelfth of ``client_send_timeout`` is closed, its tenant named (before: held until the
    portal answered, ``open_timeout`` at most, 75 s, or for as long as it trickled an
    answer)."""
    caplog.set_level(logging.INFO, logger="csc")
    csc = _settings(client_send_timeout=24.0, client_buffer_limit=0)  # 2 s without progress
    async with relay(tmp_path, csc=csc) as r:
        loop, before = asyncio.get_running_loop(), _connections(r)
        socks: list[socket.socket] = []
        for _ in range(3):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            await loop.sock_connect(sock, _http_address(r))
            head = (
                f"POST /t/{ALIAS}/slow-head?delay={PORTAL_DELAY:g} HTTP/1.1\r\nHost: x\r\n"
                f"Content-Length: {64 * 1024 * 1024}\r\n\r\n"
            )
            await loop.sock_sendall(sock, head.encode())
            socks.append(sock)

        async def push(sock: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while True:  # until the CSC stops reading, then until it closes
                    await loop.sock_sendall(sock, b"x" * 65536)

        pushing = [(sock, asyncio.ensure_future(push(sock))) for sock in socks]
        try:
            await _until_closed(r, before, PORTAL_DELAY - 3)  # before the portal reads
            assert (_shed(r, "http"), _stalled(r, "http")) == (3, 0)
        finally:
            await _stop(pushing)
        await _until_connections(r, before, scaled(20))
    _closed_for(caplog, "request body waiting", 3)


async def test_past_the_client_buffer_limit_tcp_bytes_a_portal_does_not_take_are_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The TCP listener too: bytes a client sends that the portal does not read (up to 384
    KiB per connection: a read ahead of the stream's credit and the reader's buffer) count
    toward ``client_buffer_limit``, and the connection goes once nothing was taken for a
    twelfth of ``client_send_timeout`` (before: held for as long as the tunnel lived)."""
    caplog.set_level(logging.INFO, logger="csc")
    held: list[asyncio.StreamWriter] = []

    async def never_reads(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    sink = await asyncio.start_server(never_reads, "127.0.0.1", 0)
    port = sink.sockets[0].getsockname()[1]
    csc = _settings(client_send_timeout=24.0, client_buffer_limit=0)  # 2 s without progress
    try:
        async with relay(tmp_path, csc=csc, agent={"tcp_upstream": f"127.0.0.1:{port}"}) as r:
            before = _connections(r)
            tunnels = [await _stalled_tunnel(r) for _ in range(2)]
            try:
                await _until_closed(r, before, 20)
                assert (_shed(r, "tcp"), _stalled(r, "tcp")) == (2, 0)
            finally:
                await _stop(tunnels)
            await _until_connections(r, before, scaled(20))
    finally:
        for writer in held:
            writer.close()
        sink.close()
        await sink.wait_closed()
    _closed_for(caplog, "waiting for the portal", 2)
