"""No secret in any log line of a full run, every process at ``log_level = debug``.

Real processes: ``csc serve``; ``csc admin`` with the operator token (creates the tenant, its
alias and the agent token, later revokes it; one call with a wrong operator token);
``csc-agent`` with ``--token-file``; ``csc-portal serve`` with users whose passwords are known;
``csc-agent proxy`` in front of the portal; ``csc-bootloader`` provisioning through the alias
and through the proxy (password in ``CSC_BOOTLOADER_PASSWORD``), plus a logon with a wrong
password and requests with a credential in their query string; then the token is revoked (the agent stops) and an agent tries again with it.

Every line of every process's stdout and stderr is then searched for the agent token (and its
signature alone), the operator tokens, the portal session tokens the bootloaders received and
every password (and that query-string credential), as they are and base64-, URL- and
JSON-encoded, and for ``[redacted]``, which would mean a secret reached a log call. The one exception is the
stdout of ``csc admin tokens issue``, whose purpose is to print the new token. The logs must
also hold what they are for: one access-log event per tunneled request with a request id that
the agent and the portal logged too.
"""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.catalog import PASSWORDS, seed_portal
from tests.support.mitm import Mitm
from tests.support.procs import (
    REPO_ROOT,
    CscProc,
    Proc,
    ProcFactory,
    child_env,
    flag_args,
    http_request,
    scaled,
    tunnel_url,
    wait_alias_online,
)
from tests.support.stack import (
    ALIAS,
    TENANT,
    BootRun,
    portal_env,
    run_bootloader,
    spawn_dmz_proxy,
    spawn_portal,
)

WRONG_PASSWORD = "wrong pass/wörd+%=?"
WRONG_OPERATOR_TOKEN = "not-the-operator-token-4f1c2b9e"
QUERY_SECRET = "query-credential-7d0e5a"
DEVICE = "android-arm64"
REDACTED = "[redacted]"  # what shared/logsetup.py writes instead of a token-shaped string


@dataclass
class Outputs:
    """Everything the processes wrote that is not a log file of the ProcFactory."""

    texts: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, text: str) -> None:
        self.texts[f"{name}-{len(self.texts)}"] = text


def encoded_forms(secret: str) -> set[str]:
    """``secret`` as it is and as base64 (standard and URL-safe, at each alignment inside a
    longer encoding), URL-encoded and JSON-escaped."""
    raw = secret.encode()
    forms = {
        secret,
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote_plus(secret),
        json.dumps(secret)[1:-1],
    }
    for shift in range(3):
        encoded = base64.b64encode(bytes(shift) + raw).decode()
        core = encoded[math.ceil(shift * 8 / 6) : (shift + len(raw)) * 8 // 6]
        forms |= {core, core.replace("+", "-").replace("/", "_")}
    return {form for form in forms if len(form) >= 8}


def csc_admin(
    csc: CscProc,
    outputs: Outputs,
    *args: str,
    env: dict[str, str] | None = None,
    prints_token: bool = False,
) -> subprocess.CompletedProcess[str]:
    """``csc admin --state-dir STATE ARGS``: its stderr, and its stdout unless it is there to
    print a new token, are checked too."""
    argv = [sys.executable, "-m", "csc", "admin", "--state-dir", str(csc.state_dir), *args]
    done = subprocess.run(
        argv,
        cwd=REPO_ROOT,
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=scaled(60),
        check=False,
    )
    if not prints_token:
        outputs.add("csc-admin-stdout", done.stdout)
    outputs.add("csc-admin-stderr", done.stderr)
    return done


def bootloader(outputs: Outputs, args: Sequence[str], target: Path, password: str) -> BootRun:
    run = run_bootloader([*args, "--device-type", DEVICE], target, password=password)
    outputs.add("bootloader-stdout", run.out)
    outputs.add("bootloader-stderr", run.err)
    return run


def session_tokens(mitm: Mitm) -> set[str]:
    """The portal session tokens the bootloaders sent through ``mitm``."""
    found = set()
    for exchange in mitm.exchanges():
        scheme, _, token = exchange.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token:
            found.add(token)
    return found


def start_agent(procs: ProcFactory, csc: CscProc, token_file: Path, upstream: str) -> Proc:
    argv = [sys.executable, "-m", "tenant_agent"]
    argv += flag_args({"csc": csc.http_url, "token_file": token_file, "upstream": upstream})
    argv += flag_args({"sessions": 1, "log_level": "debug"})
    return procs.spawn("agent", argv, env={"CSC_AGENT_BACKOFF_MAX": "1s"})


def log_lines(log_dir: Path, outputs: Outputs) -> Iterator[tuple[str, str]]:
    """(source, line) for every line of every log file and captured output."""
    for path in sorted(log_dir.glob("*.log")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            yield path.name, line
    for name, text in outputs.texts.items():
        for line in text.splitlines():
            yield name, line


def json_events(log_dir: Path, prefix: str) -> list[dict[str, Any]]:
    """The JSON log events on the stderr of the processes named ``prefix-*``."""
    events = []
    for path in sorted(log_dir.glob(f"{prefix}-*.stderr.log")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("{"):
                events.append(json.loads(line))
    return events


@pytest.fixture
def procs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProcFactory]:
    factory = ProcFactory(tmp_path)
    failed = request.session.testsfailed
    try:
        yield factory
    finally:
        factory.stop_all()
        if request.session.testsfailed > failed:
            factory.dump_logs(sys.stderr)


def test_no_secret_reaches_any_log_line(procs: ProcFactory, tmp_path: Path) -> None:
    outputs = Outputs()
    env = portal_env(
        tmp_path / "portal-state",
        extra={"CSC_PORTAL_LOG_LEVEL": "debug", "CSC_PORTAL_LOG_FORMAT": "json"},
    )
    seed_portal(env, tmp_path / "sources")
    portal = spawn_portal(procs, env, wait=False)
    csc = procs.csc(env={"CSC_LOG_LEVEL": "debug"})
    portal.ready = portal.wait_ready_file(portal.ready_path)
    proxy = spawn_dmz_proxy(procs, portal.url, log_level="debug")
    operator_token = (csc.state_dir / "admin-token").read_text().strip()

    assert csc_admin(csc, outputs, "tenants", "create", TENANT, "--name", "Acme").returncode == 0
    assert csc_admin(csc, outputs, "aliases", "assign", TENANT, ALIAS).returncode == 0
    issued = csc_admin(
        csc, outputs, "--json", "tokens", "issue", TENANT, "--alias", ALIAS, prints_token=True
    )
    assert issued.returncode == 0, issued.stderr
    answer = json.loads(issued.stdout)
    agent_token, jti = answer["token"], answer["jti"]
    token_file = tmp_path / "agent-token"
    token_file.write_text(agent_token + "\n")
    refused = csc_admin(
        csc, outputs, "tenants", "list", env={"CSC_ADMIN_TOKEN": WRONG_OPERATOR_TOKEN}
    )
    assert refused.returncode == 1 and "auth_failed" in refused.stdout + refused.stderr

    agent = start_agent(procs, csc, token_file, portal.url)
    wait_alias_online(csc.http_url, ALIAS)
    with Mitm(csc.http_url) as via_csc, Mitm(proxy.url) as via_proxy:
        by_alias = ["--alias", ALIAS, "--csc", via_csc.url, "--user", "alice"]
        good = bootloader(outputs, by_alias, tmp_path / "phone", PASSWORDS["alice"])
        wrong = bootloader(outputs, by_alias, tmp_path / "other", WRONG_PASSWORD)
        host, port = via_proxy.url.removeprefix("http://").split(":")
        by_host = ["--host", host, "--port", port, "--user", "bob"]
        local = bootloader(outputs, by_host, tmp_path / "tablet", PASSWORDS["bob"])
        sessions = session_tokens(via_csc) | session_tokens(via_proxy)
    assert (good.code, wrong.code, local.code) == (0, 5, 0), (good, wrong, local)
    assert len(sessions) == 2
    in_query = tunnel_url(csc.http_url, ALIAS, f"/v1/portal?session={QUERY_SECRET}")
    assert http_request(in_query)[0] == 200
    assert http_request(f"{proxy.url}/v1/portal?session={QUERY_SECRET}")[0] == 200

    assert csc_admin(csc, outputs, "tokens", "revoke", jti).returncode == 0
    assert agent.wait(30) == 3
    again = start_agent(procs, csc, token_file, portal.url)
    assert again.wait(30) == 3
    procs.stop_all()

    secrets = {
        "agent token": agent_token,
        "agent token signature": agent_token.rsplit(".", 1)[1],
        "operator token": operator_token,
        "wrong operator token": WRONG_OPERATOR_TOKEN,
        "wrong password": WRONG_PASSWORD,
        "a credential in a query string": QUERY_SECRET,
        **{f"password of {user}": password for user, password in PASSWORDS.items()},
        **{f"session token {i}": token for i, token in enumerate(sorted(sessions))},
    }
    needles = {form: name for name, secret in secrets.items() for form in encoded_forms(secret)}
    needles[REDACTED] = "a secret caught by the log redaction (it reached a log call)"
    leaks = [
        f"{name} in {source}: {line[:300]}"
        for source, line in log_lines(procs.log_dir, outputs)
        for form, name in needles.items()
        if form in line
    ]
    assert not leaks, "\n".join(leaks)
    _check_every_log_line_is_an_event(procs.log_dir)
    _check_the_logs_say_what_happened(procs.log_dir)


def _check_every_log_line_is_an_event(log_dir: Path) -> None:
    """One JSON object per line in every output of the running programs."""
    for path in sorted(log_dir.glob("*.log")):
        for line in path.read_text(encoding="utf-8").splitlines():
            event = json.loads(line)
            assert {"ts", "level", "component", "logger", "msg"} <= set(event), line


def _check_the_logs_say_what_happened(log_dir: Path) -> None:
    """Not vacuous: debug lines were written, and one request id crossed CSC, agent and portal."""
    access = [e for e in json_events(log_dir, "csc") if e["logger"] == "csc.access"]
    logons = [e for e in access if e["path"] == "/v1/logon" and e["kind"] == "http"]
    assert len(logons) == 2 and {e["status"] for e in logons} == {200, 401}, access
    assert all(e["tenant"] == TENANT and e["bytes_out"] > 0 for e in logons)
    request_id = logons[0]["request_id"]
    agent = json_events(log_dir, "agent")
    assert any(e.get("request_id") == request_id and e["level"] == "debug" for e in agent)
    assert any(e.get("request_id") == request_id for e in json_events(log_dir, "portal"))
    assert any(e.get("request_id") for e in json_events(log_dir, "proxy"))
