"""``csc-portal serve``: the aiohttp app factory, the middleware, the get site and the listener.

:func:`create_app` wires the API of :mod:`portal.api`, ``GET /healthz`` and the get site
(:mod:`portal.getsite`) onto one application whose resources (the hashing executor, the package
builder, the housekeeping task, the bootloader zipapp) are paired start/stop in ``cleanup_ctx``.

Invariants of the middleware: every response carries ``X-Request-Id`` (the request's own when it
is sane, else a fresh one); every error is the JSON ``{"error", "message"}`` of
docs/provisioning.md (internal details go to the log only); each request is logged once with its
request id, client address, status and duration, but never its headers or body, so neither
passwords nor session tokens reach the log; a request aiohttp's parser refuses (400 before the
middleware) is one INFO line without traceback or request bytes. The client address is the rightmost
``X-Forwarded-For`` entry when the peer is a trusted proxy, else the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from portal import api, getsite
from portal.config import PortalConfig
from portal.state import (
    CLIENT,
    PREPARED,
    REQUEST_ID,
    STATE,
    ApiError,
    PortalState,
    build_state,
)
from shared import resolve_sig, runtime
from shared.peers import TrustedPeers

log = logging.getLogger("portal")

HOUSEKEEPING_INTERVAL = 60.0
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
_NAME = r"[a-z0-9][a-z0-9._-]{0,63}"
_HOST_RE = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")
#: bootloader variants kept, one per preset (CSC URL, key, CA)
MAX_PRESETS = 8
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _ClientErrorsOneLine(logging.Filter):
    """aiohttp logs a request its parser refuses (a header or URL over 8 KiB, a bad
    ``Content-Length`` or chunk size: the client's fault, answered 400 before any handler runs)
    with a traceback at ERROR. Make that one INFO line naming the error class only: the
    parser's message quotes the request's bytes, which may hold a token."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500:
            said = record.getMessage()
            record.msg = "%s: malformed HTTP request (%s, %d)"
            record.args = (said, type(exc).__name__, exc.code)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


#: aiohttp's connection-level log (the parser's refusals), one line per refused request
HTTP_LOG = logging.getLogger("portal.http")
HTTP_LOG.addFilter(_ClientErrorsOneLine())
#: what every ``AppRunner`` of the portal is given
RUNNER_OPTIONS: dict[str, Any] = {"access_log": None, "logger": HTTP_LOG}


def _peer_trusted(request: web.Request, trusted: TrustedPeers) -> bool:
    return (request.remote or "") in trusted


def client_address(request: web.Request, trusted: TrustedPeers) -> str:
    """The client: the rightmost ``X-Forwarded-For`` entry if the peer is trusted, else the peer."""
    peer = request.remote or ""
    try:
        ipaddress.ip_address(peer)
    except ValueError:
        return peer or "unknown"
    forwarded = request.headers.getall("X-Forwarded-For", [])
    if not forwarded or not _peer_trusted(request, trusted):
        return peer
    rightmost = forwarded[-1].split(",")[-1].strip()
    try:
        return str(ipaddress.ip_address(rightmost))
    except ValueError:
        return peer


def _json_error(exc: web.HTTPException) -> web.Response:
    code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
        exc.status, "bad_request" if exc.status < 500 else "internal"
    )
    body = json.dumps({"error": code, "message": (exc.reason or "error").lower()})
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "location")}
    return web.Response(
        status=exc.status, text=body, content_type="application/json", headers=headers
    )


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    supplied = request.headers.get("X-Request-Id", "")
    request[REQUEST_ID] = supplied if _REQUEST_ID_RE.fullmatch(supplied) else uuid.uuid4().hex
    request[CLIENT] = client_address(request, request.app[STATE].trusted)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        response = await handler(request)
    except ApiError as exc:
        response = exc.response()
    except web.HTTPException as exc:
        response = _json_error(exc)
    except Exception:
        if request.get(PREPARED):
            raise  # headers are out: aiohttp can only abort the connection
        log.exception("request failed", extra={"request_id": request[REQUEST_ID]})
        response = ApiError(500, "internal", "internal error; see the portal's log").response()
    elapsed = round((loop.time() - started) * 1000, 1)
    log.info(
        "%s %s -> %d",
        request.method,
        request.path,
        response.status,
        extra={
            "request_id": request[REQUEST_ID],
            "client": request[CLIENT],
            "status": response.status,
            "duration_ms": elapsed,
        },
    )
    return response


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    request[PREPARED] = True
    response.headers["X-Request-Id"] = request.get(REQUEST_ID) or uuid.uuid4().hex


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


# --- get site ------------------------------------------------------------------------------


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/html", charset="utf-8")


async def get_index(request: web.Request) -> web.Response:
    state = request.app[STATE]
    types = await asyncio.to_thread(state.device_types)
    return _html(getsite.render_index(state.config.name, state.key.fingerprint, types))


async def get_device_page(request: web.Request) -> web.Response:
    state = request.app[STATE]
    wanted = request.match_info["device_type"]
    types = await asyncio.to_thread(state.device_types)
    for dtype in types:
        if dtype.name == wanted:
            return _html(
                getsite.render_device_page(state.config.name, state.key.fingerprint, dtype)
            )
    page = getsite.render_index(state.config.name, state.key.fingerprint, types)
    return _html(page, status=404)


def csc_preset(request: web.Request, state: PortalState) -> dict[str, str] | None:
    """What the bootloader served to this request is preset with: the CSC the request came
    through (its tunnel adds ``X-Forwarded-Prefix: /t/{alias}``, ``X-Forwarded-Host`` and
    ``-Proto``, and ``X-CSC-Resolve-Key``; believed only from a trusted proxy), and the CA of
    ``csc_ca_file``. None when the request did not come through a CSC."""
    headers = request.headers
    host = headers.get("X-Forwarded-Host", "")
    if (
        not headers.get("X-Forwarded-Prefix", "").startswith("/t/")
        or _HOST_RE.fullmatch(host) is None
        or not _peer_trusted(request, state.trusted)
    ):
        return None
    proto = headers.get("X-Forwarded-Proto", "").lower()
    preset = {"csc": f"{proto if proto in ('http', 'https') else 'https'}://{host}"}
    key = headers.get("X-CSC-Resolve-Key", "").strip()
    if key and resolve_sig.parse_public_key(key) is not None:
        preset["csc_key"] = key
    if state.csc_ca:
        preset["csc_ca"] = state.csc_ca
    return preset


async def _preset_pyz(state: PortalState, preset: dict[str, str]) -> bytes:
    cache_key = json.dumps(preset, sort_keys=True)
    found = state.pyz_presets.get(cache_key)
    if found is None:
        assert state.pyz_entries is not None
        found = await asyncio.to_thread(getsite.pyz_from_entries, state.pyz_entries, preset)
        while len(state.pyz_presets) >= MAX_PRESETS:  # oldest first
            state.pyz_presets.pop(next(iter(state.pyz_presets)))
        state.pyz_presets[cache_key] = found
    return found


async def get_pyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.pyz is None:
        raise ApiError(503, "bootloader_unavailable", state.pyz_error)
    preset = csc_preset(request, state)
    return web.Response(
        body=state.pyz if preset is None else await _preset_pyz(state, preset),
        content_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{getsite.PYZ_NAME}"'},
    )


async def redirect_slash(request: web.Request) -> web.Response:
    # relative, so it also works under the CSC's /t/{alias}/ prefix
    last = request.path.rstrip("/").rsplit("/", 1)[-1]
    return web.Response(status=301, headers={"Location": f"{last}/"})


# --- resources -----------------------------------------------------------------------------


async def _executor_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    state.executor = ThreadPoolExecutor(
        max_workers=state.config.hash_workers, thread_name_prefix="portal-hash"
    )
    yield
    await asyncio.to_thread(state.executor.shutdown, wait=True, cancel_futures=True)


async def _builder_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[STATE].builder.close()


def _bootloader_ctx(
    bootloader_dir: Path | None,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        state = app[STATE]
        try:
            entries = await asyncio.to_thread(getsite.bootloader_entries, bootloader_dir)
            if state.config.csc_ca_file is not None:
                state.csc_ca = await asyncio.to_thread(_read_ca, state.config.csc_ca_file)
            state.pyz_entries = entries
            state.pyz = getsite.pyz_from_entries(entries, None)
        except getsite.BootloaderUnavailable as exc:
            state.pyz_error = "the bootloader download is unavailable; see the portal's log"
            log.error("the bootloader download is unavailable: %s", exc)
        yield

    return ctx


def _read_ca(path: Path) -> str:
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise getsite.BootloaderUnavailable(f"csc_ca_file {path}: {exc}") from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise getsite.BootloaderUnavailable(f"csc_ca_file {path}: no PEM certificate in it")
    return text


async def _housekeeping_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]

    async def run() -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            now = state.clock()
            state.sessions.prune(now)
            state.user_throttle.prune(now)
            state.address_throttle.prune(now)

    task = asyncio.create_task(run(), name="portal-housekeeping")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(
    config: PortalConfig, *, state: PortalState | None = None, bootloader_dir: Path | None = None
) -> web.Application:
    """The portal application; ``state`` defaults to :func:`portal.state.build_state`."""
    app = web.Application(client_max_size=64 * 1024, middlewares=[request_middleware])
    app[STATE] = state if state is not None else build_state(config)[0]
    app.on_response_prepare.append(_on_prepare)
    for ctx in (_executor_ctx, _builder_ctx, _bootloader_ctx(bootloader_dir), _housekeeping_ctx):
        app.cleanup_ctx.append(ctx)
    router = app.router
    router.add_get("/v1/portal", api.portal_info)
    router.add_post("/v1/logon", api.logon)
    router.add_get(r"/v1/package/{id:[0-9a-f]{64}}", api.package)
    router.add_get("/healthz", healthz)
    router.add_get("/get", redirect_slash)
    router.add_get("/get/", get_index)
    router.add_get(f"/get/{getsite.PYZ_NAME}", get_pyz)
    router.add_get(f"/get/{{device_type:{_NAME}}}", redirect_slash)
    router.add_get(f"/get/{{device_type:{_NAME}}}/", get_device_page)
    return app


# --- running -------------------------------------------------------------------------------


async def run_portal(
    config: PortalConfig,
    state: PortalState,
    ready_file: Path | None,
    bootloader_dir: Path | None = None,
) -> int:
    stop = runtime.stop_event()
    app = create_app(config, state=state, bootloader_dir=bootloader_dir)
    runner = web.AppRunner(app, shutdown_timeout=5.0, **RUNNER_OPTIONS)
    await runner.setup()
    try:
        host, port = config.listen_address
        site = web.TCPSite(runner, host, port, backlog=512)
        await site.start()
        address = runtime.sockname_address(runner.addresses[0])
        log.info(
            "listening on http://%s, state dir %s, key %s",
            address,
            config.state_dir,
            state.key.fingerprint,
        )
        if ready_file is not None:
            runtime.write_ready_file(ready_file, {"http": address, "pid": os.getpid()})
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()
    return 0


def serve(
    config: PortalConfig,
    state: PortalState,
    *,
    ready_file: Path | None = None,
    bootloader_dir: Path | None = None,
) -> int:
    """Run the portal until SIGTERM/SIGINT; raises OSError when it cannot listen."""
    return runtime.run(run_portal(config, state, ready_file, bootloader_dir))
