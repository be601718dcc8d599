"""Bootloader-facing HTTP: ``GET /v1/resolve/{alias}`` and the tunnel ``ANY /t/{alias}/{path}``.

A tunneled request becomes one stream: OPEN carries the request head (hop-by-hop headers
removed per RFC 9110 §7.6.1, ``X-Forwarded-*`` and ``X-Request-Id`` added), DATA carries the
body as it arrives, OPEN_OK carries the response head and DATA the response body, each written
to the bootloader before its credit goes back. Bodies are never held whole in memory.

Errors before the response head are JSON ``{"error", "message", "request_id"}`` with the status
of shared/errors.py; after the head has been sent an error aborts the connection, so a cut-off
response can never pass for a complete one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from csc import accesslog
from csc.metrics import outcome_of
from csc.routing import lookup_alias, offline_error, online, open_stream, release_stream
from csc.state import NodeState
from shared import resolve_sig
from shared.errors import (
    UPSTREAM_CODES,
    Cancelled,
    CSCError,
    GoingAway,
    InternalError,
    PayloadTooLarge,
    PortalOffline,
    ProtocolError,
    TenantLimit,
    UpstreamError,
    UpstreamTimeout,
    http_body,
)
from shared.headers import (
    HOP_BY_HOP,
    decode_raw,
    header_pairs,
    strip_hop_by_hop,
)
from shared.headers import request_id_for as _request_id_rule
from shared.link import TunnelStream, cancel_quietly

log = logging.getLogger("csc.http")

_REPLACED = frozenset(
    {
        "host",
        "expect",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-prefix",
        "x-request-id",
        "x-csc-resolve-key",
    }
)
RETRY_AFTER_OFFLINE = "5"
#: How often a request without a body is opened again after its agent refused it unprocessed.
REOPEN_ATTEMPTS = 3


def request_id_for(request: web.Request) -> str:
    return _request_id_rule(request.headers.get("X-Request-Id"))


def tunnel_target(raw_path: str) -> str:
    """The upstream target of ``/t/{alias}{rest}``: ``rest`` (``/`` when empty), raw."""
    rest = raw_path[3:]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    rest = rest[cut:]
    if not rest.startswith("/"):
        rest = "/" + rest
    return rest


def error_response(err: CSCError, request_id: str, **extra: Any) -> web.Response:
    headers = {"X-Request-Id": request_id}
    if isinstance(err, PortalOffline | GoingAway):
        headers["Retry-After"] = RETRY_AFTER_OFFLINE
    elif isinstance(err, TenantLimit):
        headers["Retry-After"] = str(err.retry_after)
    return web.Response(
        status=err.spec.http_status,
        body=http_body(err.code, err.message, request_id=request_id, **err.details, **extra),
        content_type="application/json",
        headers=headers,
    )


def refuse(
    state: NodeState, kind: str, err: CSCError, request_id: str, tenant: str | None
) -> web.Response:
    """The error answer for ``err``, kept among the node's recent errors (csc/errorlog.py)."""
    state.errors.record(kind, err, request_id=request_id, tenant=tenant)
    return error_response(err, request_id)


async def resolve(request: web.Request) -> web.Response:
    state = request.app[NodeState.KEY]
    request_id = request_id_for(request)
    tenant: str | None = None
    try:
        alias, found = lookup_alias(state, request.match_info["alias"])
        tenant = found.tenant
        if not await online(state, alias, found):
            raise offline_error(alias, found)
    except CSCError as err:
        state.metrics.resolved(err.code)
        return refuse(state, "resolve", err, request_id, tenant)
    state.metrics.resolved("ok")
    body: dict[str, Any] = {"alias": alias, "online": True, "tunnel": f"/t/{alias}/"}
    body.update(_signed_owner(state, alias, found.tenant or "", body["tunnel"]))
    return web.json_response(body, headers={"X-Request-Id": request_id})


def _signed_owner(state: NodeState, alias: str, tenant: str, tunnel: str) -> dict[str, Any]:
    """The answer's ``tenant`` (display name, support contact) and, when the node has an
    Ed25519 key, its ``signature`` over them (shared/resolve_sig.py)."""
    owner = state.registry.tenant(tenant) if tenant else None
    name, contact = (owner.name, owner.contact) if owner is not None else (tenant, "")
    extra: dict[str, Any] = {"tenant": {"name": name, "contact": contact}}
    if state.resolve_key is not None:
        extra["signature"] = resolve_sig.sign(state.resolve_key, alias, name, contact, tunnel)
    return extra


def _forwarded_head(
    request: web.Request, state: NodeState, alias: str, request_id: str
) -> dict[str, Any]:
    pairs = [
        (n, v)
        for n, v in strip_hop_by_hop(decode_raw(request.raw_headers))
        if n.lower() not in _REPLACED
    ]
    client_ip = request.remote or ""
    prior = [v for n, v in pairs if n.lower() == "x-forwarded-for"]
    pairs = [(n, v) for n, v in pairs if n.lower() != "x-forwarded-for"]
    pairs += [
        ("X-Forwarded-For", ", ".join([*prior, client_ip]) if prior else client_ip),
        ("X-Forwarded-Proto", "https" if state.config.tls_enabled else "http"),
        ("X-Forwarded-Host", request.host),
        ("X-Forwarded-Prefix", f"/t/{alias}"),
        ("X-Request-Id", request_id),
    ]
    if state.resolve_key_text:  # the portal's get site builds it into the bootloader
        pairs.append(("X-CSC-Resolve-Key", state.resolve_key_text))
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return {
        "kind": "http",
        "alias": alias,
        "client": f"{peer[0]}:{peer[1]}" if peer else client_ip,
        "request_id": request_id,
        "method": request.method,
        "target": tunnel_target(request.raw_path),
        "headers": pairs,
        "body": request.body_exists,
    }


async def _send_body(request: web.Request, stream: TunnelStream, limit: int | None) -> None:
    sent = 0
    if request.body_exists:
        content = request.content
        while chunk := await content.readany():
            sent += len(chunk)
            if limit is not None and sent > limit:
                raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
            await stream.write(chunk)
    stream.write_eof()


async def tunnel(request: web.Request) -> web.StreamResponse:
    state = request.app[NodeState.KEY]
    started = time.monotonic()
    request_id = request_id_for(request)
    limit = state.config.max_body_size
    tenant: str | None = None
    record = accesslog.RequestRecord(
        "http", request_id, request.remote or "", started, request.match_info["alias"]
    )
    try:
        if limit is not None and (request.content_length or 0) > limit:
            raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
        alias, found = lookup_alias(state, request.match_info["alias"])
        tenant, record.alias = found.tenant, alias
        info = _forwarded_head(request, state, alias, request_id)
        stream = await open_stream(state, alias, found, info)
    except CSCError as err:
        state.metrics.request_done("http", tenant, err.code, time.monotonic() - started)
        refused = refuse(state, "http", err, request_id, tenant)
        state.traffic.record(tenant, error=True, nbytes=0)
        _log_request(state, request, record, tenant, err.code, refused.status)
        return refused
    state.stream_started()
    state.metrics.stream_started(tenant, "http")
    body: asyncio.Future[None] | None = None
    if request.body_exists:
        body = asyncio.ensure_future(_send_body(request, stream, limit))
    else:
        stream.write_eof()  # in the same message as OPEN
    outcome = InternalError.code
    try:
        if body is None:
            stream = await _reopen_unprocessed(state, alias, info, tenant, stream)
        response = await _relay_response(
            request, state, stream, body, request_id, tenant, record=record
        )
        outcome = outcome_of(stream.error)
        return response
    except asyncio.CancelledError:
        outcome = Cancelled.code
        raise
    finally:
        await cancel_quietly(body)
        stream.finish()
        await release_stream(state, tenant or "", stream)
        state.stream_finished()
        state.metrics.stream_finished("http")
        state.metrics.request_done("http", tenant, outcome, time.monotonic() - started)
        failed = outcome != "ok" or (record.status or 0) >= 500
        nbytes = request.content.total_bytes + record.bytes_out
        state.traffic.record(tenant, error=failed, nbytes=nbytes)
        _log_request(state, request, record, tenant, outcome, record.status)


async def _reopen_unprocessed(
    state: NodeState, alias: str, info: dict[str, Any], tenant: str | None, stream: TunnelStream
) -> TunnelStream:
    """Wait (up to ``open_timeout``) for the agent's answer to a request without a body; while
    the stream was refused unprocessed (its agent session, or the node relaying to it, was
    going away and never ran it: ``TunnelStream.unprocessed``), open it again on another
    session or node, up to :data:`REOPEN_ATTEMPTS` times. Returns the stream to answer from
    (the original when no other can be opened, so its error is reported)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + state.config.open_timeout
    for _ in range(REOPEN_ATTEMPTS):
        await asyncio.wait([stream.opened], timeout=max(0.0, deadline - loop.time()))
        if not (stream.opened.done() and stream.unprocessed):
            return stream
        try:
            again = await open_stream(state, alias, lookup_alias(state, alias)[1], info)
        except CSCError:
            return stream
        state.limits.release_stream(tenant or "")  # the new stream holds its own slot
        stream.finish()
        log.info("request %s: reopened after an agent going away", info["request_id"])
        stream = again
        stream.write_eof()
    return stream


def _log_request(
    state: NodeState,
    request: web.Request,
    record: accesslog.RequestRecord,
    tenant: str | None,
    outcome: str,
    status: int | None,
) -> None:
    """The access-log event of a tunneled request (csc/accesslog.py), if enabled."""
    if accesslog.enabled(state.config.access_log):
        record.method = request.method
        record.path = accesslog.path_only(tunnel_target(request.raw_path))
        record.status = status
        record.bytes_in = request.content.total_bytes
        accesslog.request_done(record, tenant, outcome)


async def _await_head(
    stream: TunnelStream, body: asyncio.Future[None] | None, timeout: float
) -> dict[str, Any]:
    """The response head, or the first error of the open or of the body upload."""
    if body is None:
        try:
            async with asyncio.timeout(timeout):
                return await stream.opened
        except TimeoutError:
            raise UpstreamTimeout(f"the portal did not answer within {timeout:g} s") from None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not stream.opened.done():
        waiting: set[asyncio.Future[Any]] = {stream.opened}
        if not body.done():
            waiting.add(body)
        remaining = deadline - loop.time()
        done, _ = await asyncio.wait(
            waiting, timeout=max(remaining, 0), return_when="FIRST_COMPLETED"
        )
        if not done:
            raise UpstreamTimeout(f"the portal did not answer within {timeout:g} s")
        if body in done and not body.cancelled():
            exc = body.exception()
            if isinstance(exc, CSCError):
                raise exc
    return stream.opened.result()


async def _relay_response(
    request: web.Request,
    state: NodeState,
    stream: TunnelStream,
    body: asyncio.Future[None] | None,
    request_id: str,
    tenant: str | None = None,
    *,
    record: accesslog.RequestRecord,
) -> web.StreamResponse:
    where = {"request_id": request_id, "tenant": tenant or ""}
    try:
        head = await _await_head(stream, body, state.config.open_timeout)
        status, reason, headers, length = _parse_head(head)
    except CSCError as err:
        stream.reset(err)
        log.info(
            "request %s to %s failed: %s", request_id, stream.info["alias"], err.code, extra=where
        )
        if isinstance(err, ProtocolError):  # the agent misbehaved, not the bootloader
            err = UpstreamError(f"the tenant agent broke the protocol: {err.message}")
        err = _for_device(state, err, tenant)
        refused = refuse(state, "http", err, request_id, tenant)
        record.status = refused.status
        return refused
    headers["X-Request-Id"] = request_id
    record.status = status
    if _may_have_body(request.method, status):
        complete = stream.read_complete()
        if complete is not None and length in (None, len(complete)):
            # the whole (small) body came with the head: head and body in one write
            stream.consumed(len(complete))
            record.bytes_out = len(complete)
            return web.Response(status=status, reason=reason, headers=headers, body=complete)
    resp = web.StreamResponse(status=status, reason=reason, headers=headers)
    if length is not None:
        resp.content_length = length
    await resp.prepare(request)
    try:
        while data := await stream.read():
            await resp.write(data)
            stream.consumed(len(data))
            record.bytes_out += len(data)
        await resp.write_eof()
    except CSCError as err:
        log.warning("request %s aborted mid-response: %s", request_id, err.message, extra=where)
        _abort(request)
    except ConnectionError:
        log.info("request %s: the client went away mid-response", request_id, extra=where)
        stream.reset(Cancelled("the client went away"))
    except asyncio.CancelledError:
        stream.reset(Cancelled("the client went away"))
        raise
    return resp


def _for_device(state: NodeState, err: CSCError, tenant: str | None) -> CSCError:
    """A failure of the tenant's side as the device gets it: the generic message (whatever an
    agent put in its OPEN_FAIL stays out) plus the tenant's name and contact."""
    if err.code not in UPSTREAM_CODES:
        return err
    plain = err.public()
    owner = state.registry.tenant(tenant) if tenant else None
    if owner is not None:
        plain.details["tenant"] = owner.public()
    return plain


def _may_have_body(method: str, status: int) -> bool:
    return method != "HEAD" and status >= 200 and status not in (204, 304)


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def _parse_head(head: dict[str, Any]) -> tuple[int, str | None, CIMultiDict[str], int | None]:
    """Status, reason, end-to-end headers and Content-Length of an OPEN_OK response head."""
    status = head.get("status")
    pairs = header_pairs(head.get("headers"))
    reason = head.get("reason")
    if not isinstance(status, int) or not 100 <= status <= 999 or pairs is None:
        raise UpstreamError("the agent sent an invalid response head")
    if not isinstance(reason, str) or "\r" in reason or "\n" in reason:
        reason = None
    headers: CIMultiDict[str] = CIMultiDict()
    length: int | None = None
    for name, value in pairs:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            continue
        if lname == "content-length":
            length = int(value) if value.isdigit() else None
            continue
        headers.add(name, value)
    return status, reason or None, headers, length
