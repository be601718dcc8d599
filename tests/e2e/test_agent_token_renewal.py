"""Renewing an agent's token without a restart, with real processes: ``csc serve``, the test
upstream and ``csc-agent --token-file``. A new token written to the file and a SIGHUP make the
agent replace both its sessions (make-before-break); the old token is then revoked with
``csc admin tokens revoke``; a steady load of requests through the tunnel sees no failure
throughout, and the agent keeps running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jwt

from tests.support.procs import (
    REPO_ROOT,
    ProcFactory,
    UpstreamProc,
    child_env,
    http_request,
    issue_token,
    scaled,
    tunnel_url,
    wait_alias_online,
    wait_until,
)

TENANT, ALIAS = "acme", "acme@example.com"


class _Load(threading.Thread):
    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.ok = 0
        self.failures: list[object] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            status, _, body = http_request(self.url, timeout=10)
            if status == 200 and len(body) == 1024:
                self.ok += 1
            else:
                self.failures.append((status, body[:200]))
            time.sleep(0.01)


def _write(path: Path, token: str) -> None:
    fresh = path.with_suffix(".new")
    fresh.write_text(token + "\n")
    os.replace(fresh, path)


def test_sighup_renews_the_token_and_revoking_the_old_one_cuts_nothing(
    procs: ProcFactory, upstream_proc: UpstreamProc, tmp_path: Path
) -> None:
    csc = procs.csc()
    old = issue_token(csc.state_dir, TENANT, ALIAS)
    token_file = tmp_path / "agent-token"
    _write(token_file, old)
    argv = [sys.executable, "-m", "tenant_agent", "--csc", csc.http_url]
    argv += ["--token-file", str(token_file), "--upstream", upstream_proc.http_url]
    agent = procs.spawn("agent", [*argv, "--sessions", "2"])
    wait_alias_online(csc.http_url, ALIAS)
    load = _Load(tunnel_url(csc.http_url, ALIAS, "/small"))
    load.start()
    try:
        wait_until(lambda: load.ok > 10, 10, message="requests flowing")
        new = issue_token(csc.state_dir, TENANT, ALIAS)
        _write(token_file, new)
        os.kill(agent.pid, signal.SIGHUP)
        wait_until(
            lambda: agent.logs()[1].count("renewed on node") == 2,
            20,
            message="both sessions renewed",
        )
        jti = jwt.decode(old, options={"verify_signature": False})["jti"]
        revoke = [sys.executable, "-m", "csc", "admin", "--state-dir", str(csc.state_dir)]
        revoke += ["tokens", "revoke", jti]
        done = subprocess.run(
            revoke, cwd=REPO_ROOT, env=child_env(None), capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        before = load.ok
        time.sleep(scaled(3))  # past the node's registry_refresh (2 s)
        assert load.ok > before
    finally:
        load.done.set()
        load.join(scaled(15))
    assert load.failures == [], load.failures[:5]
    assert agent.running, agent.logs()[1]
    err = agent.logs()[1]
    assert "holds a new token" in err and "the CSC took the new agent token" in err
    assert new not in err and old not in err  # never a token in the log
