"""The agent's WebSocket client (tenant_agent/websocket.py) against real servers on port 0.

Masking and framing are checked by an aiohttp server reading the frames (and, for arbitrary
chunkings, against websockets' reference ``apply_mask``); backpressure by a server that stops
reading; then handshake refusals, close codes in both directions, size limits, connection loss
and TLS verification.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trustme
from aiohttp import WSMsgType, web
from hypothesis import given
from hypothesis import strategies as st
from websockets.server import ServerProtocol
from websockets.utils import apply_mask as reference_mask

from shared.errors import AgentLost, ProtocolError
from shared.link import Link
from shared.protocol import Connection, LinkSettings, Side
from tenant_agent.websocket import (
    AgentWebSocket,
    HandshakeError,
    HandshakeRefused,
    connect,
    frame_header,
    mask_chunks,
    run_link,
)
from tests.support.procs import async_wait_until, scaled

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX = 4 * 1024 * 1024
KEY = bytes((0x12, 0x34, 0x56, 0x78))


async def _until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    await async_wait_until(predicate, timeout, 0.01)


@contextlib.asynccontextmanager
async def _server(
    handler: Handler, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    scheme = "wss" if ssl_context is not None else "ws"
    try:
        yield f"{scheme}://127.0.0.1:{runner.addresses[0][1]}/ws"
    finally:
        await runner.cleanup()


class Recorder:
    """An aiohttp WebSocket endpoint that records what it receives (the CSC's reader)."""

    def __init__(self, *, autoping: bool = True) -> None:
        self.messages: asyncio.Queue[tuple[WSMsgType, object]] = asyncio.Queue()
        self.headers: dict[str, str] = {}
        self.query = ""
        self.ws: web.WebSocketResponse | None = None
        self.transport: asyncio.BaseTransport | None = None
        self.autoping = autoping
        self.ready = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.headers = dict(request.headers)
        self.query = request.query_string
        self.transport = request.transport
        ws = web.WebSocketResponse(max_msg_size=MAX, autoping=self.autoping, compress=False)
        await ws.prepare(request)
        self.ws = ws
        self.ready.set()
        async for msg in ws:
            await self.messages.put((msg.type, msg.data))
        await self.messages.put((WSMsgType.CLOSED, ws.close_code))
        return ws


async def _open(url: str, **kwargs: ssl.SSLContext) -> AgentWebSocket:
    headers = {"Authorization": "Bearer secret-token"}
    return await asyncio.wait_for(connect(url, headers, max_size=MAX, **kwargs), scaled(10))


# -- framing without a socket ---------------------------------------------------------------------


def test_frame_header_length_forms() -> None:
    assert frame_header(0, KEY) == b"\x82\x80" + KEY
    assert frame_header(125, KEY) == b"\x82\xfd" + KEY
    assert frame_header(126, KEY) == b"\x82\xfe\x00\x7e" + KEY
    assert frame_header(65535, KEY) == b"\x82\xfe\xff\xff" + KEY
    assert frame_header(65536, KEY) == b"\x82\xff" + (65536).to_bytes(8, "big") + KEY


@given(st.lists(st.binary(max_size=3000), max_size=12), st.binary(min_size=4, max_size=4))
def test_piecewise_masking_equals_masking_the_whole(chunks: list[bytes], key: bytes) -> None:
    views = [memoryview(c) if i % 2 else c for i, c in enumerate(chunks)]
    assert b"".join(mask_chunks(views, key)) == reference_mask(b"".join(chunks), key)


# -- against an aiohttp server ------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes",
    [
        [12, 5],  # one small message
        [12, 125],
        [12, 126, 12, 3],  # misaligned offsets after a short chunk
        [12, 65535, 12, 65536, 7],
        [12, 1 << 20, 12, 1 << 20, 12, 0],
        [12, 300_001, 1, 2, 3, 200_000],
    ],
)
async def test_masked_messages_arrive_intact(sizes: list[int]) -> None:
    recorder = Recorder()
    async with _server(recorder.handle) as url:
        ws = await _open(url)
        chunks = [os.urandom(n) for n in sizes]
        views: list[bytes | memoryview] = [
            memoryview(c)[:] if i % 3 == 1 else c for i, c in enumerate(chunks)
        ]
        await ws.send_chunks(views)
        await ws.send_bytes(b"second")
        assert await recorder.messages.get() == (WSMsgType.BINARY, b"".join(chunks))
        assert await recorder.messages.get() == (WSMsgType.BINARY, b"second")
        await ws.close()
        assert await recorder.messages.get() == (WSMsgType.CLOSED, 1000)


async def test_handshake_headers_token_and_no_compression() -> None:
    recorder = Recorder()
    async with _server(recorder.handle) as url:
        ws = await _open(url)
        await recorder.ready.wait()
        assert recorder.headers["Authorization"] == "Bearer secret-token"
        assert "Sec-WebSocket-Extensions" not in recorder.headers
        assert recorder.query == ""
        await ws.close()


async def test_receives_binary_answers_pings_and_rejects_text() -> None:
    recorder = Recorder(autoping=False)
    async with _server(recorder.handle) as url:
        ws = await _open(url)
        await recorder.ready.wait()
        assert recorder.ws is not None
        await recorder.ws.send_bytes(b"one")
        await recorder.ws.ping(b"hb")
        await recorder.ws.send_bytes(b"two")
        assert await ws.receive() == b"one"
        assert await ws.receive() == b"two"
        assert await recorder.messages.get() == (WSMsgType.PONG, b"hb")
        await recorder.ws.send_str("no text")
        with pytest.raises(ProtocolError, match="text messages"):
            await ws.receive()
        await ws.close(1002, "text")
        assert await recorder.messages.get() == (WSMsgType.CLOSED, 1002)


async def test_server_close_code_and_reason() -> None:
    async def refuse(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(b"before")
        await ws.close(code=4403, message=b"alias not covered")
        return ws

    async with _server(refuse) as url:
        ws = await _open(url)
        assert await ws.receive() == b"before"
        assert await ws.receive() is None
        assert (ws.close_code, ws.close_reason) == (4403, "alias not covered")
        await asyncio.wait_for(ws.closed, scaled(10))
        with pytest.raises(ConnectionResetError):
            await ws.send_bytes(b"late")


async def test_link_end_closes_with_its_close_code() -> None:
    """run_link closes the WebSocket with the link's error (the agent's run_websocket)."""
    recorder = Recorder()
    async with _server(recorder.handle) as url:
        ws = await _open(url)
        conn = Connection(Side.CLIENT, LinkSettings(), accept_streams=True, now=0.0)
        link = Link(conn, ws.send_chunks, name="test")
        runner = asyncio.create_task(run_link(ws, link))
        link.close(AgentLost("gone"))
        await asyncio.wait_for(runner, scaled(10))
        kind, code = await recorder.messages.get()
        while kind is not WSMsgType.CLOSED:
            kind, code = await recorder.messages.get()
        assert code == AgentLost().spec.close_code
        await link.aclose()


@pytest.mark.parametrize("status", [401, 403, 503])
async def test_refused_upgrade_carries_status_and_json_reason(status: int) -> None:
    async def refuse(request: web.Request) -> web.StreamResponse:
        body = {"error": "auth_failed", "message": f"refused with {status}"}
        return web.json_response(body, status=status)

    async with _server(refuse) as url:
        with pytest.raises(HandshakeRefused) as refused:
            await _open(url)
    assert refused.value.status == status
    assert refused.value.reason == f"refused with {status}"


async def test_refusal_without_json_falls_back_to_the_reason_phrase() -> None:
    async def refuse(request: web.Request) -> web.StreamResponse:
        return web.Response(status=404, text="nope")

    async with _server(refuse) as url:
        with pytest.raises(HandshakeRefused) as refused:
            await _open(url)
    assert (refused.value.status, refused.value.reason) == (404, "Not Found")


async def test_a_non_http_answer_is_a_handshake_error() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-nope\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(HandshakeError):
            await _open(f"ws://127.0.0.1:{port}/ws")


async def test_oversized_message_closes_with_1009() -> None:
    recorder = Recorder()
    async with _server(recorder.handle) as url:
        ws = await asyncio.wait_for(connect(url, {}, max_size=1000), scaled(10))
        await recorder.ready.wait()
        assert recorder.ws is not None
        await recorder.ws.send_bytes(bytes(1001))
        assert await ws.receive() is None
        assert await recorder.messages.get() == (WSMsgType.CLOSED, 1009)


async def test_connection_loss_ends_receive_and_fails_sends() -> None:
    recorder = Recorder()
    async with _server(recorder.handle) as url:
        ws = await _open(url)
        await recorder.ready.wait()
        assert isinstance(recorder.transport, asyncio.Transport)
        recorder.transport.abort()
        assert await ws.receive() is None
        assert ws.close_code == 1006
        with pytest.raises(ConnectionResetError):
            await ws.send_bytes(b"x")


# -- backpressure ------------------------------------------------------------------------------


class StalledServer:
    """A websockets sans-I/O server that accepts, then reads only once ``reading`` is set."""

    def __init__(self) -> None:
        self.reading = asyncio.Event()
        self.received = bytearray()
        self.done = asyncio.Event()
        self.expected = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        proto = ServerProtocol(max_size=None)
        while not (events := proto.events_received()):
            proto.receive_data(await reader.read(65536))
        proto.send_response(proto.accept(events[0]))  # type: ignore[arg-type]
        writer.writelines(proto.data_to_send())
        await self.reading.wait()
        while len(self.received) < self.expected:
            proto.receive_data(await reader.read(1 << 20))
            for frame in proto.events_received():
                self.received += frame.data  # type: ignore[union-attr]
        self.done.set()
        writer.close()


async def test_sender_waits_while_the_transport_is_paused() -> None:
    stalled = StalledServer()
    server = await asyncio.start_server(stalled.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    message = 1 << 20
    count = 64
    stalled.expected = message * count
    payloads = [bytes([i]) * message for i in range(count)]
    async with server:
        ws = await _open(f"ws://127.0.0.1:{port}/ws")
        sent = 0

        async def sender() -> None:
            nonlocal sent
            for payload in payloads:
                await ws.send_chunks([payload[:12], memoryview(payload)[12:]])
                sent += 1

        task = asyncio.create_task(sender())
        await _until(lambda: ws.writing_paused and not task.done())
        # paused: at most the high-water mark plus the one message that crossed it is buffered
        assert ws.write_buffer_size <= 256 * 1024 + message + 14
        assert sent < count
        stalled.reading.set()
        await asyncio.wait_for(task, scaled(30))
        await asyncio.wait_for(stalled.done.wait(), scaled(30))
        assert stalled.received == b"".join(payloads)
        ws.abort()


# -- TLS ----------------------------------------------------------------------------------------


def _tls(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext, ssl.SSLContext]:
    ca, other = trustme.CA(), trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca_file, other_file = tmp_path / "ca.pem", tmp_path / "other.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    other.cert_pem.write_to_path(str(other_file))
    trusting = ssl.create_default_context(cafile=str(ca_file))
    distrusting = ssl.create_default_context(cafile=str(other_file))
    return server_ctx, trusting, distrusting


async def test_tls_verifies_the_server_against_the_ca_file(tmp_path: Path) -> None:
    server_ctx, trusting, distrusting = _tls(tmp_path)
    recorder = Recorder()
    async with _server(recorder.handle, server_ctx) as url:
        with pytest.raises(ssl.SSLCertVerificationError):
            await _open(url, ssl_context=distrusting)
        ws = await _open(url, ssl_context=trusting)
        data = os.urandom(300_000)
        await ws.send_chunks([data[:12], data[12:]])
        assert await recorder.messages.get() == (WSMsgType.BINARY, data)
        await ws.close(4000, json.dumps({"bye": True}))
        assert await recorder.messages.get() == (WSMsgType.CLOSED, 4000)
