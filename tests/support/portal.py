"""Helpers for the portal's tests: a fast configuration, seeded data and a running server.

:func:`portal_config` uses the ``test`` password hash profile (fast argon2id) and a state
directory under the test's ``tmp_path``; :func:`seed` fills it through the same functions the CLI
uses; :func:`running_portal` serves the app on 127.0.0.1 port 0 and yields its base URL.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from portal import catalog, store
from portal.blobs import BlobStore, collect_files
from portal.config import PortalConfig
from portal.db import Database
from portal.passwords import Passwords
from portal.server import RUNNER_OPTIONS, create_app
from portal.state import PortalState, build_state

PASSWORD = "correct horse"
DEVICE = "android-arm64"
OTHER_DEVICE = "win-x64"


def portal_config(tmp_path: Path, **over: Any) -> PortalConfig:
    values: dict[str, Any] = {
        "state_dir": tmp_path / "portal-state",
        "password_hash_cost": "test",
        "name": "Acme Ltd",
        "listen": "127.0.0.1:0",
        **over,
    }
    return PortalConfig(**values)


def add_app(
    db: Database,
    state_dir: Path,
    name: str,
    version: str,
    device_type: str,
    files: dict[str, bytes],
) -> None:
    """Write ``files`` (relative path -> content) to disk and add them as an app version."""
    source = state_dir.parent / "sources" / f"{name}-{version}-{device_type}"
    for rel, content in files.items():
        path = source / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    blobs = BlobStore(state_dir / "blobs")
    entries = []
    for src in collect_files(name, [source]):
        sha256, size = blobs.put_file(src.source)
        entries.append(catalog.FileEntry(src.package_path, sha256, size, src.mode))
    with db.connect() as conn:
        catalog.add_app_version(conn, name, version, device_type, entries)


def seed(config: PortalConfig) -> Database:
    """Device types, users alice (group field) and bob, app client, policy base (to field)."""
    db = Database(config.state_dir)
    db.open()
    hashed = Passwords(config.password_hash_cost).hash(PASSWORD)
    with db.connect() as conn:
        for dtype in (DEVICE, OTHER_DEVICE):
            store.add_device_type(conn, dtype)
        store.add_group(conn, "field")
        store.add_user(conn, "alice", hashed, ["field"])
        store.add_user(conn, "bob", hashed)
    add_app(db, config.state_dir, "client", "5.1.0", DEVICE, {"bin/run": b"#!/bin/sh\necho 5.1\n"})
    add_app(db, config.state_dir, "client", "5.0.0", OTHER_DEVICE, {"run.exe": b"MZ 5.0"})
    with db.connect() as conn:
        catalog.set_policy(conn, "base", {"sync-interval": "15m"})
        catalog.deploy(conn, "app", "client", "group", "field")
        catalog.deploy(conn, "policy", "base", "group", "field")
        catalog.deploy(conn, "app", "client", "user", "bob")
    return db


def fake_bootloader(root: Path, message: str = "fake bootloader") -> Path:
    """A minimal ``bootloader`` package whose ``cli.main`` prints ``message``."""
    pkg = root / "bootloader"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text('"""A stand-in bootloader."""\n')
    (pkg / "cli.py").write_text(
        "from shared.aliases import normalise_alias\n\n\n"
        "def main() -> int:\n"
        f"    print({message!r}, normalise_alias('ACME@Example.com'))\n"
        "    return 0\n"
    )
    return pkg


@dataclasses.dataclass
class RunningPortal:
    url: str
    state: PortalState
    app: web.Application


@contextlib.asynccontextmanager
async def running_portal(
    config: PortalConfig, *, state: PortalState | None = None, bootloader_dir: Path | None = None
) -> AsyncIterator[RunningPortal]:
    """Serve the portal on 127.0.0.1 port 0 for the duration of the block."""
    if state is None:
        state, _ = build_state(config)
    app = create_app(config, state=state, bootloader_dir=bootloader_dir)
    runner = web.AppRunner(app, **RUNNER_OPTIONS)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield RunningPortal(f"http://{host}:{port}", state, app)
    finally:
        await runner.cleanup()


def logon_body(user: str = "alice", password: Any = PASSWORD, **over: Any) -> dict[str, Any]:
    """A ``/v1/logon`` body for the seeded catalog (fields in ``over`` replace or add)."""
    return {"user": user, "password": password, "device_type": DEVICE, "device_id": "dev-1", **over}


async def post_logon(
    http: aiohttp.ClientSession, portal: RunningPortal, body: Any, **headers: str
) -> tuple[int, CIMultiDict[str], Any]:
    """POST ``body`` to ``/v1/logon`` (raw when bytes or text, else as JSON): status, headers,
    the JSON answer."""
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes | str) else {"json": body}
    async with http.post(f"{portal.url}/v1/logon", headers=headers, **kwargs) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.json()
