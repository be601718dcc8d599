"""What an operator sees of the real programs: readable logs on a terminal and JSON
otherwise (``--log-format``), a busy port named as ``HOST:PORT is already in use``, the
agent's reconnect lines and the portal URLs it prints, and the check-only commands."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.procs import (
    REPO_ROOT,
    ProcFactory,
    child_env,
    issue_token,
    scaled,
    wait_alias_online,
    wait_until,
)

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (INFO|WARNING|ERROR|DEBUG) ")


def _run(
    argv: Sequence[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=REPO_ROOT,
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=scaled(60),
        check=False,
    )


@contextmanager
def _on_terminal(argv: Sequence[str]) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``argv`` with its stderr on a pseudo-terminal; yields the process and the terminal's
    other end (the test reads what the program wrote there)."""
    master, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", *argv],
        cwd=REPO_ROOT,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=terminal,
    )
    os.close(terminal)
    try:
        yield proc, master
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(scaled(10))
        os.close(master)


def _first_line(master: int, timeout: float = 20) -> str:
    buffer = b""
    deadline = time.monotonic() + scaled(timeout)
    while b"\n" not in buffer and time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                buffer += os.read(master, 4096)
            except OSError:  # EIO: the program closed the terminal
                break
    assert b"\n" in buffer, buffer
    return buffer.split(b"\n", 1)[0].decode().rstrip("\r")


def _proxy_argv(tmp_path: Path, *extra: str) -> list[str]:
    ready = tmp_path / f"proxy-{len(extra)}.ready"
    argv = ["tenant_agent", "proxy", "--listen", "127.0.0.1:0", "--upstream"]
    return [*argv, "http://127.0.0.1:1", "--ready-file", str(ready), *extra]


# --- item 3: logs ------------------------------------------------------------------------------


def test_logs_are_text_on_a_terminal_json_otherwise_and_log_format_forces_either(
    tmp_path: Path, procs: ProcFactory
) -> None:
    with _on_terminal(_proxy_argv(tmp_path)) as (_, master):
        line = _first_line(master)
    assert TEXT_LINE.match(line) and "proxy listening on" in line, line
    assert not line.startswith("{")
    with _on_terminal(_proxy_argv(tmp_path, "--log-format", "json")) as (_, master):
        event = json.loads(_first_line(master))
    assert event["msg"].startswith("proxy listening on") and event["level"] == "info"
    # not a terminal: JSON by default, text when asked
    for extra, is_json in (((), True), (("--log-format", "text"), False)):
        proc = procs.spawn("proxy", [sys.executable, "-m", *_proxy_argv(tmp_path, *extra)])
        wait_until(lambda p=proc: "proxy listening" in p.logs()[1], 20, message="the proxy up")
        proc.stop()
        [first, *_] = [line for line in proc.logs()[1].splitlines() if line.strip()]
        assert first.startswith("{") is is_json, first
        assert bool(TEXT_LINE.match(first)) is not is_json, first


# --- item 10: a busy port ----------------------------------------------------------------------


def test_a_busy_port_is_named_not_shown_as_a_python_tuple(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        serve = ["csc", "serve", "--state-dir", str(tmp_path / "csc"), "--tcp-listen", "off"]
        serve += ["--metrics-listen", "off"]
        local = [*serve, "--listen", "127.0.0.1:0", "--admin-listen"]
        runs = {
            "csc serve": _run([*serve, "--listen", busy, "--admin-listen", "off"]),
            "csc admin listener": _run([*local, busy]),
            "csc metrics listener": _run([*local, "off", "--metrics-listen", busy]),
            "csc-portal serve": _run(
                ["portal", "serve", "--state-dir", str(tmp_path / "portal"), "--listen", busy]
            ),
        }
    for name, run in runs.items():
        assert run.returncode == 1, (name, run.stderr)
        assert f"{busy} is already in use" in run.stderr, (name, run.stderr)
        assert "('127.0.0.1'" not in run.stderr and "Traceback" not in run.stderr, name


# --- items 6 and 7: the agent's reconnect lines and portal URLs ---------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_agent_says_why_it_retries_once_per_failure_then_where_the_portal_is(
    tmp_path: Path, procs: ProcFactory
) -> None:
    state = tmp_path / "csc-state"
    token = issue_token(state, "acme", ["acme@example.com", "*@acme.org"])
    upstream = procs.upstream(tcp_echo=False)
    csc_url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there yet
    env = {"CSC_AGENT_BACKOFF_INITIAL": "0.05s", "CSC_AGENT_BACKOFF_MAX": "0.2s"}
    agent = procs.agent(
        csc_url, token, upstream.http_url, sessions=1, extra_args=["--log-format", "text"], env=env
    )
    wait_until(
        lambda: agent.logs()[1].count("cannot connect to") >= 3, 20, message="three failures"
    )
    procs.csc(state_dir=state, listen=csc_url.removeprefix("http://"))
    wait_alias_online(csc_url, "acme@example.com")
    wait_until(lambda: "the portal is reachable at" in agent.logs()[1], 20, message="the URLs")
    agent.stop()
    log = agent.logs()[1]
    # (the token is issued for a day: the agent also warns that it expires within the week)
    failures = [
        line for line in log.splitlines() if "WARNING" in line and "token expires" not in line
    ]
    assert "the agent token expires" in log
    assert all(
        f"cannot connect to {csc_url}: the connection was refused" in line
        and re.search(r"; retrying in \d+\.\d s$", line)
        for line in failures
    ), failures
    assert "[Errno" not in log and "reconnecting in" not in log
    assert len(re.findall(r"retrying in", log)) == len(failures)  # one line per failure
    [summary] = [line for line in log.splitlines() if "reconnected" in line]
    assert re.search(r"reconnected; down for \d+\.\d s, \d+ failed attempts \(last: ", summary)
    urls = [
        line.split("reachable at ", 1)[1] for line in log.splitlines() if "reachable at" in line
    ]
    assert urls == [f"{csc_url}/t/acme@example.com/", f"{csc_url}/t/*@acme.org/"]


# --- item 12: check-only commands ---------------------------------------------------------------


def test_check_commands_report_every_problem_and_serve_nothing(
    tmp_path: Path, procs: ProcFactory
) -> None:
    fresh = tmp_path / "fresh"
    run = _run(["csc", "check", "--state-dir", str(fresh / "csc")])
    assert run.returncode == 0 and "csc: the configuration is usable" in run.stdout, run.stdout
    run = _run(["portal", "check", "--state-dir", str(fresh / "portal")])
    assert run.returncode == 0 and "does not exist yet" in run.stdout, run.stdout
    assert not fresh.exists()  # a check creates nothing
    bad = tmp_path / "bad.toml"
    bad.write_text('listen = "nowhere"\nlog_levle = "info"\n')
    run = _run(["csc", "check", "--config", str(bad)])
    assert run.returncode == 1 and run.stdout.count("problem ") == 2, run.stdout
    assert "did you mean" in run.stdout and "nothing was started" in run.stdout
    run = _run(["portal", "check", "--config", str(bad)])
    assert run.returncode == 1 and "problem" in run.stdout, run.stdout
    cluster = {
        "CSC_REDIS_URL": f"redis://127.0.0.1:{_free_port()}",
        "CSC_DATABASE_URL": f"postgresql://csc:hunter2@127.0.0.1:{_free_port()}/csc",
        "CSC_PEER_LISTEN": "127.0.0.1:0",
        "CSC_CLUSTER_KEY": "k" * 40,
    }
    run = _run(["csc", "check", "--state-dir", str(fresh / "csc")], env=cluster)
    assert run.returncode == 1, run.stdout
    lines = run.stdout.splitlines()
    assert any(line.startswith("problem  redis_url") for line in lines), run.stdout
    assert any(line.startswith("problem  database_url") for line in lines), run.stdout
    assert "hunter2" not in run.stdout + run.stderr


def test_agent_check_tries_the_csc_the_token_and_the_upstream_once(
    tmp_path: Path, procs: ProcFactory
) -> None:
    state = tmp_path / "csc-state"
    token = issue_token(state, "acme", "acme@example.com")
    csc = procs.csc(state_dir=state)
    upstream = procs.upstream(tcp_echo=False)
    base = ["tenant_agent", "check", "--csc", csc.http_url, "--upstream", upstream.http_url]
    run = _run([*base, "--token", token])
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{csc.http_url}/healthz answered HTTP 200" in run.stdout
    assert f"the portal would be reachable at {csc.http_url}/t/acme@example.com/" in run.stdout
    assert ", expires 20" in run.stdout and "(in 24.0 h)" in run.stdout  # issued for 1 day
    assert token not in run.stdout + run.stderr
    closed = f"http://127.0.0.1:{_free_port()}"
    run = _run([*base[:-1], closed, "--token", token[:-4] + "AAAA"])
    assert run.returncode == 1
    lines = run.stdout.splitlines()
    assert any(line.startswith("problem  token") and "refused" in line for line in lines), lines
    assert any(line.startswith("problem  upstream") and "refused" in line for line in lines)
    assert any(line.startswith("ok       csc") for line in lines), lines
    run = _run(["tenant_agent", "check", "--csc", "ftp://x", "--upstream", upstream.http_url])
    assert run.returncode == 1 and run.stdout.count("problem ") >= 2, run.stdout  # csc, token


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent check reads /healthz with urllib: no proxy from the environment."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)


# --- item 9: the portal's times ------------------------------------------------------------------


def test_portal_lists_times_as_iso_8601_in_tables_and_json(tmp_path: Path) -> None:
    state = ["--state-dir", str(tmp_path / "portal")]
    assert _run(["portal", "group", "add", "field", *state]).returncode == 0
    shown = json.loads(_run(["portal", "group", "list", "--json", *state]).stdout)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", shown[0]["created_at"]), shown
    added = _run(["portal", "user", "add", "bob", "--password", "a long pass phrase 42", *state])
    assert added.returncode == 0, added.stderr
    header, row = _run(["portal", "user", "list", *state]).stdout.splitlines()
    assert header.split()[-1] == "CREATED" and re.search(r" \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", row)
