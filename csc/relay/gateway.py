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

The request reaches :func:`agent_connect` on the public listener's connection
(csc/relay/http_front.py, :func:`agent_handler`): refusals are answered there (the JSON error
shape, ``Connection: close``), the upgrade is checked by websockets' sans-I/O
``ServerProtocol`` (400 ``bad_request`` when it is not a valid one) once the agent is
admitted, and the 101 switches the connection to a :class:`~csc.relay.websocket.ServerWebSocket`.
A session runs in four steps: HELLO (:func:`_receive_hello`), bind (:func:`_new_session`,
``registry.bind``), WELCOME and serve (:func:`_welcome`, :func:`~csc.relay.websocket.run_websocket`),
teardown (:func:`_session_down`).

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
from urllib.parse import parse_qs, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request
from websockets.server import ServerProtocol

from csc.relay.handover import Seat
from csc.relay.http_front import FrontConnection
from csc.relay.http_front_request import FrontRequest
from csc.relay.http_listener import UpgradeHandler
from csc.relay.limits import RETRY_AFTER_BUSY, SESSIONS, UNLIMITED
from csc.relay.registry import Registry, admission_error
from csc.relay.websocket import ServerWebSocket, Traffic, run_websocket
from csc.relay.websocket import close_websocket as _close
from csc.state import NodeState
from csc.tenants import Limits
from shared.aliases import covered, normalise_grant
from shared.errors import (
    AliasForbidden,
    AliasTaken,
    AuthFailed,
    BadRequest,
    ClusterUnavailable,
    CSCError,
    GoingAway,
    MethodNotAllowed,
    ProtocolError,
    TenantLimit,
    http_body,
)
from shared.http1 import json_response
from shared.link import Link, max_message_size
from shared.protocol import Connection, GoAwayReceived, HelloReceived, Side
from shared.tokens import AgentClaims

if TYPE_CHECKING:
    from csc.cluster.node import Cluster

log = logging.getLogger("csc.relay.gateway")

HANDSHAKE_TIMEOUT = 10.0
#: websockets' logger for the upgrade checks, held at ``info``: its debug lines echo headers
WIRE_LOG = logging.getLogger("csc.relay.gateway.websocket")
WIRE_LOG.setLevel(logging.INFO)
_session_ids = itertools.count(1)
#: the upgrade request's header naming the session a renewal replaces (csc/relay/handover.py)
REPLACES_HEADER = "csc-replaces"
#: at most so long a session id is looked for (this node's: its node id, a count, 6 hex digits)
MAX_SESSION_ID = 256
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
    streams_opened: int = 0
    #: wall-clock time the session came up
    since: float = 0.0
    traffic: Traffic = field(default_factory=Traffic)
    #: what it holds against its tenant's session limits (``yielded``: its agent sent GOAWAY)
    seat: Seat = field(default_factory=lambda: Seat(""))

    @property
    def closed(self) -> bool:
        return self.link.is_closed

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


def _bearer(request: FrontRequest) -> str:
    query = parse_qs(urlsplit(request.target).query, keep_blank_values=True)
    if any(k in query for k in ("token", "access_token")):
        raise AuthFailed(
            "tokens are accepted only in the Authorization header", reason="token_in_query"
        )
    header = request.header("authorization") or ""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthFailed("missing 'Authorization: Bearer <token>' header", reason="missing_token")
    return token.strip()


def _refuse(conn: FrontConnection, request: FrontRequest, err: CSCError) -> None:
    """Answer a refused upgrade: the error's status and JSON body, ``Retry-After`` for a
    tenant limit; the connection ends after it."""
    log.warning("agent from %s refused: %s", conn.client_ip or "?", err.message)
    request.keep_alive = False
    wait = [("Retry-After", str(err.retry_after))] if isinstance(err, TenantLimit) else None
    conn.send(
        json_response(
            err.spec.http_status,
            http_body(err.code, err.message),
            request_id=request.request_id,
            keep_alive=False,
            http11=request.http11,
            headers=wait,
            method=request.method,
        )
    )


def _accept(request: FrontRequest) -> bytes:
    """The 101 answer to a valid WebSocket upgrade (websockets' checks of RFC 6455 §4.2.1);
    raises BadRequest for anything else."""
    if request.method != "GET":
        raise MethodNotAllowed("the agent endpoint takes GET (a WebSocket upgrade)")
    proto = ServerProtocol(logger=WIRE_LOG)
    response = proto.accept(Request(request.target, Headers(request.headers)))
    if response.status_code != 101:
        exc = proto.handshake_exc
        raise BadRequest(f"not a valid WebSocket upgrade: {exc or response.reason_phrase}")
    return response.serialize()


def _requested_grants(
    info: dict[str, Any], claims: AgentClaims, registry: Registry[AgentSession]
) -> tuple[str, ...]:
    """The grants to bind: those asked for (all must be the tenant's), else (HELLO names none:
    ``aliases`` absent or empty) the token's grants that are assigned to the tenant now, the
    others skipped and logged (at least one must remain: 4409 when every one is another
    tenant's, else 4403)."""
    asked = info.get("aliases")
    raw = asked or list(claims.aliases)
    if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
        raise ProtocolError("HELLO 'aliases' must be a list of strings")
    grants = tuple(dict.fromkeys(normalise_grant(a) for a in raw))
    bindable: list[str] = []
    taken: list[str] = []
    for grant in grants:
        if not covered(claims.aliases, grant):
            raise AliasForbidden(f"alias {grant} is not covered by the agent's token")
        owner = registry.owner(grant)
        if owner is not None and owner != claims.tenant:
            if asked:
                raise AliasTaken(f"alias {grant} is held by another tenant")
            taken.append(grant)
        elif owner is None and asked:
            raise AliasForbidden(f"alias {grant} is not assigned to tenant {claims.tenant}")
        elif owner is not None:
            bindable.append(grant)
    if bindable and len(bindable) < len(grants):
        log.info(
            "agent of tenant %s: skipped the token's aliases not assigned to it: %s",
            claims.tenant,
            ", ".join(g for g in grants if g not in bindable),
        )
    if not bindable and taken:
        raise AliasTaken(f"alias {taken[0]} is held by another tenant")
    if not bindable:
        raise AliasForbidden(f"none of the token's aliases is assigned to tenant {claims.tenant}")
    return tuple(bindable)


async def _receive_hello(ws: ServerWebSocket, conn: Connection) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(HANDSHAKE_TIMEOUT):
        while True:
            data = await ws.receive_payload()
            if data is None:
                raise ProtocolError("the WebSocket closed before HELLO")
            conn.receive_data(data, loop.time())
            for event in conn.events():
                if isinstance(event, HelloReceived):
                    return event.info


def agent_handler(state: NodeState) -> UpgradeHandler:
    """The public listener's handler of ``/v1/agent/connect`` (csc/relay/http_front.py)."""

    async def handle(conn: FrontConnection, request: FrontRequest) -> None:
        await agent_connect(state, conn, request)

    return handle


async def _admit(state: NodeState, request: FrontRequest) -> AgentClaims:
    """The token's claims if the agent may connect now (raises the refusal)."""
    if state.draining:
        state.metrics.session_refused(GoingAway.code)
        raise GoingAway("this node is draining; connect to another")
    try:
        claims = state.verified_tokens.verify(
            _bearer(request),
            state.public_keys,
            audience=state.config.token_audience,
            issuer=state.config.token_issuer,
        )
    except AuthFailed as err:
        state.metrics.auth_failed(err)
        raise
    if state.cluster is not None and not state.cluster.healthy:
        state.metrics.session_refused(ClusterUnavailable.code)
        raise ClusterUnavailable("the cluster's routing state (Redis) cannot be reached")
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
        raise refusal
    return claims


async def agent_connect(state: NodeState, conn: FrontConnection, request: FrontRequest) -> None:
    """Admit the agent, take a session slot, answer 101 and run the session on the connection
    (or answer the refusal: JSON error, see the module's docstring)."""
    try:
        claims = await _admit(state, request)
    except CSCError as err:
        _refuse(conn, request, err)
        return
    seat = Seat(claims.tenant, f"{state.node_id}-{next(_session_ids)}-{os.urandom(3).hex()}")
    try:
        await _take_seat(state, seat, _replaces(request))
    except TenantLimit as err:
        state.metrics.session_refused(err.code)
        state.metrics.limit_rejected(claims.tenant, err.limit)
        _refuse(conn, request, err)
        return
    try:
        try:
            head = _accept(request)
        except CSCError as err:
            _refuse(conn, request, err)
            return
        ws = ServerWebSocket(max_message_size(state.config.max_frame))
        if conn.switch_protocol(head, ws):
            await _run_session(state, ws, claims, conn.client_ip or "?", seat)
    finally:
        await _give_back(state, seat)


def _replaces(request: FrontRequest) -> str | None:
    """The id of the session the dial says it replaces (``CSC-Replaces``). Only a session of
    the dial's own tenant ever gives its place: Handovers.take_local checks it, and in a
    cluster the slots looked in are the tenant's own."""
    named = request.header(REPLACES_HEADER)
    return named if named is not None and 0 < len(named) <= MAX_SESSION_ID else None


async def _take_seat(state: NodeState, seat: Seat, replaces: str | None = None) -> None:
    """Count a new session of ``seat.tenant`` against its limits, or raise TenantLimit.

    At a limit, the place of the session the dial replaces (``replaces``, its id), or else of
    one whose agent sent GOAWAY, goes to the new one (csc/relay/handover.py)."""
    tenant = seat.tenant
    owner = state.registry.tenant(tenant)
    limits = owner.limits if owner else UNLIMITED
    own = limits.max_sessions is not None
    default = state.config.default_max_sessions
    # a tenant without a cap of its own has the node's default, on this node
    node_cap = UNLIMITED if own or default is None else Limits(max_sessions=default)
    if state.cluster is None:
        node_cap = limits if own else node_cap
    else:  # the tenant's own cap is the whole cluster's
        seat.slot = await _cluster_session_slot(state, state.cluster, seat, limits, replaces)
    try:
        state.limits.acquire_session(tenant, node_cap)
    except TenantLimit:
        named = state.sessions.get(replaces) if replaces is not None else None
        if state.handovers.take_local(tenant, named) is None:
            await _give_back(state, seat)
            raise
        # the count of the session that gave its place is this one's now
    seat.local = True


async def _give_back(state: NodeState, seat: Seat) -> None:
    """Give back what ``seat`` holds (nothing of what it gave to a successor)."""
    if seat.local:
        seat.local = False
        state.limits.release_session(seat.tenant)
    slot, seat.slot = seat.slot, None
    gave, seat.gave = seat.gave, None
    cluster = state.cluster
    if cluster is None:
        return
    if slot is not None:
        await cluster.release_slot(seat.tenant, SESSIONS, slot)
    # its record of a hand-over, if it gave its place (perhaps before this node heard of it)
    member = gave if gave is not None else slot if seat.yielded else None
    if member is not None:
        await cluster.given_ended(seat.tenant, SESSIONS, member)


async def _cluster_session_slot(
    state: NodeState, cluster: Cluster, seat: Seat, limits: Limits, replaces: str | None
) -> str | None:
    """A cluster-wide session slot (its member: the session's id) when the tenant has a
    ``max_sessions`` cap (None: no cap, or Redis is away and this node's share of the cap
    still has room); at the cap, the slot of the session the dial replaces, or else of one
    whose agent sent GOAWAY, if there is one to take."""
    tenant, member = seat.tenant, seat.id
    cap = limits.max_sessions
    if cap is None:
        return None
    taken = await cluster.acquire_slot(tenant, SESSIONS, member, cap)
    if taken:
        return member
    if taken is False:
        grace = state.handovers.grace
        given = await cluster.take_over_slot(tenant, SESSIONS, member, cap, grace, replaces)
        if given is not None:
            slot_taken(state, tenant, given)  # here: its grace starts now; elsewhere: that
            return member  # node finds out at its next heartbeat
    if taken is None and state.limits.sessions(tenant) < max(1, cap // max(1, cluster.live_nodes)):
        return None
    raise TenantLimit(
        f"tenant {tenant!r} already has {cap} agent sessions in the cluster (at most {cap}); "
        "try again later",
        retry_after=RETRY_AFTER_BUSY,
        limit=SESSIONS,
    )


def _refused_session(state: NodeState, claims: AgentClaims, remote: str, err: CSCError) -> None:
    state.metrics.session_refused(err.code)
    log.warning("agent %s (tenant %s) refused: %s", remote, claims.tenant, err.message)


async def _run_session(
    state: NodeState, ws: ServerWebSocket, claims: AgentClaims, remote: str, seat: Seat
) -> None:
    """HELLO, bind, WELCOME, serve, teardown: one session on an upgraded connection."""
    loop = asyncio.get_running_loop()
    conn = Connection(Side.SERVER, state.link_settings, accept_streams=False, now=loop.time())
    try:
        hello = await _receive_hello(ws, conn)
        grants = _requested_grants(hello, claims, state.registry)
    except (CSCError, TimeoutError) as exc:
        err = exc if isinstance(exc, CSCError) else ProtocolError("no HELLO in time")
        _refused_session(state, claims, remote, err)
        await _close(ws, err, ws.abort)
        return
    session = _new_session(state, ws, conn, claims, remote, grants, hello, seat)
    try:
        state.registry.bind(session)
    except CSCError as err:
        _refused_session(state, claims, remote, err)
        await session.link.aclose(err)
        await _close(ws, err, ws.abort)
        return
    _welcome(state, session)
    # no await since the bind: no stream has opened on the link yet; given back in _session_down
    conn.pool = state.growth.take(session.tenant)
    try:
        await run_websocket(ws, session.link, session.traffic, ws.abort)
    finally:
        # a cancelled session (the node stops) runs its cleanup to the end anyway, in a task
        # of its own
        cleanup = asyncio.ensure_future(_session_down(state, session, ws))
        _cleanups.add(cleanup)
        cleanup.add_done_callback(_cleanups.discard)
        await asyncio.shield(cleanup)


def _new_session(
    state: NodeState,
    ws: ServerWebSocket,
    conn: Connection,
    claims: AgentClaims,
    remote: str,
    grants: tuple[str, ...],
    hello: dict[str, Any],
    seat: Seat,
) -> AgentSession:
    """The session and its link (not yet bound)."""
    session_id = seat.id
    traffic = ws.traffic  # counted by the WebSocket itself, both ways
    link = Link(
        conn,
        ws.send_now,
        name=f"session {session_id}",
        counters=state.metrics.link_counters(claims.tenant),
        stuck_timeout=state.config.stuck_timeout,
    )
    ws.attach(link)
    return AgentSession(
        id=session_id,
        tenant=claims.tenant,
        grants=grants,
        remote=remote,
        claims=claims,
        link=link,
        agent=str(hello.get("agent", ""))[:100],
        since=time.time(),
        traffic=traffic,
        seat=seat,
    )


def _welcome(state: NodeState, session: AgentSession) -> None:
    """Answer WELCOME to a bound session and make it serve."""
    link = session.link
    link.on_goaway = lambda ev: _on_agent_goaway(state, session, ev)
    link.conn.send_welcome(
        {
            "session_id": session.id,
            "node": state.node_id,
            "cluster_nodes": state.cluster.accepting_nodes if state.cluster else 1,
            "aliases": list(session.grants),
            "heartbeat_interval": state.link_settings.heartbeat_interval,
        },
        link.loop.time(),
    )
    link.kick()
    state.sessions[session.id] = session
    state.metrics.session_opened(session.tenant)
    log.info(
        "agent session %s up: tenant %s, aliases %s, from %s",
        session.id,
        session.tenant,
        ",".join(session.grants),
        session.remote,
    )
    if state.draining:
        link.go_away("going_away", "this node is draining")
    elif state.cluster is not None:  # after WELCOME: the session serves before others route here
        state.cluster.routes_changed()


async def _session_down(state: NodeState, session: AgentSession, ws: ServerWebSocket) -> None:
    """Unbind a session that ended, withdraw its routes, count and log it."""
    link = session.link
    state.registry.unbind(session)
    state.handovers.ended(session)
    state.sessions.pop(session.id, None)
    if state.cluster is not None:
        state.cluster.routes_changed()
    reason = link.closed.result() if link.closed.done() else None
    state.metrics.session_closed(session.tenant, reason, ws.close_code)
    await link.aclose()
    if link.conn.pool is not None:  # the link's growth went back with its streams
        state.growth.give(session.tenant)
    if not ws.closed:
        await _close(ws, reason or GoingAway("session ended"), ws.abort)
    why = reason.message if reason else "closed"
    state.errors.agent_disconnected(session.tenant, f"agent session {session.id} down: {why}")
    state.last_seen.session_down(session.tenant, session.grants)
    log.info("agent session %s down (%s)", session.id, why)


def tell_cluster_size(state: NodeState, count: int) -> int:
    """Tell every session of this node that speaks 1.2 or later the cluster's new count of
    nodes that take agents (CLUSTER); returns how many were told."""
    told = 0
    for session in state.sessions.values():
        link = session.link
        if link.conn.send_cluster(count):
            link.kick()
            told += 1
    return told


def slot_taken(state: NodeState, tenant: str, member: str) -> None:
    """The cluster moved slot ``member`` of ``tenant`` to a new session: if it is a session
    of this node (a slot's member is its session's id), that session gave its place."""
    session = state.sessions.get(member)
    if session is not None and session.tenant == tenant and session.seat.slot == member:
        state.handovers.slot_taken(session)


def _on_agent_goaway(state: NodeState, session: AgentSession, event: GoAwayReceived) -> None:
    """The agent winds the session down: its place may go to the agent's next session. Only
    its first GOAWAY is acted on (a flood of them costs one log line and one Redis call)."""
    if session.seat.yielded:  # an agent may send more than one
        return
    log.info("agent session %s is draining: %s", session.id, event.message or event.code)
    state.handovers.yielding(session)
    slot = session.seat.slot
    if slot is not None and state.cluster is not None:
        task = asyncio.create_task(state.cluster.yielding_slot(session.tenant, SESSIONS, slot))
        _cleanups.add(task)
        task.add_done_callback(_cleanups.discard)


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
        async with state.rights:  # never halfway through an admin change (NodeState.rights)
            try:
                await asyncio.to_thread(state.registry.refresh)
            except Exception:  # the store is unreadable for now: keep the last catalog
                log.exception("cannot re-read the registry; keeping the last known state")
            end_sessions(state)


@contextlib.asynccontextmanager
async def enforce_rights(state: NodeState) -> AsyncIterator[None]:
    """For the node's life: re-read the registry and end sessions every ``registry_refresh``
    seconds."""
    task = asyncio.create_task(_enforce_forever(state), name="enforce-rights")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
