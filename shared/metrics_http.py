"""A listener that serves ``GET /metrics`` and nothing else (``metrics_listen`` of the CSC and
of the agent).

An asyncio ``Protocol`` parsing requests with llhttp (httptools, loaded anyway for the public
listener), so that neither program needs aiohttp for its metrics. The answers are those the
former aiohttp route gave:

* ``GET`` or ``HEAD`` of ``/metrics`` (any query string): 200, ``render()`` with the given
  content type (no body for ``HEAD``);
* another method on ``/metrics``: 405 with ``Allow: GET,HEAD``; any other path: 404; both with
  aiohttp's plain-text bodies (``404: Not Found``);
* a request llhttp refuses: 400 and the connection closes.

Keep-alive follows the request (HTTP/1.0 without ``keep-alive``, or ``Connection: close``,
closes after the answer). Invariants: memory per connection is bounded: request bodies are
discarded as they arrive, the URL and the head are capped (431 beyond :data:`MAX_HEAD`), and
reading pauses while the transport's write buffer is above its high-water mark (a client that
pipelines requests but reads no answers); a connection without a request for
:data:`IDLE_TIMEOUT` seconds is closed.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from http import HTTPStatus
from typing import cast

import httptools

from shared.runtime import listen_on, sockname_address

PATH = "/metrics"
#: Bytes of request line and header fields accepted (aiohttp's default limits are similar).
MAX_HEAD = 16 * 1024
#: Seconds an idle connection stays open (aiohttp's keep-alive timeout was 75 s).
IDLE_TIMEOUT = 75.0
_TEXT = "text/plain; charset=utf-8"
_CLOSE = "Connection: close\r\n"


def _answer(
    status: int, content_type: str, body: bytes, *, head_only: bool, close: bool, extra: str = ""
) -> bytes:
    phrase = HTTPStatus(status).phrase
    head = (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}"
        f"{_CLOSE if close else ''}\r\n"
    ).encode("latin-1")
    return head if head_only else head + body


def _error(status: int, *, close: bool, extra: str = "") -> bytes:
    body = f"{status}: {HTTPStatus(status).phrase}".encode()
    return _answer(status, _TEXT, body, head_only=False, close=close, extra=extra)


class _Connection(asyncio.Protocol):
    """One client connection: parse requests, answer each as soon as it is complete."""

    def __init__(
        self, render: Callable[[], bytes], content_type: str, server: MetricsServer
    ) -> None:
        self._render = render
        self._content_type = content_type
        self._server = server
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._head = 0
        self._idle: asyncio.TimerHandle | None = None

    # -- transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._server.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        self._transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # the request was answered; no protocol switch here
            self.close()
        except httptools.HttpParserError as exc:  # a callback's exception comes as its context
            status = 431 if isinstance(exc.__context__, _HeadTooLarge) else 400
            self._reply(_error(status, close=True), close=True)

    def pause_writing(self) -> None:  # the client does not read its answers: stop reading
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # -- llhttp callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._head = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))

    def on_message_complete(self) -> None:
        method = self._parser.get_method()
        close = not self._parser.should_keep_alive()
        path = self._url.split(b"?", 1)[0]
        if path != PATH.encode():
            answer = _error(404, close=close)
        elif method in (b"GET", b"HEAD"):
            body = self._render()
            answer = _answer(
                200, self._content_type, body, head_only=method == b"HEAD", close=close
            )
        else:
            answer = _error(405, close=close, extra="Allow: GET,HEAD\r\n")
        self._reply(answer, close=close)

    # -- helpers

    def _count(self, size: int) -> None:
        self._head += size
        if self._head > MAX_HEAD:
            raise _HeadTooLarge

    def _reply(self, answer: bytes, *, close: bool) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self._transport.write(answer)
        if close:
            self._transport.close()
        else:
            self._arm_idle()

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self.close)


class _HeadTooLarge(Exception):
    """A request head beyond :data:`MAX_HEAD` (answered 431)."""


class MetricsServer:
    """The running listener: its bound ``address`` (``host:port``), and :meth:`stop`."""

    def __init__(self) -> None:
        self.address = ""
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None


async def serve_metrics(
    render: Callable[[], bytes],
    content_type: str,
    host: str,
    port: int,
    *,
    ssl_ctx: ssl.SSLContext | None = None,
) -> MetricsServer:
    """Serve ``render()`` at ``GET /metrics`` on ``host:port`` (port 0: any); OSError as
    ``create_server`` raises it when the address cannot be bound."""
    server = MetricsServer()
    loop = asyncio.get_running_loop()
    listening = await loop.create_server(
        lambda: _Connection(render, content_type, server), **listen_on(host, port), ssl=ssl_ctx
    )
    server._server = listening
    server.address = sockname_address(listening.sockets[0].getsockname())
    return server
