"""A whole relay in one event loop, for integration tests over real loopback sockets.

:func:`relay` starts the test upstream (HTTP + TCP echo), a CSC node and an agent, and yields a
:class:`Relay` once the alias resolves. Everything binds 127.0.0.1 on port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import trustme

from csc.config import CSCConfig
from csc.server import Node, running_node
from csc.store import Store
from csc.tenants import Actor, TenantUpdate
from shared.config import Secret
from shared.tokens import load_or_create_signing_key
from tenant_agent.agent import Agent
from tenant_agent.config import AgentConfig
from tests.support.procs import scaled
from tests.support.upstream import UpstreamServer, start_upstream_server

ALIAS = "acme@example.com"


@dataclasses.dataclass
class Relay:
    node: Node
    upstream: UpstreamServer
    agent: Agent | None
    agent_task: asyncio.Task[int] | None
    token: str
    state_dir: Path

    @property
    def csc_url(self) -> str:
        return f"http://{self.node.http_address}"

    @property
    def metrics_url(self) -> str:
        """``/metrics`` of the node (its own listener, never the public one)."""
        return f"http://{self.node.metrics_address}/metrics"

    @property
    def tcp_address(self) -> tuple[str, int]:
        assert self.node.tcp_address is not None
        host, _, port = self.node.tcp_address.rpartition(":")
        return host, int(port)

    def tunnel(self, path: str = "/", alias: str = ALIAS) -> str:
        return f"{self.csc_url}/t/{alias}{path}"

    async def stop_agent(self) -> int | None:
        if self.agent is None or self.agent_task is None:
            return None
        self.agent.stop()
        code = await asyncio.wait_for(self.agent_task, scaled(30))
        self.agent = self.agent_task = None
        return code


def make_token(state_dir: Path, tenant: str, aliases: list[str], ttl: float = 3600) -> str:
    """A token for ``tenant``, creating the tenant and assigning it ``aliases`` as needed."""
    key, _ = load_or_create_signing_key(state_dir)
    store = Store(state_dir)
    try:
        token, _ = store.issue_token(
            key,
            tenant=tenant,
            grants=aliases,
            ttl=ttl,
            audience="csc-agent",
            issuer="csc",
            actor=Actor("test", "local"),
            assign=True,
        )
    finally:
        store.close()
    return token


def limit_sessions(r: Relay, cap: int) -> None:
    """Give the tenant ``acme`` ``max_sessions = cap`` and have the node read it at once."""
    store = Store(r.state_dir)
    try:
        store.update_tenant("acme", TenantUpdate(limits={"max_sessions": cap}), Actor("t", "local"))
    finally:
        store.close()
    r.node.state.registry.refresh(force=True)


def agent_config(csc_url: str, token: str, server: UpstreamServer, **over: Any) -> AgentConfig:
    tcp = f"127.0.0.1:{server.tcp_echo_port}" if server.tcp_echo_port else None
    values: dict[str, Any] = {
        "csc": csc_url,
        "token": Secret(token),
        "upstream": server.http_url,
        "tcp_upstream": tcp,
        "backoff_initial": 0.05,
        "backoff_max": 0.5,
        **over,
    }
    return AgentConfig(**values)


async def wait_online(csc_url: str, alias: str = ALIAS, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + scaled(timeout)
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{csc_url}/v1/resolve/{alias}") as resp:
                if resp.status == 200:
                    return
            if loop.time() > deadline:
                raise TimeoutError(f"{alias} did not come online")
            await asyncio.sleep(0.02)


async def start_agent(relay: Relay, **over: Any) -> None:
    config = agent_config(relay.csc_url, relay.token, relay.upstream, **over)
    relay.agent = Agent(config)
    relay.agent_task = asyncio.create_task(relay.agent.run())


@contextlib.asynccontextmanager
async def relay(
    tmp_path: Path,
    *,
    csc: dict[str, Any] | None = None,
    agent: dict[str, Any] | None = None,
    start: bool = True,
) -> AsyncIterator[Relay]:
    state_dir = tmp_path / "csc-state"
    token = make_token(state_dir, "acme", [ALIAS])
    settings: dict[str, Any] = {
        "admin_listen": "127.0.0.1:0",
        "metrics_listen": "127.0.0.1:0",
        **(csc or {}),
    }
    config = CSCConfig(
        listen="127.0.0.1:0", tcp_listen="127.0.0.1:0", state_dir=state_dir, **settings
    )
    upstream = await start_upstream_server(tcp_echo_port=0)
    try:
        async with running_node(config) as node:
            r = Relay(node, upstream, None, None, token, state_dir)
            if start:
                await start_agent(r, **(agent or {}))
                await wait_online(r.csc_url)
            try:
                yield r
            finally:
                await r.stop_agent()
    finally:
        await upstream.close()


def tls_certs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A certificate for 127.0.0.1 and localhost from a new CA (trustme): its file, its key's
    and the CA's."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    return cert_file, key_file, ca_file


def tls_listeners(tmp_path: Path, **over: Any) -> tuple[CSCConfig, Path]:
    """A CSC with TLS on its public and TCP listeners only (``over``: more settings), and the
    CA file a client trusts."""
    cert_file, key_file, ca_file = tls_certs(tmp_path)
    config = CSCConfig(
        listen="127.0.0.1:0",
        tcp_listen="127.0.0.1:0",
        admin_listen=None,
        metrics_listen=None,
        state_dir=tmp_path / "state",
        tls_cert=cert_file,
        tls_key=key_file,
        **over,
    )
    return config, ca_file
