"""The admin listener: the admin API (csc/admin/api.py) and the web console
(csc/admin/console.py) on ``admin_listen``, TLS when the node has certificates; its URL is written
to ``<state-dir>/admin-url`` for ``csc admin`` and removed when the listener stops.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from csc.admin import console
from csc.admin.api import URL_FILE, create_admin_app
from csc.state import NodeState
from shared.oserrors import describe_os_error

log = logging.getLogger("csc.admin.listener")


def _url(sockname: Any, tls: bool) -> str:
    host, port = sockname[0], sockname[1]
    address = ipaddress.ip_address(host)
    if address.is_unspecified:  # bound to every address: reach it over loopback
        host = "::1" if address.version == 6 else "127.0.0.1"
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}"


@dataclass(eq=False)
class AdminListener:
    runner: web.AppRunner
    url: str
    address: str
    url_file: Path

    async def stop(self) -> None:
        await self.runner.cleanup()
        try:
            if self.url_file.read_text().strip() == self.url:
                self.url_file.unlink()
        except OSError:
            pass


async def start_listener(state: NodeState, ssl_ctx: ssl.SSLContext | None) -> AdminListener:
    """Serve the admin API on ``admin_listen``; its URL goes to ``<state-dir>/admin-url``."""
    listen = state.config.admin_listen_address
    assert listen is not None
    app = create_admin_app(state)
    console.mount(app)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, listen[0], listen[1], ssl_context=ssl_ctx).start()
    except OSError as exc:
        await runner.cleanup()
        reason = describe_os_error(exc, state.config.admin_listen)
        raise OSError(exc.errno, f"admin API: {reason}") from None
    sockname = runner.addresses[0]
    url = _url(sockname, ssl_ctx is not None)
    address = url.split("://", 1)[1]
    url_file = state.config.state_dir / URL_FILE
    url_file.write_text(url + "\n")
    if not ipaddress.ip_address(sockname[0]).is_loopback:
        log.warning("the admin API listens on %s, beyond loopback", state.config.admin_listen)
    log.info(
        "admin API on %s/v1/admin/ (URL in %s), web console on %s/console/", url, url_file, url
    )
    return AdminListener(runner, url, address, url_file)
