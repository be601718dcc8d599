"""The agent upgrade on the public listener, over raw sockets: refusals as JSON errors, and the
WebSocket's own rules once it is open (ping, close, oversize and text messages, masking)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

from csc.relay.wsframes import OP_BINARY, OP_CLOSE, OP_PING, OP_TEXT, parse_close
from shared.link import max_message_size
from tests.support.inproc import Relay, relay
from tests.support.procs import scaled
from tests.unit.test_wsframes import client_frame

KEY = base64.b64encode(b"0123456789abcdef").decode()


def _head(r: Relay, *, method: str = "GET", extra: str = "", upgrade: bool = True) -> bytes:
    host = urlsplit(r.csc_url).netloc
    lines = [f"{method} /v1/agent/connect HTTP/1.1", f"Host: {host}"]
    lines.append(f"Authorization: Bearer {r.token}")
    if upgrade:
        lines += ["Connection: Upgrade", "Upgrade: websocket", f"Sec-WebSocket-Key: {KEY}"]
    if extra:
        lines.append(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@asynccontextmanager
async def _dial(r: Relay) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    url = urlsplit(r.csc_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        yield reader, writer
    finally:
        writer.close()


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    async with asyncio.timeout(scaled(10)):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                fields[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(fields.get("content-length", "0")))
    return status, fields, body


async def _frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next (unmasked) server frame: opcode and payload."""
    async with asyncio.timeout(scaled(10)):
        first, second = await reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await reader.readexactly(8))
        assert not second & 0x80, "server frames are not masked"
        return first & 0x0F, await reader.readexactly(length)


async def _closed_with(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """Skip to the server's close frame and echo it; its code (then the server closes TCP)."""
    while True:
        opcode, payload = await _frame(reader)
        if opcode == OP_CLOSE:
            writer.write(client_frame(OP_CLOSE, payload[:2]))
            async with asyncio.timeout(scaled(10)):
                assert await reader.read() == b""
            return parse_close(payload)[0]


async def test_refused_upgrades_are_json_errors(tmp_path: Path) -> None:
    async with relay(tmp_path, start=False) as r:
        cases = [
            (_head(r, method="POST"), 405, "method_not_allowed"),
            (_head(r, upgrade=False), 400, "bad_request"),
            (_head(r, extra="Sec-WebSocket-Version: 12"), 400, "bad_request"),
            (
                _head(r, extra="Sec-WebSocket-Version: 13").replace(KEY.encode(), b"short"),
                400,
                "bad_request",
            ),
        ]
        for head, status, code in cases:
            async with _dial(r) as (reader, writer):
                writer.write(head)
                got, fields, body = await _response(reader)
                assert got == status, body
                assert fields["content-type"] == "application/json"
                assert fields["connection"] == "close"
                assert json.loads(body)["error"] == code
                async with asyncio.timeout(scaled(10)):
                    assert await reader.read() == b""  # the connection ends after a refusal
        assert not r.node.state.sessions


async def test_websocket_rules_once_open(tmp_path: Path) -> None:
    async with relay(tmp_path, start=False) as r:
        limit = max_message_size(r.node.config.max_frame)

        async def opened() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            url = urlsplit(r.csc_url)
            reader, writer = await asyncio.open_connection(url.hostname, url.port)
            writer.write(_head(r, extra="Sec-WebSocket-Version: 13"))
            status, _, _ = await _response(reader)
            assert status == 101
            return reader, writer

        # a ping is answered with its payload; a close is echoed and TCP closed by the server
        reader, writer = await opened()
        writer.write(client_frame(OP_PING, b"are you there"))
        assert await _frame(reader) == (0xA, b"are you there")
        writer.write(client_frame(OP_CLOSE, struct.pack("!H", 1000) + b"bye"))
        assert await _closed_with(reader, writer) == 1000
        writer.close()

        # a message over the size limit: 1009, before its payload is sent
        reader, writer = await opened()
        head = bytes((0x82, 0x80 | 127)) + struct.pack("!Q", limit + 1) + os.urandom(4)
        writer.write(head)
        assert await _closed_with(reader, writer) == 1009
        writer.close()

        # an unmasked frame: 1002
        reader, writer = await opened()
        writer.write(client_frame(OP_BINARY, b"hello", mask=False))
        assert await _closed_with(reader, writer) == 1002
        writer.close()

        # text is not part of the protocol: the session ends with the protocol error's code
        reader, writer = await opened()
        writer.write(client_frame(OP_TEXT, b"hello"))
        code = await _closed_with(reader, writer)
        assert code not in (1000, 1001, 1006)
        writer.close()
        assert not r.node.state.sessions
