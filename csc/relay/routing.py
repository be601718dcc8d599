"""Routing a bootloader's alias to a live agent session (shared by the HTTP and TCP ingress).

The alias is normalised once; an alias no tenant owns is ``unknown_alias``; an alias of a
suspended tenant is ``tenant_suspended``; an owned alias with no accepting session is
``portal_offline``; a draining node opens nothing (``going_away``). The two 503s of a tenant
name it and its support contact (message and ``tenant`` member of the JSON body), so a user
knows whom to call. A request over one of its tenant's limits is refused (``tenant_limit``,
``rate_limited``; one client address holds at most its share of the tenant's stream slots)
before a stream is opened. Among the sessions that serve the alias, the least loaded that
accepts the stream gets it.

In a cluster (csc/cluster/), an alias with no accepting session on this node is served through
another node that has one: the stream is forwarded over the peer link to it, after this node
made every check (alias, tenant, limits); if that node cannot take it the next one is tried,
and only then is the answer ``portal_offline``. A draining node of a cluster keeps forwarding
what reaches it (the load balancer stops sending as soon as ``/readyz`` fails); a lone node
opens nothing while draining.
"""

from __future__ import annotations

import itertools
import os
from typing import TYPE_CHECKING, Any

from csc.cluster.peerstream import strip_peer_keys
from csc.relay.gateway import AgentSession
from csc.relay.limits import (
    RETRY_AFTER_BUSY,
    STREAMS,
    UNLIMITED,
    Admission,
    client_cap,
    client_key,
    rate_limited,
)
from csc.relay.registry import Lookup
from csc.state import NodeState
from shared.aliases import normalise_alias
from shared.errors import (
    CSCError,
    GoingAway,
    PortalOffline,
    ProtocolError,
    TenantLimit,
    TenantSuspended,
    UnknownAlias,
)
from shared.linkstream import LinkStream, TunnelStream

if TYPE_CHECKING:
    from csc.cluster.node import Cluster  # redis-py is loaded only when clustered

_slot_ids = itertools.count(1)
#: in the names of this process's stream slots: a node started again under its id never takes
#: the name of a slot its last life left in Redis (those expire within the lease)
_slot_life = os.urandom(4).hex()


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


async def online(state: NodeState, alias: str, found: Lookup[AgentSession]) -> bool:
    """Whether a stream for ``alias`` can be opened now, here or on another node."""
    if found.sessions:
        return True
    return state.cluster is not None and bool(await state.cluster.nodes_for(alias))


async def open_stream(
    state: NodeState, alias: str, found: Lookup[AgentSession], info: dict[str, Any]
) -> TunnelStream:
    """Open a stream on the least-loaded session that takes it (or, in a cluster, on another
    node that serves the alias), or raise PortalOffline.

    The stream counts against its tenant's limits (csc/relay/limits.py) before anything reaches the
    agent (``tenant_limit``, ``rate_limited``), its client address's share of them included,
    until the ingress releases it when it ends. A request opened again (the same ``info``: the
    HTTP ingress reopening one an agent never ran) keeps what it holds and takes no new token.
    """
    cluster = state.cluster
    if state.draining and cluster is None:
        raise GoingAway("this node is draining")
    if not found.sessions and cluster is None:
        raise offline_error(alias, found)
    tenant = found.tenant or ""
    limits = found.owner.limits if found.owner else UNLIMITED
    held = state.admissions.of_request(info)
    if held is not None:
        return await _reopen(state, cluster, alias, found, tenant, info, held)
    cap = client_cap(limits.max_streams, state.config.client_stream_share)
    client = client_key(str(info.get("client", ""))) if cap is not None else None
    if client is not None and cap is not None:
        state.limits.acquire_client(tenant, client, cap, alias)
    admission = Admission(info, tenant, client)
    try:
        if cluster is None:
            state.limits.acquire_stream(tenant, limits, alias)
        else:  # the rate and the stream cap are the whole cluster's; the node counts for drain
            state.limits.acquire_stream(tenant, UNLIMITED, alias)
    except BaseException as exc:  # raised by name: a bare raise after an await is not safe
        await _give_back(state, admission)  # in compiled code (shared/compiled.py)
        raise exc
    try:
        if cluster is not None:
            await _take_cluster_token(state, cluster, tenant, limits.max_request_rate, alias)
            admission.slot = await _take_cluster_slot(
                state, cluster, tenant, limits.max_streams, alias
            )
        stream = await _open(state, cluster, alias, found, tenant, info)
    except BaseException as exc:
        state.limits.release_stream(tenant)
        await _give_back(state, admission)
        raise exc
    state.admissions.bind(admission, stream)
    return stream


async def _reopen(
    state: NodeState,
    cluster: Cluster | None,
    alias: str,
    found: Lookup[AgentSession],
    tenant: str,
    info: dict[str, Any],
    held: Admission,
) -> TunnelStream:
    """Open the request of ``held`` again: a new node count (the caller gives back the old
    stream's), the same client share and cluster slot."""
    state.limits.acquire_stream(tenant, UNLIMITED, alias)
    try:
        stream = await _open(state, cluster, alias, found, tenant, info)
    except BaseException:
        state.limits.release_stream(tenant)
        raise
    state.admissions.bind(held, stream)
    return stream


async def release_stream(state: NodeState, tenant: str, stream: TunnelStream) -> None:
    """The stream ended: its tenant's counts go down (here and, in a cluster, everywhere)."""
    state.limits.release_stream(tenant)
    admission = state.admissions.pop(stream)
    if admission is not None:
        await _give_back(state, admission)


async def _give_back(state: NodeState, admission: Admission) -> None:
    """Release a request's client share and cluster slot."""
    if admission.client is not None:
        state.limits.release_client(admission.tenant, admission.client)
    if admission.slot is not None and state.cluster is not None:
        await state.cluster.release_slot(admission.tenant, STREAMS, admission.slot)


async def _open(
    state: NodeState,
    cluster: Cluster | None,
    alias: str,
    found: Lookup[AgentSession],
    tenant: str,
    info: dict[str, Any],
) -> TunnelStream:
    if found.sessions:
        try:
            stream = _open_on_session(alias, found, info)
        except CSCError:
            if cluster is None:
                raise
        else:
            if cluster is not None:
                cluster.stats.lookups["local"] += 1
            return stream
    if cluster is None:  # a lone node with no session: open_stream answered before
        raise offline_error(alias, found)
    try:
        forwarded = await cluster.open_remote(alias, tenant, info)
    except PortalOffline:
        cluster.stats.lookups["miss"] += 1
        raise offline_error(alias, found) from None
    cluster.stats.lookups["remote"] += 1
    return forwarded


async def _take_cluster_slot(
    state: NodeState, cluster: Cluster, tenant: str, cap: int | None, alias: str
) -> str | None:
    """A cluster-wide stream slot of ``tenant`` when it has a ``max_streams`` cap."""
    if cap is None:
        return None
    member = f"{state.node_id}:{_slot_life}:{next(_slot_ids)}"
    taken = await cluster.acquire_slot(tenant, STREAMS, member, cap)
    if taken is None:  # Redis is away: this node's share of the cap
        share = max(1, cap // max(1, cluster.live_nodes))
        if state.limits.streams(tenant) <= share:
            return None
    elif taken:
        return member
    raise TenantLimit(
        f"too many requests in progress for {alias} (at most {cap} at once); "
        f"try again in {RETRY_AFTER_BUSY} s",
        retry_after=RETRY_AFTER_BUSY,
        limit=STREAMS,
    )


async def _take_cluster_token(
    state: NodeState, cluster: Cluster, tenant: str, rate: float | None, alias: str
) -> None:
    if rate is None:
        return
    wait = await cluster.take_token(tenant, rate)
    if wait is None:  # Redis is away: this node's share of the rate
        state.limits.take_token(tenant, rate / max(1, cluster.live_nodes), alias)
    elif wait > 0:
        raise rate_limited(alias, rate, wait)


def open_for_peer(state: NodeState, info: dict[str, Any]) -> LinkStream:
    """Open a stream another node forwarded (csc/cluster/peer.py) on one of this node's own
    sessions of the tenant it names; PortalOffline when there is none."""
    alias, tenant = info.get("alias"), info.get("tenant")
    if not isinstance(alias, str) or not isinstance(tenant, str):
        raise ProtocolError("a forwarded OPEN must name its alias and tenant")
    found = state.registry.lookup(alias)
    if found.tenant != tenant:  # a lookup's sessions are all its owner's
        found = Lookup(found.tenant, (), found.owner)
    if not found.sessions:
        raise PortalOffline(f"no agent session of {alias} on node {state.node_id}")
    return _open_on_session(alias, found, strip_peer_keys(info))


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
