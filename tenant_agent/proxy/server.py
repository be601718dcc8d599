"""``csc-agent proxy``: the local/DMZ proxy, an inbound listener that forwards to the portal.

Bootloaders configured with Host and Port (instead of an alias) connect here. With an
``http(s)://`` upstream the proxy is an HTTP/1.1 reverse proxy (:mod:`tenant_agent.proxy.http`,
whose portal side is the agent's own pooled client); with ``tcp://host:port`` it forwards bytes
both ways, half-closes included (:mod:`tenant_agent.proxy.tcp`), so TLS can run end to end.

Lifecycle: :class:`ProxyServer` listens (port 0 allowed: the bound address goes to stderr and to
the ready file), serves until SIGTERM or SIGINT, then drains: it stops accepting, lets requests
in flight finish within ``drain_timeout``, aborts what is left and returns 0. A listener that
cannot be opened (address in use, TLS material that does not load) raises
:class:`ProxyStartError`, which the command reports in one line with exit status 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import sys
from pathlib import Path
from typing import Any, Protocol

from shared import runtime
from shared.cli_support import EXIT_OK, EXIT_USAGE
from shared.oserrors import describe_os_error
from shared.runtime import sockname_address
from tenant_agent.http_request import parse_origin
from tenant_agent.http_upstream import HttpUpstream
from tenant_agent.proxy.config import ProxyConfig
from tenant_agent.proxy.http import HttpFrontend
from tenant_agent.proxy.tcp import TcpFrontend

log = logging.getLogger("csc_agent.proxy")

PROG = "csc-agent proxy"
BACKLOG = 1024


class ProxyStartError(Exception):
    """The proxy cannot start with this configuration (the message says why)."""


class Frontend(Protocol):
    """What the listener needs of a mode: a protocol factory and the drain steps."""

    def protocol(self) -> asyncio.Protocol: ...

    def begin_drain(self) -> None: ...

    async def wait_idle(self, timeout: float) -> bool: ...

    async def close(self) -> None: ...


def upstream_name(config: ProxyConfig) -> str:
    """The upstream for messages: scheme, host, port and prefix, never credentials."""
    if config.mode == "tcp":
        host, port = config.tcp_address
        return f"tcp://{host}:{port}"
    return parse_origin(config.upstream).name


class ProxyServer:
    """A running proxy: the listener, its mode's frontend, and the drain."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        try:
            self._server_ssl = config.server_ssl()
            client_ssl = config.client_ssl()
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ProxyStartError(f"cannot load the TLS material: {exc}") from None
        self.frontend: Frontend
        if config.mode == "tcp":
            self.frontend = TcpFrontend(config)
        else:
            upstream = HttpUpstream(
                config.upstream,
                connect_timeout=config.upstream_connect_timeout,
                read_timeout=config.upstream_timeout,
                ssl_context=client_ssl,
            )
            self.frontend = HttpFrontend(config, upstream, tls=self._server_ssl is not None)
        self.server: asyncio.Server | None = None
        self.address = ""

    @property
    def url(self) -> str:
        """Where bootloaders connect (``tcp://`` in TCP mode)."""
        if self.config.mode == "tcp":
            scheme = "tls" if self._server_ssl is not None else "tcp"
        else:
            scheme = "https" if self._server_ssl is not None else "http"
        return f"{scheme}://{self.address}"

    async def start(self) -> None:
        """Open the listener; raises :class:`ProxyStartError` if it cannot."""
        host, port = self.config.listen_address
        extra: dict[str, Any] = {}
        if self._server_ssl is not None:
            extra = {"ssl": self._server_ssl, "ssl_handshake_timeout": self.config.header_timeout}
        loop = asyncio.get_running_loop()
        try:
            self.server = await loop.create_server(
                self.frontend.protocol, host, port, backlog=BACKLOG, reuse_address=True, **extra
            )
        except OSError as exc:
            reason = describe_os_error(exc, self.config.listen)
            raise ProxyStartError(f"cannot listen: {reason}") from None
        self.address = sockname_address(self.server.sockets[0].getsockname())

    async def drain(self) -> bool:
        """Stop accepting, let requests in flight finish (``drain_timeout``), then close.

        Returns whether everything finished in time."""
        if self.server is not None:
            self.server.close()
        self.frontend.begin_drain()
        timeout = self.config.drain_timeout
        log.info("draining: up to %g s for the requests in flight", timeout)
        finished = await self.frontend.wait_idle(timeout)
        if not finished:
            log.warning("drain deadline passed: closing the connections still open")
        await self.close()
        return finished

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        await self.frontend.close()
        if self.server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.server.wait_closed()


def write_ready_file(path: Path, server: ProxyServer) -> None:
    data = {"listen": server.address, "mode": server.config.mode, "pid": os.getpid()}
    runtime.write_ready_file(path, data)


async def run_proxy(config: ProxyConfig, ready_file: Path | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain; the exit status."""
    try:
        server = ProxyServer(config)
        await server.start()
    except ProxyStartError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if ready_file is not None:
            write_ready_file(ready_file, server)
    except OSError as exc:
        await server.close()
        print(f"{PROG}: cannot write the ready file {ready_file}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    stop = runtime.stop_event()
    target = upstream_name(config)
    log.info("proxy listening on %s, forwarding to %s", server.url, target)
    await stop.wait()
    await server.drain()
    log.info("stopped")
    return EXIT_OK


def run(config: ProxyConfig, *, ready_file: Path | None = None) -> int:
    return runtime.run(run_proxy(config, ready_file))
