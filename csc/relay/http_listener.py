"""The CSC's public listener as a whole: :class:`HttpFront` holds the listening socket (plain
or TLS), the bounds its connections share (csc/relay/http_front.py), the upgrade paths and the drain.

Invariant: a connection switched to another protocol (an agent's WebSocket) is no longer one
of :attr:`HttpFront.connections`; the task serving it is in :attr:`HttpFront.switched` until it
ends, and :meth:`HttpFront.close` waits for it (briefly) before cancelling it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from csc.config import CSCConfig
from csc.relay.conncap import ConnectionCounts
from csc.relay.http_front import FrontConnection, Handler
from csc.relay.http_front_request import FrontRequest
from csc.relay.proxied import ProxiedServer, listen_proxied
from shared.runtime import listen_on

#: Serves a request for an upgrade path; it answers it, or switches the connection.
UpgradeHandler = Callable[[FrontConnection, FrontRequest], Awaitable[None]]


class HttpFront:
    """The public listener: connections, shared bounds, upgrade paths, drain."""

    def __init__(
        self,
        config: CSCConfig,
        handler: Handler,
        *,
        draining: Any,
        tls: bool = False,
        upgrades: Mapping[str, UpgradeHandler] | None = None,
        counts: ConnectionCounts | None = None,
    ) -> None:
        self.config = config
        self.handler = handler
        self.draining = draining
        self.tls = tls
        #: Paths served by an :data:`UpgradeHandler` (``/v1/agent/connect``).
        self.upgrades: Mapping[str, UpgradeHandler] = upgrades or {}
        self.loop = asyncio.get_running_loop()
        self.connections: set[FrontConnection] = set()
        #: connections per client address, shared with the TCP listener (csc/relay/conncap.py)
        self.counts = counts or ConnectionCounts.from_config(config)
        #: Tasks serving connections switched to another protocol (agent WebSockets).
        self.switched: set[asyncio.Task[None]] = set()
        #: Bytes of unfinished request heads across connections, and connections refused for it.
        self.head_bytes = 0
        self.heads_refused = 0
        self.server: asyncio.Server | ProxiedServer | None = None

    async def start(
        self, host: str, port: int, ssl: Any = None, ssl_handshake_timeout: float | None = None
    ) -> asyncio.Server | ProxiedServer:
        proxied = await listen_proxied(  # behind a balancer that names the client
            self.config,
            host,
            port,
            lambda client: lambda: FrontConnection(self, client),
            ssl=ssl,
            handshake=ssl_handshake_timeout,
            listener="http",
            on_refused=self.counts.on_refused,
            backlog=1024,
        )
        if proxied is not None:
            self.server = proxied
            return proxied
        self.server = await self.loop.create_server(  # listen_on: no DNS thread pool for a literal
            lambda: FrontConnection(self),
            **listen_on(host, port),
            ssl=ssl,
            backlog=1024,
            ssl_handshake_timeout=ssl_handshake_timeout,
        )
        return self.server

    def stop_accepting(self) -> None:
        """Close the listening socket (drain); idle keep-alive connections close now, busy
        ones once their response is written (it says ``Connection: close``)."""
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            idle = conn._task is None and not conn._requests and not conn._head_bytes
            if idle and conn.transport is not None:
                conn.transport.close()

    async def close(self, grace: float = 1.0) -> None:
        """Close every connection (the end of a drain or a stop); a switched connection's task
        gets ``grace`` seconds to end by itself (its owner closes it first), then is cancelled."""
        self.stop_accepting()
        for conn in list(self.connections):
            conn.abort()
        if self.switched:
            _, pending = await asyncio.wait(set(self.switched), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=grace)
        if self.server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 1.0)
