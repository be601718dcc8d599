"""Bootloader-facing HTTP: ``GET /v1/resolve/{alias}``, the tunnel ``ANY /t/{alias}/{path}``,
``/healthz`` and ``/readyz``, served on the connections of csc/relay/http_front.py.

A tunneled request becomes one stream: OPEN carries the request head (hop-by-hop headers
removed per RFC 9110 §7.6.1, ``X-Forwarded-*`` and ``X-Request-Id`` added), DATA carries the
body as it arrives, OPEN_OK carries the response head and DATA the response body, each written
to the bootloader and drained below the connection's high-water mark before its credit goes
back (``stream.consumed``). Bodies are never held whole in memory.

Errors before the response head are JSON ``{"error", "message", "request_id"}`` with the status
of shared/errors.py; after the head has been sent an error aborts the connection, so a cut-off
response can never pass for a complete one. The body relayed is checked against the framing
announced: more or fewer bytes than the agent's ``Content-Length`` abort the connection, which
is never reused; without a length the body is chunked (HTTP/1.1) or close-delimited (HTTP/1.0).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from csc.relay import accesslog
from csc.relay.http_front import FrontConnection
from csc.relay.http_front_request import HEALTHZ, READYZ, RESOLVE, TUNNEL, FrontRequest
from csc.relay.ingress_stream import StreamUse, refused
from csc.relay.routing import lookup_alias, offline_error, online, open_stream
from csc.state import NodeState
from shared import resolve_sig
from shared.aio import cancel_quietly, fail_at
from shared.errors import (
    UPSTREAM_CODES,
    AgentLost,
    Cancelled,
    CSCError,
    HeartbeatTimeout,
    LinkStalled,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ProtocolError,
    UpstreamError,
    UpstreamTimeout,
)
from shared.headers import HOP_BY_HOP, content_length, header_pairs, strip_hop_by_hop
from shared.http1 import CHUNKED, CLOSE, LAST_CHUNK, LENGTH, NONE, encode_head, json_response
from shared.linkstream import TunnelStream

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
#: How often a request without a body is opened again after its agent refused it unprocessed.
REOPEN_ATTEMPTS = 3
#: Safe methods (RFC 9110 §9.2.1): a request without a body whose link ended before any answer
#: is sent again, although the agent may have run it, since running it twice changes nothing.
RETRY_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Errors that say the link carrying a stream ended, not that the portal answered.
LINK_ENDED = frozenset({AgentLost.code, HeartbeatTimeout.code, LinkStalled.code})
_READ_ONLY = ("GET", "HEAD")


def tunnel_target(target: str) -> str:
    """The upstream target of ``/t/{alias}{rest}``: ``rest`` (``/`` when empty), raw."""
    rest = target[3:]
    cut, query = rest.find("/"), rest.find("?")
    if cut < 0 or 0 <= query < cut:
        cut = query
    if cut < 0:
        return "/"
    rest = rest[cut:]
    return rest if rest[0] == "/" else "/" + rest


class Ingress:
    """The :class:`csc.relay.http_front.Handler` of a node."""

    def __init__(self, state: NodeState) -> None:
        self.state = state

    async def serve(self, conn: FrontConnection, request: FrontRequest) -> None:
        kind = request.kind
        if kind == TUNNEL:
            await tunnel(self.state, conn, request)
        elif kind not in (RESOLVE, HEALTHZ, READYZ):
            conn.error(request, NotFound(f"nothing is served at {request.target[:100]}"))
        elif request.method not in _READ_ONLY:
            conn.error(request, MethodNotAllowed(f"{request.method} is not allowed here"))
        elif kind == RESOLVE:
            await resolve(self.state, conn, request)
        elif kind == HEALTHZ:
            _json(conn, request, 200, {"status": "ok"})
        elif self.state.draining:
            _json(conn, request, 503, {"status": "draining"})
        else:
            _json(conn, request, 200, {"status": "ready", "sessions": len(self.state.sessions)})


def _json(conn: FrontConnection, request: FrontRequest, status: int, body: dict[str, Any]) -> None:
    conn.send(
        json_response(
            status,
            json.dumps(body).encode(),
            request_id=request.request_id,
            keep_alive=conn.keep_alive(request),
            http11=request.http11,
            method=request.method,
        )
    )


def refuse(
    state: NodeState,
    conn: FrontConnection,
    request: FrontRequest,
    kind: str,
    err: CSCError,
    tenant: str | None,
) -> int:
    """Answer ``err`` (kept among the node's recent errors, csc/admin/errorlog.py); its status."""
    state.errors.record(kind, err, request_id=request.request_id, tenant=tenant)
    return conn.error(request, err)


async def resolve(state: NodeState, conn: FrontConnection, request: FrontRequest) -> None:
    tenant: str | None = None
    try:
        alias, found = lookup_alias(state, request.alias)
        tenant = found.tenant
        if not await online(state, alias, found):
            raise offline_error(alias, found)
    except CSCError as err:
        state.metrics.resolved(err.code)
        refuse(state, conn, request, "resolve", err, tenant)
        return
    state.metrics.resolved("ok")
    body: dict[str, Any] = {"alias": alias, "online": True, "tunnel": f"/t/{alias}/"}
    body.update(_signed_owner(state, alias, found.tenant or "", body["tunnel"]))
    _json(conn, request, 200, body)


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
    conn: FrontConnection, request: FrontRequest, state: NodeState, alias: str, target: str
) -> dict[str, Any]:
    pairs = [(n, v) for n, v in strip_hop_by_hop(request.headers) if n.lower() not in _REPLACED]
    client_ip = conn.client_ip
    prior = [v for n, v in pairs if n.lower() == "x-forwarded-for"]
    pairs = [(n, v) for n, v in pairs if n.lower() != "x-forwarded-for"]
    host = request.header("host") or ""
    pairs += [
        ("X-Forwarded-For", ", ".join([*prior, client_ip]) if prior else client_ip),
        ("X-Forwarded-Proto", "https" if conn.tls else "http"),
        ("X-Forwarded-Host", host),
        ("X-Forwarded-Prefix", f"/t/{alias}"),
        ("X-Request-Id", request.request_id),
    ]
    if state.resolve_key_text:  # the portal's get site builds it into the bootloader
        pairs.append(("X-CSC-Resolve-Key", state.resolve_key_text))
    return {
        "kind": "http",
        "alias": alias,
        "client": conn.peer or client_ip,
        "request_id": request.request_id,
        "method": request.method,
        "target": target,
        "headers": pairs,
        "body": request.has_body,
    }


async def _send_body(
    conn: FrontConnection, request: FrontRequest, stream: TunnelStream, limit: int | None
) -> None:
    """Relay the request body; on any failure the stream is reset, never ended as complete."""
    try:
        while chunk := await conn.body_chunk(request):
            if limit is not None and request.received > limit:
                raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
            await stream.write(chunk)
    except CSCError as err:
        stream.reset(err)
        raise
    stream.write_eof()


async def tunnel(state: NodeState, conn: FrontConnection, request: FrontRequest) -> None:
    started = time.monotonic()
    limit = state.config.max_body_size
    tenant: str | None = None
    record = accesslog.RequestRecord("http", request.request_id, conn.client_ip, started)
    record.alias, record.method = request.alias, request.method
    target = tunnel_target(request.target)
    record.path = accesslog.path_only(target)
    try:
        if limit is not None and (request.length or 0) > limit:
            raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
        alias, found = lookup_alias(state, request.alias)
        tenant, record.alias = found.tenant, alias
        conn.relay_from(None, tenant or "")  # whose the bytes held for this request are
        info = _forwarded_head(conn, request, state, alias, target)
        stream = await open_stream(state, alias, found, info)
    except CSCError as err:
        record.status = refuse(state, conn, request, "http", err, tenant)
        refused(state, record, tenant, err)
        return
    use = StreamUse(state, record, tenant, stream)
    use.start()  # from here on, whatever happens ends in _tunnel_ended
    answer_by = _AnswerDeadline(conn.loop, state.config.open_timeout)
    answer_by.watch(stream)
    body: asyncio.Future[None] | None = None
    if request.has_body:
        body = asyncio.ensure_future(_send_body(conn, request, stream, limit))
    else:
        _end_request(stream)  # in the same message as OPEN
    # no `finally` nor `async with` here: their awaits would read the exception being handled
    # from the thread, not from this coroutine (shared/compiled.py)
    try:
        if body is None:
            safe = request.method in RETRY_SAFE_METHODS
            use.stream = await _reopen_unprocessed(
                state, alias, info, tenant, stream, safe, answer_by
            )
        await _relay_response(conn, request, state, use, body)
    except BaseException as exc:
        if isinstance(exc, asyncio.CancelledError):
            use.stream.reset(Cancelled("the client went away"))
        await _tunnel_ended(use, request, body, exc)
        raise exc
    await _tunnel_ended(use, request, body, None)


def _end_request(stream: TunnelStream) -> None:
    """FIN after a bodyless request's OPEN. A stream that failed already (a forwarded one whose
    peer link ended while it opened) raises its error here: it is reported from ``opened``."""
    try:  # noqa: SIM105  (contextlib.suppress makes an object per request)
        stream.write_eof()
    except CSCError:
        pass


async def _tunnel_ended(
    use: StreamUse,
    request: FrontRequest,
    body: asyncio.Future[None] | None,
    exc: BaseException | None,
) -> None:
    await cancel_quietly(body)
    use.record.bytes_in = request.received
    await use.end(exc)


def _may_reopen(stream: TunnelStream, safe: bool) -> bool:
    """Whether a bodyless stream that failed before its answer may be opened again: it never
    ran (refused unprocessed), or its method is safe and its link ended under it."""
    if not stream.opened.done() or stream.opened.cancelled():
        return False
    if stream.unprocessed:
        return True
    err = stream.opened.exception()
    return safe and isinstance(err, CSCError) and err.code in LINK_ENDED


async def _reopen_unprocessed(
    state: NodeState,
    alias: str,
    info: dict[str, Any],
    tenant: str | None,
    stream: TunnelStream,
    safe: bool,
    answer_by: _AnswerDeadline,
) -> TunnelStream:
    """Wait (up to ``open_timeout``) for the agent's answer to a request without a body; while
    the stream was refused unprocessed (its agent session, or the node relaying to it, was
    going away and never ran it: ``TunnelStream.unprocessed``), or, for a ``safe`` method, its
    link ended before any answer (:data:`LINK_ENDED`), open it again on another session or
    node, up to :data:`REOPEN_ATTEMPTS` times. Returns the stream to answer from (the original
    when no other can be opened, so its error is reported)."""
    for _ in range(REOPEN_ATTEMPTS):
        if not stream.opened.done():
            # looked at below, reported by the caller; not contextlib.suppress, which makes an
            # object per request on this path
            try:  # noqa: SIM105
                await stream.opened
            except CSCError:
                pass
        if not _may_reopen(stream, safe):
            return stream
        try:
            again = await open_stream(state, alias, lookup_alias(state, alias)[1], info)
        except CSCError:
            return stream
        state.limits.release_stream(tenant or "")  # the new stream holds its own slot
        stream.finish()
        why = "an agent going away" if stream.unprocessed else "its agent link ended"
        log.info("request %s: reopened after %s", info["request_id"], why)
        stream = again
        answer_by.watch(stream)
        _end_request(stream)
    return stream


class _AnswerDeadline:
    """The agent's answer is due ``open_timeout`` after the request's first stream was opened
    (a stream opened again for the same request keeps that deadline): a stream whose answer
    has not come by then has its ``opened`` failed with ``upstream_timeout``. One timer per
    stream, cancelled by the answer, so the request's task awaits ``opened`` itself."""

    __slots__ = ("deadline", "timeout")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.timeout = timeout
        self.deadline = loop.time() + timeout

    def watch(self, stream: TunnelStream) -> None:
        fail_at(stream.opened, self.deadline, self._expired)

    def _expired(self) -> UpstreamTimeout:
        return UpstreamTimeout(f"the portal did not answer within {self.timeout:g} s")


async def _await_head(stream: TunnelStream, body: asyncio.Future[None] | None) -> dict[str, Any]:
    """The response head, or the first error of the open (``upstream_timeout`` once its
    :class:`_AnswerDeadline` passed) or of the body upload."""
    if body is None:
        return await stream.opened
    while not stream.opened.done():
        waiting: set[asyncio.Future[Any]] = {stream.opened}
        if not body.done():
            waiting.add(body)
        done, _ = await asyncio.wait(waiting, return_when="FIRST_COMPLETED")
        if body in done and not body.cancelled():
            exc = body.exception()
            if isinstance(exc, CSCError):
                raise exc
    return stream.opened.result()


async def _relay_response(
    conn: FrontConnection,
    request: FrontRequest,
    state: NodeState,
    use: StreamUse,
    body: asyncio.Future[None] | None,
) -> None:
    stream, record, tenant = use.stream, use.record, use.tenant
    request_id = request.request_id
    where = {"request_id": request_id, "tenant": tenant or ""}
    try:
        head = await _await_head(stream, body)
        status, reason, headers, length = _parse_head(head)
        complete = stream.read_complete() if _may_have_body(request.method, status) else None
        if complete is not None and length not in (None, len(complete)):
            raise UpstreamError("the agent's response body does not match its Content-Length")
    except CSCError as err:
        stream.reset(err)
        log.info(
            "request %s to %s failed: %s", request_id, stream.info["alias"], err.code, extra=where
        )
        if isinstance(err, ProtocolError):  # the agent misbehaved, not the bootloader
            err = UpstreamError(f"the tenant agent broke the protocol: {err.message}")
        err = _for_device(state, err, tenant)
        record.status = refuse(state, conn, request, "http", err, tenant)
        return
    record.status = status
    if not _may_have_body(request.method, status):
        mode = NONE
        if length is not None and status not in (204,) and status >= 200:
            headers.append(("Content-Length", str(length)))
    elif complete is not None:
        mode, length = LENGTH, len(complete)
    elif length is not None:
        mode = LENGTH
    else:
        mode = CHUNKED if request.http11 else CLOSE
    if mode == LENGTH:
        headers.append(("Content-Length", str(length)))
    keep = conn.keep_alive(request) and mode != CLOSE
    data = encode_head(
        status,
        reason or "",
        headers,
        request_id=request_id,
        mode=mode,
        keep_alive=keep,
        http11=request.http11,
    )
    if complete is not None:
        # the whole (small) body came with the head: head and body in one write
        conn.send(data + complete)
        stream.consumed(len(complete))
        record.bytes_out = len(complete)
        return
    conn.send(data)
    if mode == NONE:
        return
    if mode == CLOSE:
        request.keep_alive = False  # the end of the body is the end of the connection
    conn.relay_from(stream, tenant or "")  # what waits behind the client's write buffer
    try:
        await _relay_body(conn, stream, mode, length, record)
    except CSCError as err:
        log.warning("request %s aborted mid-response: %s", request_id, err.message, extra=where)
        if stream.error is None:
            use.outcome = err.code
        conn.abort()
    except ConnectionError:
        log.info("request %s: the client went away mid-response", request_id, extra=where)
        stream.reset(Cancelled("the client went away"))
    finally:
        conn.relay_from(None, tenant or "")


async def _relay_body(
    conn: FrontConnection,
    stream: TunnelStream,
    mode: str,
    length: int | None,
    record: accesslog.RequestRecord,
) -> None:
    """The response body in the framing announced; raises UpstreamError when the agent's
    body is longer or shorter than the length announced."""
    sent = 0
    while data := await stream.read():
        size = len(data)
        if length is not None and sent + size > length:
            stream.reset(UpstreamError("response body longer than its Content-Length"))
            raise UpstreamError("the agent's response body is longer than its Content-Length")
        if mode == CHUNKED:
            conn.send(b"%x\r\n" % size, data, b"\r\n")
        else:
            conn.send(data)
        sent += size
        record.bytes_out = sent
        await conn.drain()
        stream.consumed(size)
    if length is not None and sent != length:
        raise UpstreamError("the agent's response body is shorter than its Content-Length")
    if mode == CHUNKED:
        conn.send(LAST_CHUNK)


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


def _parse_head(head: dict[str, Any]) -> tuple[int, str | None, list[tuple[str, str]], int | None]:
    """Status, reason, end-to-end headers and Content-Length of an OPEN_OK response head."""
    status = head.get("status")
    pairs = header_pairs(head.get("headers"))
    reason = head.get("reason")
    if not isinstance(status, int) or not 100 <= status <= 999 or pairs is None:
        raise UpstreamError("the agent sent an invalid response head")
    if not isinstance(reason, str) or "\r" in reason or "\n" in reason:
        reason = None
    headers: list[tuple[str, str]] = []
    length: int | None = None
    for name, value in pairs:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            continue
        if lname == "content-length":
            length = content_length(value)
            if length is None:
                raise UpstreamError("the agent sent an invalid Content-Length")
            continue
        headers.append((name, value))
    return status, reason or None, headers, length
