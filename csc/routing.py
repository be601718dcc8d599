"""Routing a bootloader's alias to a live agent session (shared by the HTTP and TCP ingress).

The alias is normalised once; an alias no tenant owns is ``unknown_alias``; an alias of a
suspended tenant is ``tenant_suspended``; an owned alias with no accepting session is
``portal_offline``; a draining node opens nothing (``going_away``). The two 503s of a tenant
name it and its support contact (message and ``tenant`` member of the JSON body), so a user
knows whom to call. A request over one of its tenant's limits is refused (``tenant_limit``,
``rate_limited``) before a stream is opened. Among the sessions that serve the alias, the least
loaded that accepts the stream gets it.
"""

from __future__ import annotations

from typing import Any

from csc.gateway import AgentSession
from csc.limits import UNLIMITED
from csc.registry import Lookup
from csc.state import NodeState
from shared.aliases import normalise_alias
from shared.errors import CSCError, GoingAway, PortalOffline, TenantSuspended, UnknownAlias
from shared.link import LinkStream


def lookup_alias(state: NodeState, raw_alias: str) -> tuple[str, Lookup[AgentSession]]:
    alias = normalise_alias(raw_alias)
    found = state.registry.lookup(alias)
    if found.tenant is None:
        raise UnknownAlias(f"no tenant serves the alias {alias}")
    if found.owner is not None and found.owner.suspended:
        raise TenantSuspended(
            f"the service of {alias} is suspended; {found.owner.who()}",
            details={"tenant": found.owner.public()},
        )
    return alias, found


def offline_error(alias: str, found: Lookup[AgentSession]) -> PortalOffline:
    """``portal_offline`` for ``alias``, naming its tenant and support contact."""
    message = f"the portal of {alias} is offline (no agent connected)"
    if found.owner is None:
        return PortalOffline(message)
    return PortalOffline(
        f"{message}; {found.owner.who()}", details={"tenant": found.owner.public()}
    )


def open_stream(
    state: NodeState, alias: str, found: Lookup[AgentSession], info: dict[str, Any]
) -> LinkStream:
    """Open a stream on the least-loaded session that takes it, or raise PortalOffline.

    The stream counts against its tenant's limits (csc/limits.py) before anything reaches the
    agent (``tenant_limit``, ``rate_limited``) until the ingress releases it when it ends.
    """
    if state.draining:
        raise GoingAway("this node is draining")
    if not found.sessions:
        raise offline_error(alias, found)
    tenant = found.tenant or ""
    state.limits.acquire_stream(tenant, found.owner.limits if found.owner else UNLIMITED, alias)
    try:
        return _open_on_session(alias, found, info)
    except BaseException:
        state.limits.release_stream(tenant)
        raise


def _open_on_session(alias: str, found: Lookup[AgentSession], info: dict[str, Any]) -> LinkStream:
    last: CSCError | None = None
    for session in found.sessions:
        try:
            stream = session.link.open(info)
        except CSCError as err:
            last = err
            continue
        session.streams_opened += 1
        return stream
    if last is not None and not isinstance(last, GoingAway):
        raise last
    raise offline_error(alias, found)
