"""The heartbeat's short way on the CSC (csc/relay/websocket.py, ``Link.answer_ping``), over a
real socket: a message that is one link PING is answered at once with its ACK and counts as
liveness, other shapes (two PINGs in one message, a PING split over two messages) take the
common way with the same answers, and a peer that falls silent is still closed with 4408
``heartbeat_timeout`` once it has sent nothing for ``heartbeat_timeout`` (docs/protocol.md §7).
"""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path
from urllib.parse import urlsplit

from csc.relay.wsframes import OP_BINARY, OP_CLOSE, parse_close
from shared.protocol.codec import (
    FLAG_ACK,
    VERSION,
    FrameDecoder,
    FrameType,
    encode_frame,
    encode_json,
)
from tests.integration.test_agent_upgrade import _frame, _response
from tests.support.inproc import Relay, relay
from tests.support.procs import scaled
from tests.unit.test_wsframes import client_frame

KEY = base64.b64encode(b"0123456789abcdef").decode()
HELLO = {
    "version": VERSION,
    "settings": {"initial_window": 262144, "max_frame": 262144, "max_streams": 16},
    "agent": "test-heartbeat/1",
}

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _session(r: Relay) -> Conn:
    """An agent session through the upgrade, HELLO and WELCOME."""
    url = urlsplit(r.csc_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    host = url.netloc
    writer.write(
        (
            f"GET /v1/agent/connect HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {r.token}\r\nConnection: Upgrade\r\n"
            f"Upgrade: websocket\r\nSec-WebSocket-Key: {KEY}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    status, _, _ = await _response(reader)
    assert status == 101
    hello = encode_frame(FrameType.HELLO, 0, 0, encode_json(HELLO))
    writer.write(client_frame(OP_BINARY, hello))
    types = await _link_frames(reader)
    assert types[0][0] == FrameType.WELCOME
    return reader, writer


async def _link_frames(reader: asyncio.StreamReader) -> list[tuple[int, int, bytes]]:
    """The link frames of the next binary message: (type, flags, payload) each."""
    opcode, payload = await _frame(reader)
    assert opcode == OP_BINARY, (opcode, payload)
    return [(f.type, f.flags, bytes(f.payload)) for f in FrameDecoder(1 << 20).feed(payload)]


async def _acks(reader: asyncio.StreamReader, count: int) -> list[bytes]:
    """The payloads of the next ``count`` ACKs (the server's own PINGs are answered)."""
    got: list[bytes] = []
    while len(got) < count:
        for ftype, flags, payload in await _link_frames(reader):
            assert ftype == FrameType.PING
            if flags & FLAG_ACK:
                got.append(payload)
    return got


def _ping(token: bytes) -> bytes:
    return encode_frame(FrameType.PING, 0, 0, token)


async def test_lone_pings_are_answered_and_count_as_liveness(tmp_path: Path) -> None:
    timeout = scaled(1.5)
    csc = {"heartbeat_interval": timeout / 3, "heartbeat_timeout": timeout}
    async with relay(tmp_path, csc=csc, start=False) as r:
        reader, writer = await _session(r)
        (session,) = r.node.state.sessions.values()
        link = session.link
        loop = asyncio.get_running_loop()

        # lone PINGs for twice the timeout: each answered with its bytes, the link stays up
        until = loop.time() + 2 * timeout
        while loop.time() < until:
            token = os.urandom(8)
            writer.write(client_frame(OP_BINARY, _ping(token)))
            assert await _acks(reader, 1) == [token]
            await asyncio.sleep(timeout / 6)
        assert not link.is_closed

        # the common way: two PINGs in one message, and one PING split over two messages
        one, two, three = (os.urandom(8) for _ in range(3))
        writer.write(client_frame(OP_BINARY, _ping(one) + _ping(two)))
        assert await _acks(reader, 2) == [one, two]
        split = _ping(three)
        writer.write(client_frame(OP_BINARY, split[:5]) + client_frame(OP_BINARY, split[5:]))
        assert await _acks(reader, 1) == [three]

        # then silence: closed with 4408 once nothing arrived for the timeout, never before
        silent_from = loop.time()
        async with asyncio.timeout(scaled(10) + timeout):
            while True:
                opcode, payload = await _frame(reader)
                if opcode == OP_CLOSE:
                    break
        assert loop.time() - silent_from >= timeout * 0.99
        code, reason = parse_close(payload)
        assert code == 4408 and reason.startswith("heartbeat_timeout"), (code, reason)
        assert link.is_closed
        writer.close()
