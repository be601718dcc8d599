"""``csc-agent check``: try the configuration once without serving (like ``frpc verify``).

After the configuration loaded (every problem reported at once), it reports, one finding per
line (shared/checks.py): the CA bundle, the CSC's ``/healthz`` over HTTP, one real handshake
with the token (upgrade, HELLO, WELCOME: the token is accepted and the aliases are bound; the
session is closed with GOAWAY at once, before any stream; the finding says when the token
expires) and one TCP connection to the upstream
(and ``tcp_upstream``). Exit 0 when nothing is wrong, 1 otherwise.

Invariants: each server is tried once, each try bounded by ``connect_timeout`` (the upstream by
``upstream_connect_timeout``); the token is never printed.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request

from shared.checks import Finding, ok, problem
from shared.errors import CSCError, GoingAway
from shared.oserrors import describe_connect_error, hostport
from shared.units import parse_hostport
from tenant_agent.agent import Agent, FatalError, describe_failure, portal_urls
from tenant_agent.config import AgentConfig
from tenant_agent.token import describe_expiry, token_expiry
from tenant_agent.websocket import HandshakeError, close_for


def _http_base(csc: str) -> str:
    base = csc.rstrip("/")
    for ws, http in (("ws://", "http://"), ("wss://", "https://")):
        if base.startswith(ws):
            return http + base[len(ws) :]
    return base


def _healthz(config: AgentConfig, context: ssl.SSLContext | None) -> Finding:
    url = _http_base(config.csc) + "/healthz"
    request = urllib.request.Request(url, headers={"User-Agent": "csc-agent check"})
    try:
        with urllib.request.urlopen(request, timeout=config.connect_timeout, context=context) as r:
            status = r.status
    except urllib.error.HTTPError as exc:
        return problem("csc", f"{url} answered HTTP {exc.code} {exc.reason}")
    except urllib.error.URLError as exc:
        reason = exc.reason
        text = describe_connect_error(reason) if isinstance(reason, BaseException) else reason
        return problem("csc", f"cannot reach {url}: {text}")
    except (OSError, TimeoutError) as exc:
        return problem("csc", f"cannot reach {url}: {describe_connect_error(exc)}")
    return ok("csc", f"{url} answered HTTP {status}")


async def _handshake(config: AgentConfig, context: ssl.SSLContext | None) -> Finding:
    try:
        session = await Agent(config).handshake_once(context)
    except FatalError as exc:
        return problem("token", str(exc))
    except (CSCError, HandshakeError, OSError, TimeoutError) as exc:
        return problem("token", f"no handshake with {config.csc}: {describe_failure(exc)}")
    aliases = [str(a) for a in session.welcome.get("aliases", [])]
    session.link.go_away("going_away", "csc-agent check: done")
    await session.link.flush()
    await close_for(session.ws, GoingAway("csc-agent check: done"))
    node = session.welcome.get("node", "?")
    urls = ", ".join(portal_urls(config.csc, aliases))
    expiry = describe_expiry(token_expiry(config.token.reveal()), time.time())
    return ok(
        "token", f"accepted by node {node}, {expiry}; the portal would be reachable at {urls}"
    )


async def _tcp(name: str, host: str, port: int, timeout: float) -> Finding:
    where = hostport(host, port)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as exc:
        return problem(name, f"cannot connect to {where}: {describe_connect_error(exc)}")
    writer.close()
    return ok(name, f"{where} accepts connections")


async def _upstreams(config: AgentConfig) -> list[Finding]:
    parts = urllib.parse.urlsplit(config.upstream)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    timeout = config.upstream_connect_timeout
    found = [await _tcp("upstream", parts.hostname or "", port, timeout)]
    if config.tcp_upstream is not None:
        host, tcp_port = parse_hostport(config.tcp_upstream)
        found.append(await _tcp("tcp_upstream", host, tcp_port, timeout))
    return found


def check_agent(config: AgentConfig) -> list[Finding]:
    """Every finding for a configuration that loaded (see the module docstring)."""
    found: list[Finding] = []
    context: ssl.SSLContext | None = None
    if config.ca_file is not None:
        try:
            context = ssl.create_default_context(cafile=str(config.ca_file))
        except (OSError, ssl.SSLError) as exc:
            return [problem("ca_file", f"{config.ca_file}: {exc}")]
        found.append(ok("ca_file", f"{config.ca_file} loads"))
    found.append(_healthz(config, context))
    found.append(asyncio.run(_handshake(config, context)))
    found += asyncio.run(_upstreams(config))
    return found
