"""The bootloader-facing API of the portal: ``v1/portal``, ``v1/logon``, ``v1/package/{id}``.

Exactly docs/provisioning.md. Invariants:

* Password verification (argon2) runs on the state's dedicated executor, planning and building
  packages and every database access on worker threads: the event loop never blocks.
* An unknown user costs one argon2 verification, like a wrong password, and both answer the same
  401 body (no user enumeration by content or timing).
* Request bodies are bounded in size and nesting depth before they are decoded
  (:mod:`portal.jsonbody`); every unacceptable body is a 400 ``bad_request``, never a 500.
* Before any verification, a user at a client address, or a client address, that is locked out
  (see :mod:`portal.throttle`) gets 429 with ``Retry-After``; each failure counts against both.
  A user locked out at one address can still log on from another.
* At most ``hash_workers + hash_queue`` logons verify or wait for the executor; beyond, 503
  ``busy`` with ``Retry-After`` before any work is done.
* A session ends when its user's password changes or the user is removed (the password epoch
  is checked on every download).
* A session grants only the package of its own logon; the package is streamed from disk in
  chunks (never read whole) with ``Content-Length``, ``ETag``, ``Accept-Ranges`` and single
  ``Range``/``If-Range`` support (:mod:`portal.ranges`).
* Neither passwords nor session tokens are ever logged.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from portal import store
from portal.blobs import CHUNK
from portal.catalog import PackagePlan
from portal.jsonbody import BadJson, check_text, parse_json_body
from portal.ranges import ByteRange, RangeNotSatisfiable, if_range_allows, parse_range
from portal.state import CLIENT, REQUEST_ID, STATE, ApiError, PortalState, user_address_key
from portal.throttle import retry_after_header

log = logging.getLogger(__name__)

MAX_FIELD = {"user": 128, "password": 1024, "device_type": 64, "device_id": 128}
#: A logon body is one flat object of short strings; anything bigger or deeper is refused.
MAX_LOGON_BODY = 8 * 1024
MAX_LOGON_DEPTH = 4
#: ``Retry-After`` (seconds) of a logon refused because the password checks are all taken.
RETRY_AFTER_BUSY = 1
API_VERSION = 1


async def portal_info(request: web.Request) -> web.Response:
    state = request.app[STATE]
    types = await asyncio.to_thread(state.device_type_names)
    return web.json_response(
        {
            "api": API_VERSION,
            "name": state.config.name,
            "key": state.key.public_b64,
            "fingerprint": state.key.fingerprint,
            "device_types": types,
        }
    )


# --- logon ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogonRequest:
    user: str
    password: str = field(repr=False)
    device_type: str
    device_id: str


@dataclass(frozen=True, slots=True)
class Authenticated:
    user_id: int
    epoch: int
    user: str
    device_type_id: int | None
    known_types: list[str]


async def _logon_request(request: web.Request) -> LogonRequest:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(400, "bad_request", "the request body is too large") from None
    try:
        data = parse_json_body(raw, max_bytes=MAX_LOGON_BODY, max_depth=MAX_LOGON_DEPTH)
        if not isinstance(data, dict):
            raise BadJson("the body must be a JSON object")
        values: dict[str, str] = {}
        for name, limit in MAX_FIELD.items():
            value = data.get(name)
            if not isinstance(value, str) or not value:
                raise BadJson(f"the field {name!r} is missing or not a string")
            if len(value) > limit:
                raise BadJson(f"the field {name!r} is longer than {limit}")
            values[name] = check_text(value, name, printable=name != "password")
    except BadJson as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    return LogonRequest(**values)


def authenticate(state: PortalState, req: LogonRequest) -> Authenticated | None:
    """Blocking (runs on the hashing executor): check the credentials, rehash if outdated."""
    with state.db.connect() as conn:
        creds = store.credentials(conn, req.user)
        if creds is None:
            state.passwords.verify_absent(req.password)
            return None
        verdict = state.passwords.verify(creds.password_hash, req.password)
        if not verdict.ok:
            return None
        if verdict.new_hash is not None:
            store.replace_password_hash(conn, creds.user_id, creds.password_hash, verdict.new_hash)
            log.info("rehashed the password of %s with the current parameters", creds.name)
        dtid = store.find_device_type(conn, req.device_type)
        known = [] if dtid is not None else [d.name for d in store.list_device_types(conn)]
    return Authenticated(creds.user_id, creds.epoch, creds.name, dtid, known)


def _check_throttle(state: PortalState, user_key: str, client: str) -> None:
    now = state.clock()
    waits = [
        w
        for w in (
            state.user_throttle.retry_after(user_address_key(user_key, client), now),
            state.address_throttle.retry_after(client, now),
        )
        if w is not None
    ]
    if waits:
        raise ApiError(
            429,
            "too_many_attempts",
            "too many failed logons; try again later",
            headers={"Retry-After": retry_after_header(max(waits))},
        )


def _record_failure(state: PortalState, user_key: str, client: str) -> None:
    now = state.clock()
    lockout = state.user_throttle.failure(user_address_key(user_key, client), now)
    if lockout is not None:
        log.warning("logon lockout of %.0f s for user %r from %s", lockout, user_key[:64], client)
    lockout = state.address_throttle.failure(client, now)
    if lockout is not None:
        log.warning("logon lockout of %.0f s for address %s", lockout, client)


async def _verify(state: PortalState, req: LogonRequest) -> Authenticated | None:
    """Run :func:`authenticate` on the hashing executor, if the queue has room (else 503)."""
    gate = state.hash_gate
    if not gate.try_enter():
        log.warning("logon refused: %d logons already verifying or waiting", gate.limit)
        raise ApiError(
            503,
            "busy",
            "the portal is busy checking passwords; try again shortly",
            headers={"Retry-After": str(RETRY_AFTER_BUSY)},
        )

    def run() -> Authenticated | None:
        try:
            return authenticate(state, req)
        finally:
            gate.leave()

    assert state.executor is not None
    future = state.executor.submit(run)
    # cancelled before it ran (shutdown): run() never leaves, so leave here
    future.add_done_callback(lambda f: gate.leave() if f.cancelled() else None)
    return await asyncio.wrap_future(future)


async def logon(request: web.Request) -> web.Response:
    state = request.app[STATE]
    req = await _logon_request(request)
    client = request[CLIENT]
    user_key = req.user.strip().lower()
    _check_throttle(state, user_key, client)
    auth = await _verify(state, req)
    if auth is None:
        _record_failure(state, user_key, client)
        log.info(
            "logon failed: user %r from %s",
            req.user[:64],
            client,
            extra={"request_id": request[REQUEST_ID]},
        )
        raise ApiError(401, "logon_failed", "the user name or the password is wrong")
    state.user_throttle.success(user_address_key(user_key, client))
    if auth.device_type_id is None:
        known = ", ".join(auth.known_types) or "none"
        raise ApiError(
            404, "unknown_device_type", f"no device type {req.device_type!r}; known: {known}"
        )
    body = await _open_session(request, state, auth, auth.device_type_id, req)
    return web.json_response(body, headers={"Cache-Control": "no-store"})


async def _open_session(
    request: web.Request,
    state: PortalState,
    auth: Authenticated,
    device_type_id: int,
    req: LogonRequest,
) -> dict[str, Any]:
    """Build (or find) the package, record the device, and start the session."""
    plan: PackagePlan = await asyncio.to_thread(state.plan, auth.user_id, device_type_id)
    info = await state.builder.ensure(plan)
    client = request[CLIENT]
    await asyncio.to_thread(
        state.record_device, auth.user_id, device_type_id, req.device_id, info.id, client
    )
    token = state.sessions.create(
        user_id=auth.user_id,
        epoch=auth.epoch,
        user=auth.user,
        device_type=plan.device_type,
        device_id=req.device_id,
        package_id=info.id,
        now=state.clock(),
    )
    log.info(
        "logon: %s on %s from %s, package %s",
        auth.user,
        plan.device_type,
        client,
        info.id,
        extra={"request_id": request[REQUEST_ID]},
    )
    return {"session": token, "expires_in": round(state.sessions.ttl), "package": info.to_json()}


# --- package download ----------------------------------------------------------------------


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _session_invalid() -> ApiError:
    return ApiError(
        401,
        "session_invalid",
        "the session is missing, unknown or expired: log on again",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _range_for(request: web.Request, size: int, etag: str) -> ByteRange | None:
    if not if_range_allows(request.headers.get("If-Range"), etag):
        return None
    try:
        return parse_range(request.headers.get("Range"), size)
    except RangeNotSatisfiable:
        raise ApiError(
            416,
            "range_not_satisfiable",
            f"the range lies beyond the end of the package ({size} bytes)",
            headers={"Content-Range": f"bytes */{size}", "Accept-Ranges": "bytes"},
        ) from None


async def package(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    token = _bearer(request)
    session = state.sessions.get(token, state.clock()) if token else None
    if session is None:
        raise _session_invalid()
    epoch = await asyncio.to_thread(state.password_epoch, session.user_id)
    if epoch != session.epoch:  # the password changed (or the user was removed) since the logon
        ended = state.sessions.end_user(session.user_id, keep_epoch=epoch)
        log.info("ended %d session(s) of %s: the password changed", ended, session.user)
        raise _session_invalid()
    package_id = request.match_info["id"]
    if package_id != session.package_id:
        raise ApiError(404, "unknown_package", "this session grants another package")
    path = state.builder.path_of(package_id)
    try:
        fh = await asyncio.to_thread(open, path, "rb")
    except OSError:
        raise ApiError(404, "unknown_package", "the package is gone: log on again") from None
    try:
        size = await asyncio.to_thread(lambda: path.stat().st_size)
        return await _send(request, fh, size, f'"{package_id}"')
    finally:
        fh.close()


async def _send(request: web.Request, fh: Any, size: int, etag: str) -> web.StreamResponse:
    wanted = _range_for(request, size, etag)
    span = wanted or ByteRange(0, size - 1)
    response = web.StreamResponse(status=200 if wanted is None else 206)
    response.content_type = "application/zip"
    response.content_length = span.length if size else 0
    response.headers["ETag"] = etag
    response.headers["Accept-Ranges"] = "bytes"
    response.headers["Cache-Control"] = "private, no-cache"
    if wanted is not None:
        response.headers["Content-Range"] = wanted.content_range(size)
    await response.prepare(request)
    if request.method == "HEAD" or not size:
        await response.write_eof()
        return response
    await asyncio.to_thread(fh.seek, span.start)
    remaining = span.length
    try:
        while remaining:
            chunk = await asyncio.to_thread(fh.read, min(CHUNK, remaining))
            if not chunk:  # the file shrank: the promised length cannot be kept
                raise RuntimeError(f"package file {fh.name} truncated while being sent")
            await response.write(chunk)
            remaining -= len(chunk)
        await response.write_eof()
    except ConnectionError:  # the client went away; aiohttp closes the connection
        log.info(
            "download interrupted with %d of %d bytes unsent",
            remaining,
            span.length,
            extra={"request_id": request[REQUEST_ID]},
        )
    return response
