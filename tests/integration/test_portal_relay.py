"""The whole administrator-initiated flow with real processes: a portal behind a tenant agent,
reached by alias through the CSC; the bootloader zipapp downloaded from the portal's get site
through the tunnel, run with the portal's SMS, installs the user's package."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from portal.config import PortalConfig
from portal.db import Database
from portal.store import list_devices
from tests.support.portal import DEVICE, PASSWORD, portal_config, seed
from tests.support.procs import (
    REPO_ROOT,
    ProcFactory,
    child_env,
    http_request,
    issue_token,
    scaled,
    tunnel_url,
    wait_alias_online,
)

ALIAS = "acme@example.com"


def _start_portal(procs: ProcFactory, config: PortalConfig, tmp_path: Path) -> str:
    ready = tmp_path / "portal.ready.json"
    argv = [sys.executable, "-m", "portal", "serve", "--listen", "127.0.0.1:0"]
    proc = procs.spawn(
        "portal",
        [*argv, "--ready-file", str(ready)],
        env=_portal_env(config),
        ready_file=ready,
    )
    return f"http://{proc.ready['http']}"


def _portal_env(config: PortalConfig) -> dict[str, str]:
    return {
        "CSC_PORTAL_STATE_DIR": str(config.state_dir),
        "CSC_PORTAL_PASSWORD_HASH_COST": "test",
        "CSC_PORTAL_NAME": config.name,
    }


def test_bootloader_from_the_get_site_installs_through_the_csc(
    procs: ProcFactory, tmp_path: Path
) -> None:
    config = portal_config(tmp_path)
    seed(config)
    portal_url = _start_portal(procs, config, tmp_path)
    csc = procs.csc()
    token = issue_token(csc.state_dir, "acme", ALIAS)
    procs.agent(csc.http_url, token, portal_url)
    wait_alias_online(csc.http_url, ALIAS)

    get_url = tunnel_url(csc.http_url, ALIAS, "get/")
    status, _, page = http_request(get_url)
    assert status == 200 and b"android-arm64/" in page
    status, _, pyz = http_request(tunnel_url(csc.http_url, ALIAS, "get/csc-bootloader.pyz"))
    assert status == 200
    (tmp_path / "csc-bootloader.pyz").write_bytes(pyz)

    sms = subprocess.run(
        [sys.executable, "-m", "portal", "sms", "--user", "alice", "--alias", ALIAS],
        cwd=REPO_ROOT,
        env=child_env({**_portal_env(config), "CSC_PORTAL_GET_URL": get_url}),
        capture_output=True,
        text=True,
        timeout=scaled(30),
        check=True,
    ).stdout.strip()
    assert sms.startswith(f"Get the client: {get_url} then User: alice Alias: {ALIAS} cdzprov")

    target = tmp_path / "device"
    argv = [sys.executable, str(tmp_path / "csc-bootloader.pyz"), "--sms", sms]
    result = subprocess.run(
        [*argv, "--device-type", DEVICE, "--target", str(target), "--quiet"],
        cwd=tmp_path,
        env=child_env({"CSC_BOOTLOADER_CSC": csc.http_url, "CSC_BOOTLOADER_PASSWORD": PASSWORD}),
        capture_output=True,
        text=True,
        timeout=scaled(60),
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (target / "current" / "client" / "bin" / "run").read_bytes() == b"#!/bin/sh\necho 5.1\n"
    manifest = json.loads((target / "current" / ".csc" / "manifest.json").read_text())
    assert manifest["policies"] == {"sync-interval": "15m"}
    assert manifest["portal"]["name"] == "Acme Ltd"
    with Database(config.state_dir).connect() as conn:
        [device] = list_devices(conn)
    assert (device.user, device.device_type) == ("alice", DEVICE)
    assert device.last_package == target.joinpath("current").resolve().name
