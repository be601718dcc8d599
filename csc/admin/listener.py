"""The admin listener: the admin API (csc/admin/api.py) and the web console
(csc/admin/console.py) on ``admin_listen``, TLS when the node has certificates; its URL is written
to ``<state-dir>/admin-url`` for ``csc admin`` and removed when the listener stops.

The socket listens from the node's start, but aiohttp and the admin application (about 11 MiB
resident together) are loaded only when the first connection arrives: until then each accepted
connection is held by a :class:`_Held` protocol that keeps what the client sends, and once the
application is ready every held connection is handed to aiohttp's request handler with those
bytes, so the first requests are served, never refused. Later connections go to aiohttp directly.

Invariants: the application is loaded at most once at a time (one task); a held connection keeps
at most :data:`HOLD_LIMIT` bytes before it stops reading; if loading fails, the held connections
are closed, the failure is logged, and the next connection tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from csc.state import NodeState
from shared.aio import cancel_quietly
from shared.oserrors import describe_os_error
from shared.runtime import listen_on

log = logging.getLogger("csc.admin.listener")

#: Bytes a connection may send before the admin application is loaded (then it stops reading).
HOLD_LIMIT = 64 * 1024
#: ``<state-dir>/admin-url`` (csc.admin.api.URL_FILE, csc.admin.client.URL_FILE).
URL_FILE = "admin-url"


def _url(sockname: Any, tls: bool) -> str:
    host, port = sockname[0], sockname[1]
    address = ipaddress.ip_address(host)
    if address.is_unspecified:  # bound to every address: reach it over loopback
        host = "::1" if address.version == 6 else "127.0.0.1"
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}"


class _Held(asyncio.Protocol):
    """A connection accepted before the admin application was loaded."""

    def __init__(self, listener: AdminListener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.data = bytearray()
        self.eof = False
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.listener.hold(self)

    def data_received(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= HOLD_LIMIT and self.transport is not None and not self.paused:
            self.transport.pause_reading()
            self.paused = True

    def eof_received(self) -> bool:
        self.eof = True
        return True  # keep the transport: the request may still be answered

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.listener.held.discard(self)

    def hand_over(self, protocol: asyncio.Protocol) -> None:
        """Give the connection, and what it sent so far, to ``protocol`` (aiohttp's)."""
        transport = self.transport
        if transport is None:
            return
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.data:
            protocol.data_received(bytes(self.data))
        if self.eof and not protocol.eof_received():
            transport.close()
        if self.paused:
            transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


@dataclass(eq=False)
class AdminListener:
    """The listening socket and, once a connection came, the admin application's runner."""

    state: NodeState
    ssl_ctx: ssl.SSLContext | None
    server: asyncio.Server | None = None
    url: str = ""
    address: str = ""
    url_file: Path = Path()
    #: aiohttp's web.AppRunner once the application is loaded
    runner: Any = None
    held: set[_Held] = field(default_factory=set)
    _loading: asyncio.Task[None] | None = None

    def protocol(self) -> asyncio.Protocol:
        """A new connection's protocol: aiohttp's once loaded, else a :class:`_Held`."""
        if self.runner is not None:
            handler: asyncio.Protocol = self.runner.server()
            return handler
        return _Held(self)

    def hold(self, conn: _Held) -> None:
        self.held.add(conn)
        if self._loading is None or self._loading.done():
            self._loading = asyncio.create_task(self._load(), name="admin-api-load")

    async def _load(self) -> None:
        try:
            self.runner = await _make_runner(self.state)
        except Exception:
            log.exception("the admin API could not start; closing its waiting connections")
            for conn in list(self.held):
                conn.abort()
            self.held.clear()
            return
        for conn in list(self.held):
            conn.hand_over(self.runner.server())
        self.held.clear()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        if self._loading is not None:
            await cancel_quietly(self._loading)
        for conn in list(self.held):
            conn.abort()
        self.held.clear()
        if self.runner is not None:
            await self.runner.cleanup()  # closes aiohttp's connections (shutdown timeout)
        if self.server is not None:
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
        try:
            if self.url_file.read_text().strip() == self.url:
                self.url_file.unlink()
        except OSError:
            pass


async def _make_runner(state: NodeState) -> Any:
    """The admin application (API and console) in a set-up aiohttp runner with no site: the
    listener's connections are handed to its ``server``."""
    from aiohttp import web

    from csc.admin import console
    from csc.admin.api import create_admin_app

    app = create_admin_app(state)
    console.mount(app)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    return runner


async def start_listener(state: NodeState, ssl_ctx: ssl.SSLContext | None) -> AdminListener:
    """Listen on ``admin_listen``; its URL goes to ``<state-dir>/admin-url``. The admin
    application is loaded when the first connection arrives (see the module docstring)."""
    listen = state.config.admin_listen_address
    assert listen is not None
    if state.store is None:
        raise ValueError("the admin API needs a store")
    listener = AdminListener(state, ssl_ctx)
    loop = asyncio.get_running_loop()
    try:
        listener.server = await loop.create_server(
            listener.protocol, **listen_on(*listen), ssl=ssl_ctx
        )
    except OSError as exc:
        reason = describe_os_error(exc, state.config.admin_listen)
        raise OSError(exc.errno, f"admin API: {reason}") from None
    sockname = listener.server.sockets[0].getsockname()
    listener.url = url = _url(sockname, ssl_ctx is not None)
    listener.address = url.split("://", 1)[1]
    listener.url_file = url_file = state.config.state_dir / URL_FILE
    url_file.write_text(url + "\n")
    if not ipaddress.ip_address(sockname[0]).is_loopback:
        log.warning("the admin API listens on %s, beyond loopback", state.config.admin_listen)
    log.info(
        "admin API on %s/v1/admin/ (URL in %s), web console on %s/console/", url, url_file, url
    )
    return listener
