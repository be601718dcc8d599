"""Wiring a node into its cluster: the context (for the node's life) that connects Redis, starts the
:class:`~csc.cluster.node.Cluster` with the node's hooks, and withdraws it at the end.

With ``redis_url`` unset nothing happens here and the node runs alone, exactly as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from csc.relay.gateway import end_sessions, slot_taken, tell_cluster_size
from csc.relay.limits import SESSIONS
from csc.relay.routing import open_for_peer
from csc.state import NodeState
from shared.errors import GoingAway

if TYPE_CHECKING:
    from csc.cluster.node import ClusterHooks

log = logging.getLogger("csc.cluster")


class ClusterStartError(Exception):
    """The node cannot join its cluster (Redis unreachable, bad secret, peer listener)."""


def _hooks(state: NodeState) -> ClusterHooks:
    from csc.admin.api import session_view
    from csc.cluster.node import ClusterHooks

    async def catalog_changed() -> None:
        try:
            await asyncio.to_thread(state.registry.refresh, force=True)
        except Exception:  # the store is unreachable: keep the last catalog
            log.exception("cannot re-read the store; keeping the last known catalog")
            return
        end_sessions(state)

    def disconnect(session_id: str) -> bool:
        session = state.sessions.get(session_id)
        if session is None:
            return False
        session.end(GoingAway("disconnected by an operator"))
        log.info("session %s disconnected at an operator's request", session_id)
        return True

    def fenced() -> None:
        for session in list(state.sessions.values()):
            session.end(GoingAway("this node lost its cluster lease; reconnect"))

    def slot_gone(tenant: str, kind: str, member: str) -> None:
        if kind == SESSIONS:  # a hand-over on another node: this session's grace starts
            slot_taken(state, tenant, member)

    def views() -> list[dict[str, Any]]:
        return [session_view(s, state.node_id) for s in state.sessions.values()]

    return ClusterHooks(
        local_grants=state.registry.local_grants,
        open_local=lambda info: open_for_peer(state, info),
        session_views=views,
        catalog_changed=catalog_changed,
        disconnect=disconnect,
        fenced=fenced,
        cluster_size=lambda count: tell_cluster_size(state, count),
        stream_started=state.stream_started,
        stream_finished=state.stream_finished,
        slot_gone=slot_gone,
    )


@contextlib.asynccontextmanager
async def cluster_context(state: NodeState) -> AsyncIterator[None]:
    """Join the cluster for the node's lifetime (a no-op without ``redis_url``)."""
    config = state.config
    if config.redis_url is None:
        yield
        return
    # a lone node never loads redis-py and the cluster code (about 20 MiB resident)
    from csc.cluster.node import Cluster
    from csc.cluster.peertls import peer_contexts
    from csc.cluster.redisconn import RedisUnavailable, connect_redis
    from csc.cluster.routes import Keys

    try:
        secret = config.cluster_secret()
    except ValueError as exc:
        raise ClusterStartError(str(exc)) from None
    tls = None
    if config.peer_tls:
        try:
            tls = peer_contexts(
                secret, config.peer_tls_cert, config.peer_tls_key, config.peer_tls_ca
            )
        except ValueError as exc:
            raise ClusterStartError(str(exc)) from None
    try:
        redis = await connect_redis(config.redis_url, client_name=f"csc:{state.node_id}")
    except RedisUnavailable as exc:
        raise ClusterStartError(str(exc)) from None
    if config.peer_listen is None:  # the config loader refuses this; a direct caller may not
        raise ClusterStartError("redis_url needs peer_listen")
    cluster = Cluster(
        node_id=state.node_id,
        redis=redis,
        keys=Keys(config.redis_prefix),
        key=secret,
        lease=config.route_lease,
        settings=state.link_settings,
        hooks=_hooks(state),
        tls=tls,
    )
    state.registry.refresh_on_miss = False  # the store is remote: never read it on a hot path
    try:
        await cluster.start(config.peer_listen, config.peer_advertise)
    except (OSError, ValueError) as exc:
        await cluster.server.stop()
        await redis.aclose()
        raise ClusterStartError(f"peer listener {config.peer_listen}: {exc}") from None
    state.cluster = cluster
    try:
        yield
    finally:
        state.cluster = None
        await cluster.stop()
        await redis.aclose()
