"""``csc serve``: the node's lifecycle, its listeners and the graceful stop.

:func:`build_state` opens the store and the signing key; :class:`Node` runs the node's
lifecycle (joining the cluster, enforcing revocations, returning free memory, closing the store:
async context managers on one exit stack, closed in reverse order) and starts the public HTTP
listener (csc/relay/http_listener.py: the bootloader routes and the agent gateway's upgrades),
the TCP ingress, the admin API (its own listener, csc/admin/listener.py, which loads aiohttp and
the admin application at its first connection) and ``/metrics`` (its own listener,
``metrics_listen``, shared/metrics_http.py); :func:`run_node` writes the ready file, and on
SIGTERM/SIGINT or an admin ``drain`` drains: it stops accepting, sends GOAWAY on every agent
session, lets in-flight streams finish within ``drain_timeout``, then closes the links with 1001
and returns. A lone node at rest has not imported aiohttp (tests/unit/test_imports_at_rest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import resource
import signal
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from csc.admin.listener import AdminListener, start_listener
from csc.cluster.attach import cluster_context
from csc.config import CSCConfig
from csc.metrics import CSCMetrics, start_metrics_listener
from csc.permissions import check_private
from csc.relay import accesslog, gateway
from csc.relay.conncap import LOW_NODE_BOUND
from csc.relay.http_ingress import Ingress
from csc.relay.http_listener import HttpFront
from csc.relay.proxied import ProxiedServer
from csc.relay.registry import MemoryRegistry
from csc.relay.tcp_ingress import start_tcp_listener
from csc.signing import signing_key
from csc.state import NodeState, default_node_id
from csc.store import open_store
from shared import compiled
from shared.allocator import return_free_memory
from shared.config import AUTO
from shared.errors import GoingAway
from shared.metrics_http import MetricsServer
from shared.runtime import install_uvloop, raise_open_file_limit, write_ready_file
from shared.runtime import sockname_address as _hostport

log = logging.getLogger("csc")

#: Where agents connect (their WebSocket upgrade; csc/relay/gateway.py).
AGENT_PATH = "/v1/agent/connect"


def build_state(config: CSCConfig, *, metrics: CSCMetrics | None = None) -> NodeState:
    """Open the store (:func:`csc.store.open_store`: ``csc.db`` or PostgreSQL), load (or
    create, on first start) the signing key (:func:`csc.signing.signing_key`) and, when the
    admin API is on and no operator exists yet, create the ``admin`` operator and its token file.

    Raises :class:`csc.permissions.NotPrivate` first when the state directory, the signing key
    or the admin token file can be read by other users; :class:`csc.store.StoreError` when the
    store cannot be used (StoreUnavailable: its server cannot be reached), SigningKeyError when
    the key cannot be.
    """
    check_private(config)
    store = open_store(config)
    try:
        signing = signing_key(config, store)
        if signing.created:
            log.warning("created a signing key pair in %s", signing.where)
        if config.admin_listen is not None:
            token_file = store.ensure_operator()
            if token_file is not None:
                log.warning("created operator 'admin'; its admin API token is in %s", token_file)
        registry: MemoryRegistry[gateway.AgentSession] = MemoryRegistry(source=store)
        # a remote database is never read on a request's path: the refresh loop and change
        # events re-read it (csc/relay/gateway.py enforce_rights, csc/cluster/)
        registry.refresh_on_miss = config.database_url is None
        registry.refresh(force=True)
    except BaseException:
        store.close()
        raise
    if not isinstance(signing.key, Ed25519PrivateKey):
        log.warning("the signing key is not Ed25519: resolve answers go unsigned")
    return NodeState(
        config=config,
        node_id=config.node_id or default_node_id(),
        registry=registry,
        public_keys=[signing.key.public_key()],
        metrics=metrics or CSCMetrics(),
        store=store,
        resolve_key=signing.key if isinstance(signing.key, Ed25519PrivateKey) else None,
    )


def _close_sessions(state: NodeState) -> None:
    """End every agent link with 1001 (their WebSockets close, their tasks end)."""
    for session in list(state.sessions.values()):
        session.link.close(GoingAway("the CSC is shutting down"))


@contextlib.asynccontextmanager
async def _returning_free_memory() -> AsyncIterator[None]:
    """Free heap pages go back to the OS after a burst (shared/allocator.py)."""
    task = asyncio.create_task(return_free_memory(), name="return-free-memory")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _ssl_context(config: CSCConfig) -> ssl.SSLContext | None:
    if not config.tls_enabled:
        return None
    assert config.tls_cert is not None and config.tls_key is not None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(config.tls_cert, config.tls_key)
    return ctx


async def _spread_goaways(state: NodeState, window: float) -> None:
    """GOAWAY every agent session, at random moments within ``window`` seconds."""
    sessions = list(state.sessions.values())
    loop = asyncio.get_running_loop()
    start = loop.time()
    for at in sorted(random.uniform(0, window) for _ in sessions) if window > 0 else ():
        await asyncio.sleep(max(0.0, start + at - loop.time()))
        session = sessions.pop()
        if not session.link.is_closed:
            session.link.go_away("going_away", "the CSC is shutting down")
    for session in sessions:
        if not session.link.is_closed:
            session.link.go_away("going_away", "the CSC is shutting down")


class Node:
    """A running CSC node: the HTTP site, the TCP ingress and the drain logic."""

    def __init__(self, config: CSCConfig, state: NodeState) -> None:
        self.config = config
        self.state = state
        #: the node's lifecycle (:meth:`_enter_lifecycle`); the store closes last
        self.lifecycle = contextlib.AsyncExitStack()
        if state.store is not None:
            self.lifecycle.callback(state.store.close)
        self.tcp_server: asyncio.Server | ProxiedServer | None = None
        self.front: HttpFront | None = None
        self.http_address = ""
        self.tcp_address: str | None = None
        self.admin: AdminListener | None = None
        self.metrics_listener: MetricsServer | None = None

    async def start(self) -> None:
        ssl_ctx = _ssl_context(self.config)
        await self._enter_lifecycle()
        host, port = self.config.listen_address
        self.front = HttpFront(
            self.config,
            Ingress(self.state),
            draining=lambda: self.state.draining,
            tls=ssl_ctx is not None,
            upgrades={AGENT_PATH: gateway.agent_handler(self.state)},
            counts=self.state.connections,
        )
        # a TLS handshake gets the time a request head gets: no request deadline runs before it
        handshake = self.config.http_head_timeout if ssl_ctx is not None else None
        listening = await self.front.start(host, port, ssl=ssl_ctx, ssl_handshake_timeout=handshake)
        self.http_address = _hostport(listening.sockets[0].getsockname())
        tcp = self.config.tcp_listen_address
        if tcp is not None:
            self.tcp_server = await start_tcp_listener(self.state, *tcp, ssl_ctx, handshake)
            self.tcp_address = _hostport(self.tcp_server.sockets[0].getsockname())
        if self.config.admin_listen_address is not None:
            self.admin = await start_listener(self.state, ssl_ctx)
        if self.config.metrics_listen is not None:
            self.metrics_listener = await start_metrics_listener(
                self.state.metrics, self.config.metrics_listen, ssl_ctx
            )

    async def _enter_lifecycle(self) -> None:
        """Join the cluster (alone: nothing), enforce revocations, return free memory."""
        for context in (
            cluster_context(self.state),
            gateway.enforce_rights(self.state),
            _returning_free_memory(),
        ):
            await self.lifecycle.enter_async_context(context)

    @property
    def admin_address(self) -> str | None:
        return self.admin.address if self.admin is not None else None

    @property
    def metrics_address(self) -> str | None:
        return self.metrics_listener.address if self.metrics_listener is not None else None

    async def drain(self) -> None:
        """Stop taking work, GOAWAY every agent, wait for streams, then close everything.

        In a cluster the node first withdraws its routes and flags itself draining in the
        directory (other nodes stop forwarding to it), keeps forwarding what still reaches it,
        and spreads the GOAWAYs over the first half of the drain window with jitter, so its
        agents reconnect to the other nodes gradually (make-before-break).
        """
        state = self.state
        state.draining = True
        log.info(
            "draining: up to %.0f s for %d streams", self.config.drain_timeout, state.active_streams
        )
        if state.cluster is not None:
            await state.cluster.drain()
        if self.tcp_server is not None:
            self.tcp_server.close()
        if self.front is not None:
            self.front.stop_accepting()  # closes the listening socket; busy connections carry on
        spread = self.config.drain_timeout / 2 if state.cluster is not None else 0.0
        goaways = asyncio.ensure_future(_spread_goaways(state, spread))
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.drain_timeout):
                    await goaways
                    await state.idle.wait()
        finally:
            goaways.cancel()
        if state.active_streams:
            log.warning("drain deadline passed with %d streams in flight", state.active_streams)
        await self.stop()

    async def stop(self) -> None:
        if self.admin is not None:
            await self.admin.stop()
        _close_sessions(self.state)
        if self.front is not None:
            await self.front.close()
        if self.metrics_listener is not None:
            await self.metrics_listener.stop()
        await self.lifecycle.aclose()
        if self.tcp_server is not None:
            self.tcp_server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.tcp_server.wait_closed(), 1.0)
        accesslog.flush()  # the last requests' events now, not when the process exits


@contextlib.asynccontextmanager
async def running_node(config: CSCConfig) -> AsyncIterator[Node]:
    """Start a node for the duration of the block (used by tests and by :func:`serve`)."""
    node = Node(config, build_state(config))
    try:
        await node.start()
    except BaseException:
        await node.stop()  # whatever did start (a listener that could not bind: OSError)
        raise
    try:
        yield node
    finally:
        if not node.state.draining:
            await node.stop()


def _log_connection_bounds(state: NodeState) -> None:
    """The connection bounds in effect, and a warning when ``max_connections = auto`` leaves
    the node few connections."""
    counts = state.connections
    log.info("%s", counts.describe())
    cap = counts.node_cap
    if state.config.max_connections == AUTO and cap is not None and cap < LOW_NODE_BOUND:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        log.warning(
            "the open-file limit (%d) leaves this node %d connections, agent links included: "
            "raise it (LimitNOFILE in a systemd unit, the container's nofile ulimit) or set "
            "max_connections",
            soft,
            cap,
        )


async def run_node(config: CSCConfig, ready_file: Path | None) -> int:
    loop = asyncio.get_running_loop()
    async with running_node(config) as node:
        stop = node.state.stop_requested  # set by a signal or by the admin API's drain
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info(
            "listening: http %s (agents: /v1/agent/connect), tcp %s, admin %s, metrics %s; "
            "state dir %s",
            node.http_address,
            node.tcp_address or "off",
            node.admin_address or "off",
            node.metrics_address or "off",
            config.state_dir,
        )
        log.info("%s", compiled.describe())
        _log_connection_bounds(node.state)
        if ready_file is not None:
            write_ready_file(
                ready_file,
                {
                    "http": node.http_address,
                    "tcp": node.tcp_address,
                    "admin": node.admin_address,
                    "metrics": node.metrics_address,
                    "peer": node.state.cluster.advertised if node.state.cluster else None,
                    "node": node.state.node_id,
                    "pid": os.getpid(),
                },
            )
        await stop.wait()
        await node.drain()
    log.info("stopped")
    return 0


def serve(config: CSCConfig, *, ready_file: Path | None = None) -> int:
    install_uvloop()
    raise_open_file_limit()  # before the node's bounds follow it
    return asyncio.run(run_node(config, ready_file))
