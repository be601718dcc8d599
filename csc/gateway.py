"""The agent gateway: ``GET /v1/agent/connect``, one :class:`AgentSession` per WebSocket.

The token is read from the ``Authorization`` header only and verified before the upgrade (401
with the reason logged); a revoked token or one of a tenant that does not exist is refused the
same way, a suspended tenant gets 503 ``tenant_suspended``, and a tenant that already has its
``max_sessions`` sessions on this node 429 ``tenant_limit`` with ``Retry-After`` (the agent
retries; the count covers a session from here to its end). After the upgrade the agent's
first message must be HELLO; the session binds the aliases it asks for if the token covers them
and they are assigned to its tenant (default: those of its token grants that are), answers
WELCOME, and from then on carries streams the CSC opens. Refusals after the upgrade are
WebSocket closes with the codes of docs/protocol.md §8.

:func:`end_sessions` closes every session that lost its right to run (token revoked or expired,
tenant suspended or deleted); the admin API calls it after each change and
:func:`enforce_rights` every ``registry_refresh`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from csc.limits import RETRY_AFTER_BUSY, SESSIONS, UNLIMITED
from csc.registry import MemoryRegistry, admission_error
from csc.state import NodeState
from csc.tenants import Limits
from csc.websocket import AbortFn, Traffic, counting, run_websocket
from csc.websocket import close_websocket as _close
from shared.aliases import covered, normalise_grant
from shared.errors import (
    AliasForbidden,
    AliasTaken,
    AuthFailed,
    ClusterUnavailable,
    CSCError,
    GoingAway,
    ProtocolError,
    TenantLimit,
    http_body,
)
from shared.link import Link, joined, max_message_size
from shared.protocol import Connection, GoAwayReceived, HelloReceived, Side
from shared.tokens import AgentClaims

if TYPE_CHECKING:
    from csc.cluster.node import Cluster

log = logging.getLogger("csc.gateway")

HANDSHAKE_TIMEOUT = 10.0
_session_ids = itertools.count(1)
#: cleanups of ended sessions still running (referenced until done; see _run_session)
_cleanups: set[asyncio.Task[None]] = set()


@dataclass(eq=False, slots=True)
class AgentSession:
    """One live agent link as the registry and the ingress see it."""

    id: str
    tenant: str
    grants: tuple[str, ...]
    remote: str
    claims: AgentClaims
    link: Link
    agent: str = ""
    opened_at: float = 0.0
    streams_opened: int = 0
    #: wall-clock time the session came up (``opened_at`` is the loop's clock)
    since: float = 0.0
    traffic: Traffic = field(default_factory=Traffic)

    @property
    def accepting(self) -> bool:
        conn = self.link.conn
        return not (self.link.is_closed or conn.peer_going_away or conn.local_going_away)

    @property
    def load(self) -> int:
        return self.link.conn.active_streams

    @property
    def jti(self) -> str:
        return self.claims.jti

    @property
    def expires_at(self) -> float:
        return self.claims.expires_at

    def end(self, err: CSCError) -> None:
        """Close the session with ``err``'s close code (its streams fail with ``err``)."""
        self.link.close(err)


def _bearer(request: web.Request) -> str:
    if any(k in request.query for k in ("token", "access_token")):
        raise AuthFailed(
            "tokens are accepted only in the Authorization header", reason="token_in_query"
        )
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthFailed("missing 'Authorization: Bearer <token>' header", reason="missing_token")
    return token.strip()


def _refuse(err: CSCError, remote: str) -> web.Response:
    log.warning("agent from %s refused: %s", remote, err.message)
    return web.Response(
        status=err.spec.http_status,
        body=http_body(err.code, err.message),
        content_type="application/json",
        headers={"Retry-After": str(err.retry_after)} if isinstance(err, TenantLimit) else None,
    )


def _requested_grants(
    info: dict[str, Any], claims: AgentClaims, registry: MemoryRegistry[AgentSession]
) -> tuple[str, ...]:
    """The grants to bind: those asked for (all must be the tenant's), else the token's grants
    that are assigned to the tenant now (at least one)."""
    asked = info.get("aliases")
    raw = asked or list(claims.aliases)
    if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
        raise ProtocolError("HELLO 'aliases' must be a list of strings")
    grants = tuple(dict.fromkeys(normalise_grant(a) for a in raw))
    bindable: list[str] = []
    for grant in grants:
        if not covered(claims.aliases, grant):
            raise AliasForbidden(f"alias {grant} is not covered by the agent's token")
        owner = registry.owner(grant)
        if owner is not None and owner != claims.tenant:
            raise AliasTaken(f"alias {grant} is held by another tenant")
        if owner is None and asked:
            raise AliasForbidden(f"alias {grant} is not assigned to tenant {claims.tenant}")
        if owner is not None:
            bindable.append(grant)
    if not bindable:
        raise AliasForbidden(f"none of the token's aliases is assigned to tenant {claims.tenant}")
    return tuple(bindable)


async def _receive_hello(ws: web.WebSocketResponse, conn: Connection) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANDSHAKE_TIMEOUT
    while True:
        msg = await ws.receive(timeout=max(deadline - loop.time(), 0.001))
        if msg.type != WSMsgType.BINARY:
            raise ProtocolError("expected a binary HELLO message")
        conn.receive_data(msg.data, loop.time())
        for event in conn.events():
            if isinstance(event, HelloReceived):
                return event.info


async def agent_connect(request: web.Request) -> web.StreamResponse:
    state = request.app[NodeState.KEY]
    remote = request.remote or "?"
    if state.draining:
        state.metrics.session_refused(GoingAway.code)
        return _refuse(GoingAway("this node is draining; connect to another"), remote)
    try:
        claims = state.verified_tokens.verify(
            _bearer(request),
            state.public_keys,
            audience=state.config.token_audience,
            issuer=state.config.token_issuer,
        )
    except AuthFailed as err:
        state.metrics.auth_failed(err)
        return _refuse(err, remote)
    if state.cluster is not None and not state.cluster.healthy:
        state.metrics.session_refused(ClusterUnavailable.code)
        unavailable = ClusterUnavailable("the cluster's routing state (Redis) cannot be reached")
        return _refuse(unavailable, remote)
    # a revocation or suspension by another process counts at once (in a worker thread: the
    # store may be a remote database; handshakes that arrive together share one re-read that
    # started after they arrived)
    await state.fresh_catalog()
    refusal = admission_error(state.registry.catalog, claims.tenant, claims.jti)
    if refusal is not None:
        if isinstance(refusal, AuthFailed):
            state.metrics.auth_failed(refusal)
        else:
            state.metrics.session_refused(refusal.code)
        return _refuse(refusal, remote)
    owner = state.registry.tenant(claims.tenant)
    limits = owner.limits if owner else UNLIMITED
    slot: str | None = None
    try:
        if state.cluster is None:
            state.limits.acquire_session(claims.tenant, limits)
        else:  # the cap is the whole cluster's
            slot = await _cluster_session_slot(state, state.cluster, claims.tenant, limits)
            state.limits.acquire_session(claims.tenant, UNLIMITED)
    except TenantLimit as err:
        state.metrics.session_refused(err.code)
        state.metrics.limit_rejected(claims.tenant, err.limit)
        return _refuse(err, remote)
    try:
        ws = web.WebSocketResponse(
            max_msg_size=max_message_size(state.config.max_frame),
            compress=False,
            autoping=True,
        )
        await ws.prepare(request)
        await _run_session(state, ws, claims, remote, _aborter(request))
    finally:
        state.limits.release_session(claims.tenant)
        if slot is not None and state.cluster is not None:
            await state.cluster.release_slot(claims.tenant, SESSIONS, slot)
    return ws


def _aborter(request: web.Request) -> AbortFn:
    """Drops the agent's connection at once (a stalled link's bytes would never leave)."""

    def abort() -> None:
        transport = request.transport
        if transport is not None:
            transport.abort()

    return abort


async def _cluster_session_slot(
    state: NodeState, cluster: Cluster, tenant: str, limits: Limits
) -> str | None:
    """A cluster-wide session slot when the tenant has a ``max_sessions`` cap (None: no cap,
    or Redis is away and this node's share of the cap still has room)."""
    cap = limits.max_sessions
    if cap is None:
        return None
    member = f"{state.node_id}:{next(_session_ids)}:{os.urandom(3).hex()}"
    taken = await cluster.acquire_slot(tenant, SESSIONS, member, cap)
    if taken:
        return member
    if taken is None and state.limits.sessions(tenant) < max(1, cap // max(1, cluster.live_nodes)):
        return None
    raise TenantLimit(
        f"tenant {tenant!r} already has {cap} agent sessions in the cluster (at most {cap}); "
        "try again later",
        retry_after=RETRY_AFTER_BUSY,
        limit=SESSIONS,
    )


async def _run_session(
    state: NodeState,
    ws: web.WebSocketResponse,
    claims: AgentClaims,
    remote: str,
    abort: AbortFn,
) -> None:
    loop = asyncio.get_running_loop()
    conn = Connection(Side.SERVER, state.link_settings, accept_streams=False, now=loop.time())
    try:
        hello = await _receive_hello(ws, conn)
        grants = _requested_grants(hello, claims, state.registry)
    except (CSCError, TimeoutError) as exc:
        err = exc if isinstance(exc, CSCError) else ProtocolError("no HELLO in time")
        state.metrics.session_refused(err.code)
        log.warning("agent %s (tenant %s) refused: %s", remote, claims.tenant, err.message)
        await _close(ws, err, abort)
        return
    session_id = f"{state.node_id}-{next(_session_ids)}-{os.urandom(3).hex()}"
    counters = state.metrics.link_counters(claims.tenant)
    traffic = Traffic()
    send = counting(joined(ws.send_bytes), traffic)
    link = Link(
        conn,
        send,
        name=f"session {session_id}",
        counters=counters,
        stuck_timeout=state.config.stuck_timeout,
    )
    session = AgentSession(
        id=session_id,
        tenant=claims.tenant,
        grants=grants,
        remote=remote,
        claims=claims,
        link=link,
        agent=str(hello.get("agent", ""))[:100],
        opened_at=loop.time(),
        since=time.time(),
        traffic=traffic,
    )
    try:
        state.registry.bind(session)
    except CSCError as err:
        state.metrics.session_refused(err.code)
        log.warning("agent %s (tenant %s) refused: %s", remote, claims.tenant, err.message)
        await link.aclose(err)
        await _close(ws, err, abort)
        return
    link.on_goaway = lambda ev: _on_agent_goaway(session, ev)
    conn.send_welcome(
        {
            "session_id": session_id,
            "node": state.node_id,
            "cluster_nodes": state.cluster.accepting_nodes if state.cluster else 1,
            "aliases": list(grants),
            "heartbeat_interval": state.link_settings.heartbeat_interval,
        },
        loop.time(),
    )
    link.kick()
    state.sessions[session_id] = session
    state.metrics.session_opened(session.tenant)
    log.info(
        "agent session %s up: tenant %s, aliases %s, from %s",
        session_id,
        claims.tenant,
        ",".join(grants),
        remote,
    )
    if state.draining:
        link.go_away("going_away", "this node is draining")
    elif state.cluster is not None:  # after WELCOME: the session serves before others route here
        state.cluster.routes_changed()
    try:
        await run_websocket(ws, link, traffic, abort)
    finally:
        # an agent that hangs up cancels this handler (handler_cancellation): the cleanup
        # runs to its end anyway, in a task of its own
        cleanup = asyncio.ensure_future(_session_down(state, session, ws, abort))
        _cleanups.add(cleanup)
        cleanup.add_done_callback(_cleanups.discard)
        await asyncio.shield(cleanup)


async def _session_down(
    state: NodeState, session: AgentSession, ws: web.WebSocketResponse, abort: AbortFn
) -> None:
    """Unbind a session that ended, withdraw its routes, count and log it."""
    link = session.link
    state.registry.unbind(session)
    state.sessions.pop(session.id, None)
    if state.cluster is not None:
        state.cluster.routes_changed()
    reason = link.closed.result() if link.closed.done() else None
    state.metrics.session_closed(session.tenant, reason, ws.close_code)
    await link.aclose()
    if not ws.closed:
        await _close(ws, reason or GoingAway("session ended"), abort)
    why = reason.message if reason else "closed"
    state.errors.agent_disconnected(session.tenant, f"agent session {session.id} down: {why}")
    state.last_seen.session_down(session.tenant, session.grants)
    log.info("agent session %s down (%s)", session.id, why)


def _on_agent_goaway(session: AgentSession, event: GoAwayReceived) -> None:
    log.info("agent session %s is draining: %s", session.id, event.message or event.code)


def end_sessions(state: NodeState) -> int:
    """Close every live session that lost its right to run; how many were closed."""
    ended = 0
    ending = state.registry.ending(time.time())
    state.metrics.pending_end = sum(1 for s, _ in ending if not s.link.is_closed)
    for session, err in ending:
        if session.link.is_closed:
            continue
        log.warning(
            "agent session %s (tenant %s) ended: %s", session.id, session.tenant, err.message
        )
        session.end(err)
        ended += 1
    return ended


async def _enforce_forever(state: NodeState) -> None:
    while True:
        await asyncio.sleep(state.config.registry_refresh)
        try:
            await asyncio.to_thread(state.registry.refresh)
        except Exception:  # the store is unreadable for now: keep the last catalog
            log.exception("cannot re-read the registry; keeping the last known state")
        end_sessions(state)


async def enforce_rights(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: re-read the registry and end sessions every ``registry_refresh`` seconds."""
    task = asyncio.create_task(_enforce_forever(app[NodeState.KEY]), name="enforce-rights")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
