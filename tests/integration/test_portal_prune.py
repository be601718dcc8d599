"""``csc-portal prune`` next to a running portal: the packages and blobs of removed app versions
go, whatever the current catalog or a live session still uses stays, and the portal keeps
serving."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from portal import catalog, cli
from portal.config import PortalConfig
from portal.db import Database
from tests.support.portal import (
    DEVICE,
    PASSWORD,
    RunningPortal,
    add_app,
    portal_config,
    running_portal,
    seed,
)

OLD = {"bin/run": b"#!/bin/sh\necho 5.1\n"}  # the seeded 5.1.0
SHARED = b"shared by 5.1.1 and 5.2.0"


@pytest.fixture
def config(tmp_path: Path) -> PortalConfig:
    cfg = portal_config(tmp_path)
    seed(cfg)
    return cfg


@pytest.fixture
async def portal(config: PortalConfig) -> AsyncIterator[RunningPortal]:
    async with running_portal(config) as running:
        yield running


def _prune(config: PortalConfig, *argv: str) -> tuple[int, str, str]:
    env = {
        "CSC_PORTAL_STATE_DIR": str(config.state_dir),
        "CSC_PORTAL_PASSWORD_HASH_COST": "test",
        "CSC_PORTAL_NAME": config.name,
    }
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["prune", *argv], env=env)
    return code, out.getvalue(), err.getvalue()


async def _logon(
    http: aiohttp.ClientSession, portal: RunningPortal, user: str, device_id: str
) -> dict[str, Any]:
    body = {"user": user, "password": PASSWORD, "device_type": DEVICE, "device_id": device_id}
    async with http.post(f"{portal.url}/v1/logon", json=body) as resp:
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = await resp.json()
        return data


async def _download(http: aiohttp.ClientSession, portal: RunningPortal, logon: Any) -> int:
    headers = {"Authorization": f"Bearer {logon['session']}"}
    async with http.get(f"{portal.url}/{logon['package']['url']}", headers=headers) as resp:
        await resp.read()
        return resp.status


async def test_prune_deletes_only_what_nothing_uses(
    portal: RunningPortal, config: PortalConfig
) -> None:
    db = Database(config.state_dir)
    state_dir = config.state_dir
    blobs = state_dir / "blobs"
    add_app(db, state_dir, "client", "5.1.1", DEVICE, {"bin/run": b"5.1.1", "lib/c": SHARED})
    async with aiohttp.ClientSession() as http:
        old_alice = await _logon(http, portal, "alice", "phone")
        old_bob = await _logon(http, portal, "bob", "tablet")  # same catalog, another package
        add_app(db, state_dir, "client", "5.2.0", DEVICE, {"bin/run": b"5.2.0", "lib/c": SHARED})
        new_alice = await _logon(http, portal, "alice", "phone")  # the device moves on
        assert new_alice["package"]["id"] != old_alice["package"]["id"]
        with db.connect() as conn:
            catalog.remove_app(conn, "client", "5.1.1")
            catalog.remove_app(conn, "client", "5.1.0")
        stray = blobs / ("ab" * 32)
        stray.write_bytes(b"an app add in progress")
        before = {p.name for p in blobs.iterdir()}

        code, out, err = _prune(config, "--dry-run", "--min-age", "0", "--json")
        assert code == 0, err
        planned = json.loads(out)
        assert {p.name for p in blobs.iterdir()} == before  # a dry run deletes nothing

        code, _, err = _prune(config)  # default min age: the young stray blob stays
        assert code == 0, err
        assert stray.exists()
        code, out, err = _prune(config, "--min-age", "0", "--json")
        assert code == 0, err
        report = json.loads(out)
        assert report == planned

        packages = state_dir / "packages"
        assert not (packages / f"{old_alice['package']['id']}.zip").exists()
        assert (packages / f"{new_alice['package']['id']}.zip").exists()
        # bob's session may still be downloading his (outdated) package: it stays
        assert (packages / f"{old_bob['package']['id']}.zip").exists()
        assert report["packages"] == [f"{old_alice['package']['id']}.zip"]
        gone = {p for p in before if not (blobs / p).exists()}
        assert gone == set(report["blobs"]) and stray.name in gone
        assert len(gone) == 3  # 5.1.0's and 5.1.1's own bin/run, and the stray
        with db.connect() as conn:
            used = {r[0] for r in conn.execute("SELECT sha256 FROM app_files")}
        assert used <= {p.name for p in blobs.iterdir()}  # never a blob still in use

        assert await _download(http, portal, new_alice) == 200
        assert await _download(http, portal, old_bob) == 200
        again = await _logon(http, portal, "bob", "tablet")
        assert await _download(http, portal, again) == 200
        code, out, err = _prune(config, "--min-age", "0", "--json")
        assert json.loads(out)["blobs"] == []


def test_storing_a_blob_again_makes_it_young(config: PortalConfig, tmp_path: Path) -> None:
    db = Database(config.state_dir)
    blob_dir = config.state_dir / "blobs"
    add_app(db, config.state_dir, "tool", "1.0", DEVICE, {"t": b"tool"})
    [blob] = [p for p in blob_dir.iterdir() if p.read_bytes() == b"tool"]
    os.utime(blob, (1, 1))
    with db.connect() as conn:
        catalog.remove_app(conn, "tool")
    add_app(db, config.state_dir, "tool2", "1.0", DEVICE, {"t": b"tool"})
    assert blob.stat().st_mtime > 1
