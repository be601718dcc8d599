"""The CSC's side of an agent WebSocket: aiohttp's server WebSocket pumped into a :class:`Link`.

Every received binary message goes to :meth:`Link.feed`; a link-level fault closes the
WebSocket with the error's close code (docs/protocol.md §8); when the link ends for any other
reason (heartbeat timeout, shutdown) the WebSocket is closed with that reason too. A
:class:`Traffic` counts the message bytes each way (plain integer additions, one per message).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import WSMessage, WSMsgType

from shared.errors import CSCError, ProtocolError
from shared.link import Link, SendFn, cancel_quietly


@dataclass(slots=True)
class Traffic:
    """Bytes of WebSocket messages one session carried: from the agent and to it."""

    bytes_in: int = 0
    bytes_out: int = 0


def counting(send: SendFn, traffic: Traffic) -> SendFn:
    """``send``, adding the size of every message to ``traffic.bytes_out``."""

    async def counted(chunks: Sequence[bytes | memoryview]) -> None:
        traffic.bytes_out += sum(map(len, chunks))
        await send(chunks)

    return counted


class WebSocketLike(Protocol):
    """What aiohttp's server WebSocket offers (a Protocol, so tests may substitute one)."""

    @property
    def closed(self) -> bool: ...

    async def close(self, *, code: int = ..., message: bytes = ...) -> bool: ...

    async def send_bytes(self, data: bytes) -> None: ...

    def __aiter__(self) -> Any: ...

    async def __anext__(self) -> WSMessage: ...


async def close_websocket(ws: WebSocketLike, err: CSCError) -> None:
    """Close with the error's close code and ``code: message`` as the reason (≤ 123 bytes)."""
    reason = f"{err.code}: {err.message}".encode()[:120]
    with contextlib.suppress(Exception):
        await ws.close(code=err.spec.close_code, message=reason)


async def _close_when_link_ends(ws: WebSocketLike, link: Link) -> None:
    err = await link.closed
    if not ws.closed:
        await close_websocket(ws, err)


async def run_websocket(ws: WebSocketLike, link: Link, traffic: Traffic | None = None) -> None:
    """Feed received messages to the link until either side ends it; then close the link."""
    watcher = asyncio.ensure_future(_close_when_link_ends(ws, link))
    counted = traffic if traffic is not None else Traffic()
    try:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                counted.bytes_in += len(msg.data)
                try:
                    link.feed(msg.data)
                except CSCError as err:
                    await close_websocket(ws, err)
                    return
            elif msg.type == WSMsgType.ERROR:
                return
            else:
                violation = ProtocolError("text messages are not part of the protocol")
                link.close(violation)
                await close_websocket(ws, violation)
                return
    finally:
        link.close()
        await cancel_quietly(watcher)
