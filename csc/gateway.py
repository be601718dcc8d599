"""The agent gateway: ``GET /v1/agent/connect``, one :class:`AgentSession` per WebSocket.

The token is read from the ``Authorization`` header only and verified before the upgrade (401
with the reason logged). After the upgrade the agent's first message must be HELLO; the session
binds the aliases it asks for (default: all its token grants) if the token covers them and no
other tenant holds them, answers WELCOME, and from then on carries streams the CSC opens.
Refusals after the upgrade are WebSocket closes with the codes of docs/protocol.md §8.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web

from csc.state import NodeState
from csc.websocket import close_websocket as _close
from csc.websocket import run_websocket
from shared.aliases import covered, normalise_grant
from shared.errors import (
    AliasForbidden,
    AuthFailed,
    CSCError,
    GoingAway,
    ProtocolError,
    http_body,
)
from shared.link import Link, joined, max_message_size
from shared.protocol import Connection, GoAwayReceived, HelloReceived, Side
from shared.tokens import AgentClaims, verify_token

log = logging.getLogger("csc.gateway")

HANDSHAKE_TIMEOUT = 10.0
_session_ids = itertools.count(1)


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

    @property
    def accepting(self) -> bool:
        conn = self.link.conn
        return not (self.link.is_closed or conn.peer_going_away or conn.local_going_away)

    @property
    def load(self) -> int:
        return self.link.conn.active_streams


def _bearer(request: web.Request) -> str:
    if any(k in request.query for k in ("token", "access_token")):
        raise AuthFailed("tokens are accepted only in the Authorization header")
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthFailed("missing 'Authorization: Bearer <token>' header")
    return token.strip()


def _refuse(err: CSCError, remote: str) -> web.Response:
    log.warning("agent from %s refused: %s", remote, err.message)
    return web.Response(
        status=err.spec.http_status,
        body=http_body(err.code, err.message),
        content_type="application/json",
    )


def _requested_grants(info: dict[str, Any], claims: AgentClaims) -> tuple[str, ...]:
    raw = info.get("aliases") or list(claims.aliases)
    if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
        raise ProtocolError("HELLO 'aliases' must be a list of strings")
    grants = tuple(dict.fromkeys(normalise_grant(a) for a in raw))
    for grant in grants:
        if not covered(claims.aliases, grant):
            raise AliasForbidden(f"alias {grant} is not covered by the agent's token")
    return grants


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
        return _refuse(GoingAway("this node is draining; connect to another"), remote)
    try:
        claims = verify_token(
            _bearer(request),
            state.public_keys,
            audience=state.config.token_audience,
            issuer=state.config.token_issuer,
        )
    except AuthFailed as err:
        state.auth_failures += 1
        return _refuse(err, remote)
    ws = web.WebSocketResponse(
        max_msg_size=max_message_size(state.config.max_frame),
        compress=False,
        autoping=True,
    )
    await ws.prepare(request)
    await _run_session(state, ws, claims, remote)
    return ws


async def _run_session(
    state: NodeState, ws: web.WebSocketResponse, claims: AgentClaims, remote: str
) -> None:
    loop = asyncio.get_running_loop()
    conn = Connection(Side.SERVER, state.link_settings, accept_streams=False, now=loop.time())
    try:
        hello = await _receive_hello(ws, conn)
        grants = _requested_grants(hello, claims)
    except (CSCError, TimeoutError) as exc:
        err = exc if isinstance(exc, CSCError) else ProtocolError("no HELLO in time")
        log.warning("agent %s (tenant %s) refused: %s", remote, claims.tenant, err.message)
        await _close(ws, err)
        return
    session_id = f"{state.node_id}-{next(_session_ids)}-{os.urandom(3).hex()}"
    link = Link(conn, joined(ws.send_bytes), name=f"session {session_id}")
    session = AgentSession(
        id=session_id,
        tenant=claims.tenant,
        grants=grants,
        remote=remote,
        claims=claims,
        link=link,
        agent=str(hello.get("agent", ""))[:100],
        opened_at=loop.time(),
    )
    try:
        state.registry.bind(session)
    except CSCError as err:
        log.warning("agent %s (tenant %s) refused: %s", remote, claims.tenant, err.message)
        await link.aclose(err)
        await _close(ws, err)
        return
    link.on_goaway = lambda ev: _on_agent_goaway(session, ev)
    conn.send_welcome(
        {
            "session_id": session_id,
            "node": state.node_id,
            "aliases": list(grants),
            "heartbeat_interval": state.link_settings.heartbeat_interval,
        },
        loop.time(),
    )
    link.kick()
    state.sessions[session_id] = session
    log.info(
        "agent session %s up: tenant %s, aliases %s, from %s",
        session_id,
        claims.tenant,
        ",".join(grants),
        remote,
    )
    if state.draining:
        link.go_away("going_away", "this node is draining")
    try:
        await run_websocket(ws, link)
    finally:
        state.registry.unbind(session)
        state.sessions.pop(session_id, None)
        reason = link.closed.result() if link.closed.done() else None
        await link.aclose()
        if not ws.closed:
            await _close(ws, reason or GoingAway("session ended"))
        log.info("agent session %s down (%s)", session_id, reason.message if reason else "closed")


def _on_agent_goaway(session: AgentSession, event: GoAwayReceived) -> None:
    log.info("agent session %s is draining: %s", session.id, event.message or event.code)
