"""The read-only web console: ``/console/`` on the admin listener.

A static page (``csc/admin/static/``: HTML, one vanilla JavaScript file, CSS, an icon; no build step,
no external URL) that asks the operator for an operator token once, keeps it in the tab's
``sessionStorage`` and reads the admin API with ``Authorization: Bearer`` every 2 s: node
overview, tenants, aliases with their online state, sessions and the recent errors
(``GET /v1/admin/errors``). A 401 brings the token form back.

Invariants: the files carry no data, so they are served without a token (the admin API's
authentication skips exactly :func:`is_console_path`); only the files named in :data:`ASSETS`
are served, read once when the listener starts, so no part of a request path ever reaches the
filesystem; every response under ``/console`` (errors included) carries
:data:`SECURITY_HEADERS`: a strict Content-Security-Policy (``default-src 'self'``, no inline
script or style), ``nosniff``, ``no-store`` and no framing. The page inserts data with DOM APIs
and ``textContent`` only.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

PATH = "/console/"
INDEX = "index.html"

#: file name -> content type: everything the console serves
ASSETS: dict[str, str] = {
    INDEX: "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

_FILES: web.AppKey[dict[str, bytes]] = web.AppKey("csc_console_files")


class ConsoleAssetsMissing(RuntimeError):
    """The console's files are not where the package should have them (a broken install)."""


def is_console_path(path: str) -> bool:
    """Whether ``path`` belongs to the console (served without a token)."""
    return path == PATH.rstrip("/") or path.startswith(PATH)


def load_assets() -> dict[str, bytes]:
    """The console's files from the package's ``static`` directory."""
    folder = resources.files("csc.admin").joinpath("static")
    files: dict[str, bytes] = {}
    missing: list[str] = []
    for name in ASSETS:
        try:
            files[name] = folder.joinpath(name).read_bytes()
        except OSError:
            missing.append(name)
    if missing:
        raise ConsoleAssetsMissing(
            f"the web console's files are missing from the installed package: "
            f"{', '.join(missing)} (expected in {folder})"
        )
    return files


async def _redirect(request: web.Request) -> web.Response:
    return web.Response(status=301, headers={"Location": PATH})


async def _asset(request: web.Request) -> web.Response:
    name = request.match_info.get("name") or INDEX
    body = request.app[_FILES].get(name)
    if body is None:
        raise web.HTTPNotFound()
    return web.Response(body=body, headers={"Content-Type": ASSETS[name]})


async def _secure(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the security headers on every console response."""
    if is_console_path(request.path):
        response.headers.update(SECURITY_HEADERS)


def mount(app: web.Application, files: dict[str, bytes] | None = None) -> None:
    """Serve the console on ``app`` (the admin listener's application)."""
    app[_FILES] = load_assets() if files is None else files
    app.router.add_get(PATH.rstrip("/"), _redirect)
    app.router.add_get(PATH, _asset)
    app.router.add_get(PATH + "{name}", _asset)
    app.on_response_prepare.append(_secure)
