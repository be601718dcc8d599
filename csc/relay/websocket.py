"""The CSC's side of an agent WebSocket: aiohttp's server WebSocket pumped into a :class:`Link`.

Every received binary message goes to :meth:`Link.feed`; a link-level fault closes the
WebSocket with the error's close code (docs/protocol.md §8); when the link ends for any other
reason (heartbeat timeout, shutdown) the WebSocket is closed with that reason too. A
:class:`Traffic` counts the message bytes each way (plain integer additions, one per message).

The next message is pulled from aiohttp (``receive`` is pull-based) only once
:meth:`Link.wait_readable` returns: while the agent does not read what the link answers, the
CSC stops reading it, aiohttp's own queue fills and pauses the socket, and the agent's sends
block in its kernel. A closing handshake takes at most ``CLOSE_TIMEOUT``, and a link closed
as stalled (:class:`~shared.errors.LinkStalled`) is aborted at once: its peer reads nothing,
so neither a close frame nor the bytes still buffered for it would ever leave.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from aiohttp import WSMessage, WSMsgType

from shared.errors import CSCError, LinkStalled, ProtocolError
from shared.link import Link, SendFn

#: How long closing the WebSocket may take before its transport is aborted.
CLOSE_TIMEOUT = 5.0

#: Drops the connection at once (the transport's ``abort``).
AbortFn = Callable[[], None]


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

    async def receive(self, timeout: float | None = None) -> WSMessage: ...


async def close_websocket(ws: WebSocketLike, err: CSCError, abort: AbortFn | None = None) -> None:
    """Close with the error's close code and ``code: message`` as the reason (≤ 123 bytes).

    With ``abort``: a stalled link is aborted first, and a closing handshake that takes longer
    than ``CLOSE_TIMEOUT`` (or is cancelled) ends with an abort too.
    """
    reason = f"{err.code}: {err.message}".encode()[:120]
    if abort is not None and isinstance(err, LinkStalled):
        abort()
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await ws.close(code=err.spec.close_code, message=reason)
    except asyncio.CancelledError:
        if abort is not None:
            abort()
        raise
    except Exception:
        if abort is not None:
            abort()


async def _close_when_link_ends(ws: WebSocketLike, link: Link, abort: AbortFn | None) -> None:
    err = await link.closed
    if not ws.closed:
        await close_websocket(ws, err, abort)


async def run_websocket(
    ws: WebSocketLike,
    link: Link,
    traffic: Traffic | None = None,
    abort: AbortFn | None = None,
) -> None:
    """Feed received messages to the link until either side ends it; then close the link.

    ``abort`` drops the connection (see :func:`close_websocket`)."""
    watcher = asyncio.ensure_future(_close_when_link_ends(ws, link, abort))
    counted = traffic if traffic is not None else Traffic()
    try:
        while True:
            await link.wait_readable()
            if link.is_closed:
                return
            msg = await ws.receive()
            if msg.type == WSMsgType.BINARY:
                counted.bytes_in += len(msg.data)
                try:
                    await link.receive(msg.data)
                except CSCError as err:
                    await close_websocket(ws, err, abort)
                    return
            elif msg.type in (
                WSMsgType.ERROR,
                WSMsgType.CLOSE,
                WSMsgType.CLOSING,
                WSMsgType.CLOSED,
            ):
                return
            else:
                violation = ProtocolError("text messages are not part of the protocol")
                link.close(violation)
                await close_websocket(ws, violation, abort)
                return
    finally:
        link.close()
        with contextlib.suppress(Exception):  # it closes the WebSocket (bounded) or sees it closed
            await watcher
