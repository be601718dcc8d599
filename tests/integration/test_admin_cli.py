"""``csc admin`` against a running node: a tenant lifecycle through the CLI in process (with a
real agent), and the real processes: the agent stops (exit 3) when its token is revoked, and
``csc admin drain`` stops the node."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import trustme

from csc.cli import main
from tests.support.admin import resolve
from tests.support.inproc import Relay, relay, start_agent, wait_online
from tests.support.procs import (
    REPO_ROOT,
    ProcFactory,
    UpstreamProc,
    async_wait_until,
    child_env,
    scaled,
    wait_until,
)

ALIAS = "gamma@example.com"


class Cli:
    """Runs ``csc admin ...`` in a worker thread (the node runs on this test's loop)."""

    def __init__(self, r: Relay, capsys: pytest.CaptureFixture[str]) -> None:
        self.state_dir = str(r.state_dir)
        self.capsys = capsys

    async def run(self, *argv: str, expect: int = 0) -> tuple[str, str]:
        self.capsys.readouterr()
        full = ["admin", *argv, "--state-dir", self.state_dir]
        code = await asyncio.to_thread(main, full, env={})
        out, err = self.capsys.readouterr()
        assert code == expect, (argv, code, out, err)
        return out, err

    async def json(self, *argv: str) -> Any:
        out, _ = await self.run(*argv, "--json")
        return json.loads(out)


def _jti(token: str) -> str:
    claims = jwt.decode(token, options={"verify_signature": False})
    jti: str = claims["jti"]
    return jti


async def test_tenant_lifecycle_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        cli = Cli(r, capsys)
        out, _ = await cli.run(
            "tenants", "create", "gamma", "--name", "Gamma GmbH", "--contact", "+49 30 1234"
        )
        assert "created tenant gamma" in out and "contact   +49 30 1234" in out
        out, _ = await cli.run("tenants", "list")
        lines = out.splitlines()
        assert lines[0].split() == ["TENANT", "NAME", "STATE", "ALIASES", "SESSIONS", "CONTACT"]
        assert lines[2].split()[:3] == ["gamma", "Gamma", "GmbH"]
        await cli.run("aliases", "assign", "gamma", ALIAS, "*@gamma.example")
        _, err = await cli.run("aliases", "assign", "gamma", "acme@example.com", expect=1)
        assert "'acme@example.com' belongs to tenant 'acme'" in err and "alias_taken" in err
        out, err = await cli.run("tokens", "issue", "gamma", "--alias", ALIAS, "--ttl", "1h")
        token = out.strip()
        assert token.count(".") == 2 and "\n" not in token and "for tenant 'gamma'" in err
        _, err = await cli.run("tokens", "issue", "gamma", "--alias", "x@example.com", expect=1)
        assert "'x@example.com' is not assigned to tenant 'gamma'" in err
        await _live_then_revoked(cli, r, http, token)
        await _suspend_update_delete(cli, r, http)
        out, _ = await cli.run("audit", "--limit", "30")
        assert out.splitlines()[0].split()[:6] == [
            "ID",
            "TIME",
            "OPERATOR",
            "REMOTE",
            "ACTION",
            "TARGET",
        ]
        assert "tenant.delete" in out.splitlines()[1] and "token.revoke" in out


async def _live_then_revoked(cli: Cli, r: Relay, http: aiohttp.ClientSession, token: str) -> None:
    r.token = token
    await start_agent(r, sessions=2)
    await wait_online(r.csc_url, ALIAS)
    await async_wait_until(
        lambda: len([s for s in r.node.state.sessions.values() if s.tenant == "gamma"]) == 2,
        10,
        message="two gamma sessions",
    )
    sessions = (await cli.json("sessions", "list", "--tenant", "gamma"))["sessions"]
    assert len(sessions) == 2 and {s["aliases"][0] for s in sessions} == {ALIAS}
    out, _ = await cli.run("sessions", "list")
    assert out.splitlines()[0].split()[:4] == ["SESSION", "TENANT", "ALIASES", "REMOTE"]
    assert sum(" gamma " in line for line in out.splitlines()) == 2
    out, _ = await cli.run("tokens", "list", "--tenant", "gamma")
    assert _jti(token) in out and "active" in out
    out, _ = await cli.run("tokens", "revoke", _jti(token))
    assert "2 sessions closed" in out
    assert r.agent_task is not None
    assert await asyncio.wait_for(r.agent_task, scaled(5)) == 3
    r.agent = r.agent_task = None
    status, body, _ = await resolve(http, r, ALIAS)
    assert (status, body["tenant"]["contact"]) == (503, "+49 30 1234")


async def _suspend_update_delete(cli: Cli, r: Relay, http: aiohttp.ClientSession) -> None:
    out, _ = await cli.run("tenants", "suspend", "gamma")
    assert out.strip() == "tenant gamma is suspended (0 sessions closed)"
    status, body, _ = await resolve(http, r, ALIAS)
    assert (status, body["error"]) == (503, "tenant_suspended")
    await cli.run("tenants", "resume", "gamma")
    await cli.run("tenants", "update", "gamma", expect=2)
    out, _ = await cli.run("tenants", "update", "gamma", "--max-streams", "10")
    assert "limits    streams=10" in out
    shown = await cli.json("tenants", "show", "gamma")
    assert shown["limits"]["max_streams"] == 10 and shown["tokens"][0]["status"] == "revoked"
    await cli.run("tenants", "update", "gamma", "--max-streams", "none")
    out, _ = await cli.run("aliases", "list", "--tenant", "gamma")
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["*@gamma.example", ALIAS]
    await cli.run("aliases", "unassign", "gamma", "*@gamma.example")
    _, err = await cli.run("tenants", "delete", "gamma", expect=1)
    assert "still has aliases gamma@example.com" in err
    out, _ = await cli.run("tenants", "delete", "gamma", "--cascade")
    assert out.startswith("deleted tenant gamma: aliases freed: gamma@example.com")
    _, err = await cli.run("tenants", "show", "gamma", expect=1)
    assert "no tenant 'gamma' (not_found, HTTP 404)" in err
    wrong = Path(cli.state_dir).parent / "wrong-token"
    wrong.write_text("nope\n")
    _, err = await cli.run("tenants", "list", "--token-file", str(wrong), expect=1)
    assert "unknown operator token (auth_failed, HTTP 401)" in err


def _admin(state_dir: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "csc", "admin", *argv, "--state-dir", str(state_dir)],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=scaled(30),
        check=False,
    )


def test_revoked_agent_exits_3_and_drain_stops_the_node(
    procs: ProcFactory, upstream_proc: UpstreamProc
) -> None:
    r = procs.relay(upstream_proc, sessions=2)
    assert r.agent is not None
    revoked = _admin(r.csc.state_dir, "tokens", "revoke", _jti(r.token))
    assert revoked.returncode == 0, revoked.stderr
    assert "2 sessions closed" in revoked.stdout
    assert r.agent.wait(10) == 3
    _, agent_err = r.agent.logs()
    assert "4401" in agent_err and "token revoked" in agent_err, agent_err
    listed = _admin(r.csc.state_dir, "sessions", "list", "--json")
    assert json.loads(listed.stdout)["sessions"] == []
    drained = _admin(r.csc.state_dir, "drain")
    assert drained.returncode == 0, drained.stderr
    assert "is draining" in drained.stdout
    assert r.csc.wait(20) == 0
    wait_until(lambda: not (r.csc.state_dir / "admin-url").exists(), 5, message="url removed")


async def test_admin_api_over_tls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    tls = {"tls_cert": cert_file, "tls_key": key_file}
    async with relay(tmp_path, start=False, csc=tls) as r:
        assert (r.state_dir / "admin-url").read_text().startswith("https://127.0.0.1:")
        cli = Cli(r, capsys)
        out, _ = await cli.run("tenants", "list", "--ca-file", str(ca_file))
        assert out.splitlines()[1].startswith("acme ")
        _, err = await cli.run("tenants", "list", expect=1)  # the system CAs do not know it
        assert "CERTIFICATE_VERIFY_FAILED" in err


async def test_cli_words_unknown_ids_swapped_arguments_plurals_and_headings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown jti is an error (404, exit 1) unless ``--unrecorded``;
    ``aliases assign ALIAS TENANT`` says the arguments look swapped; counts read "1 session";
    ``tenants show`` heads its tables; a tenant with aliases names ``--cascade``."""
    async with relay(tmp_path, start=False) as r:
        cli = Cli(r, capsys)
        _, err = await cli.run("tokens", "revoke", "no-such-jti", expect=1)
        assert "no token 'no-such-jti'" in err and "HTTP 404" in err
        out, _ = await cli.run("tokens", "revoke", "no-such-jti", "--unrecorded")
        assert "not in this CSC's records" in out and "0 sessions closed" in out
        await cli.run("tenants", "create", "gamma")
        _, err = await cli.run("aliases", "assign", ALIAS, "gamma", expect=2)
        assert "look swapped" in err and f"aliases assign gamma {ALIAS}" in err
        _, err = await cli.run("aliases", "unassign", ALIAS, "gamma", expect=2)
        assert "look swapped" in err
        await cli.run("aliases", "assign", "gamma", ALIAS)
        token, _ = await cli.run("tokens", "issue", "gamma", "--alias", ALIAS)
        out, _ = await cli.run("tenants", "show", "gamma")
        assert "\n\nTokens (1)\nJTI " in out and "\n\nLive sessions (0)\n" in out
        _, err = await cli.run("tenants", "delete", "gamma", expect=1)
        assert "--cascade" in err
        out, _ = await cli.run("tenants", "delete", "gamma", "--cascade")
        assert "1 token revoked; 0 sessions closed" in out and "1 tokens" not in out
        audit = await cli.json("audit")
        assert all(isinstance(e["at"], str) and e["at"].endswith("Z") for e in audit["entries"])
        assert _jti(token.strip()) in json.dumps(audit)
