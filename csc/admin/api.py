"""The admin API: ``/v1/admin/...`` on its own listener, JSON in and out, operator tokens.

Every request needs ``Authorization: Bearer <operator token>`` (401 otherwise); the token is
looked up by its SHA-256 among the operators of the store and never logged. Routes (documented
in docs/openapi.json, which a test compares with :data:`ROUTES`): tenants CRUD, alias assign and
unassign, agent token issue/list/revoke, live sessions and disconnect, drain, the audit log,
the node's status and its recent error answers. The same listener serves the read-only web
console (:mod:`csc.admin.console`) at ``/console/`` without a token: its files hold no data, and its
script reads this API with the operator's token.

Every change goes to the store in one transaction with its audit entry (operator, remote
address, action, target, details; never a secret), then the node re-reads the registry and ends
the sessions that lost their right to run (:func:`csc.relay.gateway.end_sessions`): a revoked token's
sessions close with 4401, a suspended tenant's with 4423, a deleted tenant's with 4401.

Errors are JSON ``{"error", "message"}`` (plus ``problems``, every one, for a 400 or a 409):
400 ``bad_request``, 401 ``auth_failed``, 404 ``not_found``, 405 ``method_not_allowed``, 409
``conflict`` / ``alias_taken`` / ``not_assigned``, 413 ``payload_too_large``, 503
``no_signing_key``, 503 ``store_unavailable`` (the PostgreSQL store cannot be reached; retry
later), 500 ``internal`` (details only in the server log). Store calls run in a worker thread,
so a busy database never stalls the relay.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from csc.admin import console
from csc.cluster import ClusterUnavailable
from csc.relay.gateway import AgentSession, end_sessions
from csc.signing import signing_key
from csc.state import NodeState
from csc.store import Store, StoreUnavailable, token_hash
from csc.tenants import (
    Actor,
    Conflict,
    InvalidInput,
    NotFound,
    Tenant,
    parse_grants,
    parse_new_tenant,
    parse_tenant_update,
    parse_ttl_value,
)
from shared.aliases import covered, normalise_grant
from shared.errors import BadAlias, GoingAway, InvalidState
from shared.timefmt import iso
from shared.tokens import PrivateKey, SigningKeyError

if TYPE_CHECKING:
    from csc.cluster.node import Cluster

log = logging.getLogger("csc.admin")

PREFIX = "/v1/admin"
URL_FILE = "admin-url"
#: The node's state on the admin application.
STATE = web.AppKey("csc_node_state", NodeState)
MAX_BODY = 64 * 1024
DEFAULT_TTL = "30d"
OPERATOR = web.RequestKey("csc_operator", str)
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminError(Exception):
    """An error answer of the admin API."""

    def __init__(
        self, status: int, code: str, message: str, problems: list[str] | None = None
    ) -> None:
        self.status, self.code, self.message, self.problems = status, code, message, problems
        super().__init__(message)


def error_response(err: AdminError) -> web.Response:
    body: dict[str, Any] = {"error": err.code, "message": err.message}
    if err.problems is not None:
        body["problems"] = err.problems
    headers = {"WWW-Authenticate": 'Bearer realm="csc-admin"'} if err.status == 401 else None
    return web.json_response(body, status=err.status, headers=headers)


def _translate(exc: Exception) -> AdminError:
    if isinstance(exc, AdminError):
        return exc
    if isinstance(exc, InvalidInput):
        count = len(exc.problems)
        message = f"the request has {count} problem{'s' if count != 1 else ''}"
        return AdminError(400, "bad_request", message, exc.problems)
    if isinstance(exc, NotFound):
        return AdminError(404, "not_found", str(exc))
    if isinstance(exc, Conflict):
        count = len(exc.problems)
        message = exc.problems[0] if count == 1 else f"the change conflicts in {count} ways"
        return AdminError(409, exc.code, message, exc.problems)
    if isinstance(exc, StoreUnavailable):
        log.warning("admin API: %s", exc)
        return AdminError(503, "store_unavailable", str(exc))
    if isinstance(exc, web.HTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        return AdminError(exc.status, code.get(exc.status, "bad_request"), exc.reason)
    log.error("admin API: internal error", exc_info=exc)
    return AdminError(500, "internal", "internal error; see the server log")


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Exception as exc:
        return error_response(_translate(exc))


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AdminError(401, "auth_failed", "missing 'Authorization: Bearer <token>' header")
    return token.strip()


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if console.is_console_path(request.path):
        return await handler(request)  # the console's files: no data, no token (csc.admin.console)
    state = request.app[STATE]
    remote = request.remote or "?"
    try:
        operator = state.registry.operator(token_hash(_bearer(request)))
        if operator is None:
            raise AdminError(401, "auth_failed", "unknown operator token")
    except AdminError as err:
        log.warning(
            "admin API: %s %s from %s refused: %s",
            request.method,
            request.path,
            remote,
            err.message,
        )
        raise
    request[OPERATOR] = operator
    return await handler(request)


# --- helpers -----------------------------------------------------------------------------------


def _state(request: web.Request) -> tuple[NodeState, Store]:
    state = request.app[STATE]
    if state.store is None:  # the listener is started only with a store
        raise InvalidState("the admin API runs without a store")
    return state, state.store


def _actor(request: web.Request) -> Actor:
    return Actor(request[OPERATOR], request.remote or "?")


async def _run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.to_thread(fn, *args, **kwargs)


async def _commit(state: NodeState, fn: Callable[..., T], *args: Any) -> tuple[T, int]:
    """Write a change to the store and apply it (:func:`_apply`) with the periodic re-read held
    off (``NodeState.rights``): the sessions the change ends are all counted in the answer."""
    async with state.rights:
        result = await _run(fn, *args)
        return result, await _apply(state)


async def _apply(state: NodeState) -> int:
    """After a change: re-read the registry and end the sessions that may no longer run, here
    and (through the cluster's event channel) on every other node."""
    await _run(state.registry.refresh, force=True)
    closed = end_sessions(state)
    if state.cluster is not None:
        await state.cluster.publish({"t": "catalog"})
    return closed


async def _body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        raise InvalidInput(["the body must be a JSON object"])
    try:
        return json.loads(raw)
    except (ValueError, UnicodeError) as exc:
        raise InvalidInput([f"the body is not valid JSON: {exc}"]) from None


def _query_flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value not in ("true", "1", "yes", "false", "0", "no"):
        raise InvalidInput([f"query {name}: expected true or false"])
    return value in ("true", "1", "yes")


def _query_int(
    request: web.Request, name: str, default: int | None, low: int, high: int
) -> int | None:
    text = request.query.get(name)
    if text is None:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise InvalidInput([f"query {name}: expected a whole number from {low} to {high}"])
    return int(text)


def _tenant_filter(request: web.Request) -> str | None:
    return request.query.get("tenant") or None


def _grant(text: str, name: str = "alias") -> str:
    try:
        return normalise_grant(text)
    except BadAlias as exc:
        raise InvalidInput([f"{name}: {exc.message}"]) from None


def _sessions_of(state: NodeState, tenant: str | None = None) -> list[AgentSession]:
    found = [s for s in state.sessions.values() if tenant is None or s.tenant == tenant]
    return sorted(found, key=lambda s: (s.tenant, s.since, s.id))


def session_view(session: AgentSession, node: str) -> dict[str, Any]:
    return {
        "id": session.id,
        "tenant": session.tenant,
        "aliases": list(session.grants),
        "node": node,
        "remote": session.remote,
        "agent": session.agent,
        "since": iso(session.since),
        "state": "active" if session.accepting else "draining",
        "streams": session.load,
        "streams_total": session.streams_opened,
        "bytes_in": session.traffic.bytes_in,
        "bytes_out": session.traffic.bytes_out,
        "token_jti": session.jti,
        "token_expires_at": iso(session.expires_at),
    }


def _tenant_view(state: NodeState, tenant: Tenant) -> dict[str, Any]:
    view = tenant.to_json()
    view["aliases"] = state.registry.catalog.aliases_of(tenant.id)
    view["sessions"] = len(_sessions_of(state, tenant.id))
    return view


# --- tenants -----------------------------------------------------------------------------------


async def list_tenants(request: web.Request) -> web.Response:
    state, store = _state(request)
    tenants = await _run(store.tenants)
    state.registry.refresh()
    return web.json_response({"tenants": [_tenant_view(state, t) for t in tenants]})


async def create_tenant(request: web.Request) -> web.Response:
    state, store = _state(request)
    tenant = parse_new_tenant(await _body(request), time.time())
    await _run(store.create_tenant, tenant, _actor(request))
    await _apply(state)
    log.info("admin %s created tenant %s", request[OPERATOR], tenant.id)
    location = f"{PREFIX}/tenants/{tenant.id}"
    return web.json_response(
        _tenant_view(state, tenant), status=201, headers={"Location": location}
    )


async def get_tenant(request: web.Request) -> web.Response:
    state, store = _state(request)
    tenant = await _run(store.tenant, request.match_info["tenant"])
    tokens = await _run(store.tokens, tenant.id)
    state.registry.refresh()
    view = _tenant_view(state, tenant)
    now = time.time()
    view["tokens"] = [t.to_json(now) for t in tokens]
    view["live_sessions"] = [session_view(s, state.node_id) for s in _sessions_of(state, tenant.id)]
    return web.json_response(view)


async def update_tenant(request: web.Request) -> web.Response:
    state, store = _state(request)
    update = parse_tenant_update(await _body(request))
    tenant_id = request.match_info["tenant"]
    tenant, closed = await _commit(state, store.update_tenant, tenant_id, update, _actor(request))
    log.info("admin %s updated tenant %s (state %s)", request[OPERATOR], tenant.id, tenant.state)
    return web.json_response({**_tenant_view(state, tenant), "sessions_closed": closed})


async def delete_tenant(request: web.Request) -> web.Response:
    state, store = _state(request)
    tenant_id = request.match_info["tenant"]
    cascade = _query_flag(request, "cascade")
    summary, closed = await _commit(state, store.delete_tenant, tenant_id, cascade, _actor(request))
    state.metrics.forget_tenant(tenant_id)
    log.info("admin %s deleted tenant %s", request[OPERATOR], tenant_id)
    return web.json_response({"deleted": tenant_id, **summary, "sessions_closed": closed})


# --- aliases -----------------------------------------------------------------------------------


async def list_aliases(request: web.Request) -> web.Response:
    state, store = _state(request)
    assignments = await _run(store.assignments, _tenant_filter(request))
    elsewhere = await _other_nodes_sessions(state)
    rows = []
    for a in assignments:
        live = [s for s in _sessions_of(state, a.tenant) if covered(s.grants, a.alias)]
        remote = [
            v
            for v in elsewhere
            if v.get("tenant") == a.tenant and covered(tuple(v.get("aliases", ())), a.alias)
        ]
        online = any(s.accepting for s in live) or any(v.get("state") == "active" for v in remote)
        seen = None if online else iso(state.last_seen.alias(a.tenant, a.alias))
        row = {**a.to_json(), "sessions": len(live) + len(remote), "online": online}
        rows.append({**row, "last_seen": seen})
    return web.json_response({"aliases": rows})


async def _other_sessions(cluster: Cluster) -> dict[str, list[dict[str, Any]]]:
    """Other nodes' session views by node; 503 ``cluster_unavailable`` while Redis is down."""
    try:
        return await cluster.routes.other_sessions()
    except ClusterUnavailable as exc:
        raise AdminError(503, "cluster_unavailable", f"cannot read other nodes: {exc}") from None


async def _other_nodes_sessions(state: NodeState) -> list[dict[str, Any]]:
    """The session views other nodes of the cluster published (none on a lone node, or while
    Redis cannot be read)."""
    if state.cluster is None:
        return []
    try:
        others = await state.cluster.routes.other_sessions()
    except ClusterUnavailable:
        return []
    return [view for views in others.values() for view in views]


async def assign_aliases(request: web.Request) -> web.Response:
    state, store = _state(request)
    tenant_id = request.match_info["tenant"]
    body = await _body(request)
    problems: list[str] = []
    if not isinstance(body, dict):
        raise InvalidInput(["the body must be a JSON object"])
    problems += [f"{key}: unknown field" for key in body if key != "aliases"]
    grants = parse_grants(body.get("aliases"), "aliases", problems)
    if problems:
        raise InvalidInput(problems)
    added = await _run(store.assign, tenant_id, grants, _actor(request))
    await _apply(state)
    aliases = state.registry.catalog.aliases_of(tenant_id)
    return web.json_response({"tenant": tenant_id, "assigned": added, "aliases": aliases})


async def unassign_alias(request: web.Request) -> web.Response:
    state, store = _state(request)
    tenant_id = request.match_info["tenant"]
    grant = _grant(request.match_info["alias"])
    await _run(store.unassign, tenant_id, grant, _actor(request))
    await _apply(state)
    aliases = state.registry.catalog.aliases_of(tenant_id)
    return web.json_response({"tenant": tenant_id, "unassigned": grant, "aliases": aliases})


# --- tokens ------------------------------------------------------------------------------------


async def list_tokens(request: web.Request) -> web.Response:
    _, store = _state(request)
    records = await _run(store.tokens, _tenant_filter(request))
    now = time.time()
    return web.json_response({"tokens": [r.to_json(now) for r in records]})


def _signing_key(state: NodeState) -> PrivateKey:
    try:
        return signing_key(state.config, state.store, create=False).key
    except SigningKeyError as exc:
        raise AdminError(
            503, "no_signing_key", f"this node cannot sign agent tokens: {exc}"
        ) from None


async def issue_token(request: web.Request) -> web.Response:
    state, store = _state(request)
    body = await _body(request)
    if not isinstance(body, dict):
        raise InvalidInput(["the body must be a JSON object"])
    problems = [f"{key}: unknown field" for key in body if key not in ("tenant", "aliases", "ttl")]
    tenant = body.get("tenant")
    if not isinstance(tenant, str) or not tenant:
        problems.append("tenant: required (a tenant id)")
    grants = parse_grants(body.get("aliases"), "aliases", problems)
    ttl = parse_ttl_value(body.get("ttl", DEFAULT_TTL), problems)
    if problems:
        raise InvalidInput(problems)
    assert isinstance(tenant, str) and ttl is not None
    await _run(store.tenant, tenant)  # 404 before anything else
    key = await _run(_signing_key, state)
    token, record = await _run(
        store.issue_token,
        key,
        tenant=tenant,
        grants=grants,
        ttl=ttl,
        audience=state.config.token_audience,
        issuer=state.config.token_issuer,
        actor=_actor(request),
    )
    log.info("admin %s issued token %s for tenant %s", request[OPERATOR], record.jti, tenant)
    body = {"token": token, **record.to_json(time.time())}
    return web.json_response(body, status=201, headers={"Cache-Control": "no-store"})


async def revoke_token(request: web.Request) -> web.Response:
    state, store = _state(request)
    jti = request.match_info["jti"]
    if not 0 < len(jti) <= 128 or not jti.isprintable():
        raise InvalidInput(["jti: expected 1 to 128 printable characters"])
    if not _query_flag(request, "unrecorded") and await _run(store.token, jti) is None:
        raise NotFound(f"no token {jti!r} was issued by this CSC (?unrecorded=true revokes it)")
    (record, fresh), closed = await _commit(state, store.revoke_token, jti, _actor(request))
    log.info("admin %s revoked token %s (%d sessions closed)", request[OPERATOR], jti, closed)
    return web.json_response(
        {
            "jti": jti,
            "revoked": True,
            "already_revoked": not fresh,
            "token": record.to_json(time.time()) if record is not None else None,
            "sessions_closed": closed,
        }
    )


# --- sessions, drain, audit --------------------------------------------------------------------


async def list_sessions(request: web.Request) -> web.Response:
    """The live sessions of this node and, in a cluster, of every other live node (each view
    names its node; other nodes' views are as of their last heartbeat)."""
    state, _ = _state(request)
    tenant = _tenant_filter(request)
    views = [session_view(s, state.node_id) for s in _sessions_of(state, tenant)]
    nodes = [state.node_id]
    if state.cluster is not None:
        others = await _other_sessions(state.cluster)
        for node, node_views in sorted(others.items()):
            nodes.append(node)
            views += [v for v in node_views if tenant is None or v.get("tenant") == tenant]
    return web.json_response({"node": state.node_id, "nodes": nodes, "sessions": views})


async def disconnect_session(request: web.Request) -> web.Response:
    state, store = _state(request)
    session_id = request.match_info["session"]
    session = state.sessions.get(session_id)
    if session is None:
        return await _disconnect_elsewhere(request, state, store, session_id)
    details = {"tenant": session.tenant, "remote": session.remote}
    await _run(store.record_event, _actor(request), "session.disconnect", session_id, details)
    session.end(GoingAway("disconnected by an operator"))
    log.info("admin %s disconnected session %s", request[OPERATOR], session_id)
    return web.json_response({"disconnected": session_id, **details})


async def _disconnect_elsewhere(
    request: web.Request, state: NodeState, store: Store, session_id: str
) -> web.Response:
    """A session held by another node of the cluster: that node ends it on an event."""
    if state.cluster is None:
        raise NotFound(f"no live session {session_id!r} on this node")
    others = await _other_sessions(state.cluster)
    for node, views in others.items():
        view = next((v for v in views if v.get("id") == session_id), None)
        if view is None:
            continue
        details = {"tenant": view.get("tenant"), "remote": view.get("remote"), "node": node}
        try:
            await state.cluster.request_disconnect(node, session_id)
        except ClusterUnavailable as exc:
            raise AdminError(
                503, "cluster_unavailable", f"cannot reach node {node}: {exc}"
            ) from None
        await _run(store.record_event, _actor(request), "session.disconnect", session_id, details)
        log.info("admin %s disconnected session %s on node %s", request[OPERATOR], session_id, node)
        return web.json_response({"disconnected": session_id, **details})
    raise NotFound(f"no live session {session_id!r} on any node")


async def drain(request: web.Request) -> web.Response:
    state, store = _state(request)
    already = state.draining or state.stop_requested.is_set()
    details = {"sessions": len(state.sessions), "streams": state.active_streams}
    if not already:
        await _run(store.record_event, _actor(request), "node.drain", state.node_id, details)
        log.warning("admin %s asked the node to drain", request[OPERATOR])
        state.stop_requested.set()
    body = {"node": state.node_id, "draining": True, "already_draining": already, **details}
    return web.json_response(body, status=202)


async def audit(request: web.Request) -> web.Response:
    _, store = _state(request)
    limit = _query_int(request, "limit", 100, 1, 1000)
    before = _query_int(request, "before", None, 1, 2**62)
    assert limit is not None
    entries = await _run(store.audit, limit, before)
    return web.json_response({"entries": [e.to_json() for e in entries]})


async def node_status(request: web.Request) -> web.Response:
    state, _ = _state(request)
    body = {
        "node": state.node_id,
        "draining": state.draining or state.stop_requested.is_set(),
        "sessions": len(state.sessions),
        "streams": state.active_streams,
        "errors_total": state.errors.total,
        "tasks": len(asyncio.all_tasks()),
    }
    if state.cluster is not None:
        body["cluster"] = {
            "epoch": state.cluster.routes.epoch,
            "peer": state.cluster.advertised,
            "redis": "ok" if state.cluster.healthy else "unreachable",
            "nodes": [
                {"node": n.id, "peer": n.peer, "draining": n.draining}
                for n in sorted(state.cluster.routes.directory.values(), key=lambda n: n.id)
            ],
        }
    return web.json_response(body)


async def recent_errors(request: web.Request) -> web.Response:
    """The node's last error answers (csc/admin/errorlog.py), newest first."""
    state, _ = _state(request)
    limit = _query_int(request, "limit", 100, 1, 1000)
    entries = state.errors.recent(limit, tenant=_tenant_filter(request))
    body = {
        "node": state.node_id,
        "capacity": state.errors.capacity,
        "total": state.errors.total,
        "errors": [e.to_json() for e in entries],
    }
    return web.json_response(body)


async def traffic(request: web.Request) -> web.Response:
    """This node's per-tenant requests, errors and bytes of the last 15 minutes (csc/relay/traffic.py)."""
    state, _ = _state(request)
    return web.json_response(
        {"node": state.node_id, **state.traffic.series(_tenant_filter(request))}
    )


#: (method, path, handler): every route of the admin API (docs/openapi.json documents each).
ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/tenants", list_tenants),
    ("POST", "/tenants", create_tenant),
    ("GET", "/tenants/{tenant}", get_tenant),
    ("PATCH", "/tenants/{tenant}", update_tenant),
    ("DELETE", "/tenants/{tenant}", delete_tenant),
    ("POST", "/tenants/{tenant}/aliases", assign_aliases),
    ("DELETE", "/tenants/{tenant}/aliases/{alias}", unassign_alias),
    ("GET", "/aliases", list_aliases),
    ("GET", "/tokens", list_tokens),
    ("POST", "/tokens", issue_token),
    ("POST", "/tokens/{jti}/revoke", revoke_token),
    ("GET", "/sessions", list_sessions),
    ("DELETE", "/sessions/{session}", disconnect_session),
    ("POST", "/drain", drain),
    ("GET", "/audit", audit),
    ("GET", "/node", node_status),
    ("GET", "/errors", recent_errors),
    ("GET", "/traffic", traffic),
)


def create_admin_app(state: NodeState) -> web.Application:
    """The admin API application for a node (its ``state`` must have a store)."""
    if state.store is None:
        raise ValueError("the admin API needs a store")
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_errors, _auth])
    app[STATE] = state
    for method, path, handler in ROUTES:
        app.router.add_route(method, PREFIX + path, handler)
    return app
