"""Routing a bootloader's alias to a live agent session (shared by the HTTP and TCP ingress).

The alias is normalised once; an alias no tenant owns is ``unknown_alias``; an owned alias with
no accepting session is ``portal_offline``; a draining node opens nothing (``going_away``).
Among the sessions that serve the alias, the least loaded that accepts the stream gets it.
"""

from __future__ import annotations

from typing import Any

from csc.gateway import AgentSession
from csc.registry import Lookup
from csc.state import NodeState
from shared.aliases import normalise_alias
from shared.errors import CSCError, GoingAway, PortalOffline, UnknownAlias
from shared.link import LinkStream


def lookup_alias(state: NodeState, raw_alias: str) -> tuple[str, Lookup[AgentSession]]:
    alias = normalise_alias(raw_alias)
    found = state.registry.lookup(alias)
    if found.tenant is None:
        raise UnknownAlias(f"no tenant serves the alias {alias}")
    return alias, found


def open_stream(
    state: NodeState, alias: str, found: Lookup[AgentSession], info: dict[str, Any]
) -> LinkStream:
    """Open a stream on the least-loaded session that takes it, or raise PortalOffline."""
    if state.draining:
        raise GoingAway("this node is draining")
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
    raise PortalOffline(f"the portal of {alias} is offline (no agent connected)")
