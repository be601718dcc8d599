"""README.md's quick start, pasted line by line into a fresh bash, with real processes.

Only the ports are changed (free ones instead of 8080-8082 and 9000, through the documented
``CSC_*_LISTEN`` variables and the same substitution in the pasted lines), and ``make venv &&
. .venv/bin/activate`` becomes the activation of the venv running the tests. The shell runs in
an empty working directory with its own ``HOME``, as a new user's would be. What must hold:

* the documented curl lines work (resolve answers 200, the tunnel serves the portal's page);
* nothing of the CSC's state is reachable through the tunnel (``state/signing-key.pem``,
  ``state/admin-token``, and the same names at the top: 404), and the state is not in the
  working directory but in ``~/.local/state/csc``, mode 0700;
* ``csc serve`` refuses a state directory that other users can read, naming the ``chmod``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import REPO_ROOT, child_env, scaled

ALIAS = "acme@example.com"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def quickstart_lines() -> list[str]:
    """The shell lines of README.md's quick start (comments and blank lines dropped)."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Quick start") :]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None, "README.md: no ```sh block in the quick start"
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    return [line for line in lines if not line.lstrip().startswith("#")]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=scaled(10)) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except urllib.error.URLError:
        return 0, b""  # not listening yet


class Shell:
    """One bash reading pasted lines on stdin; its output goes to a file we poll."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.out = cwd.parent / "shell.out"
        self._fh = self.out.open("wb")
        self.proc = subprocess.Popen(
            ["bash", "--norc", "--noprofile"],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
        )
        self.jobs: list[int] = []
        self._marks = 0

    def paste(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def mark(self, command: str = "true", timeout: float = 60) -> str:
        """Run ``command`` after everything pasted so far; return the output since the last mark
        (the command's ``$?`` is on the marker line)."""
        self._marks += 1
        tag = f"@@mark{self._marks}@@"
        self.paste(f'{command}; echo "{tag} $?"')
        deadline = time.monotonic() + scaled(timeout)
        while True:
            text = self.out.read_bytes().decode(errors="replace")
            # the marker line ends at its newline: background jobs may write right after it
            end = text.find("\n", text.find(tag)) if tag in text else -1
            if end >= 0:
                start = text.find(f"@@mark{self._marks - 1}@@") if self._marks > 1 else 0
                start = text.find("\n", start) + 1 if self._marks > 1 else 0
                return text[start:end]
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the shell did not get to {tag}:\n{text}")
            time.sleep(0.05)

    def stop(self) -> None:
        for pid in self.jobs:  # only the jobs this shell started, by PID
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + scaled(30)
        for pid in self.jobs:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(scaled(10))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._fh.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of the (finished) shell counts as gone
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[tuple[Shell, dict[str, int], Path]]:
    ports = {name: _free_port() for name in ("http", "tcp", "admin", "metrics", "portal")}
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    work = tmp_path / "clone"
    work.mkdir()
    env = child_env(
        {
            "HOME": str(home),
            "CSC_LISTEN": f"127.0.0.1:{ports['http']}",
            "CSC_TCP_LISTEN": f"127.0.0.1:{ports['tcp']}",
            "CSC_ADMIN_LISTEN": f"127.0.0.1:{ports['admin']}",
            "CSC_METRICS_LISTEN": f"127.0.0.1:{ports['metrics']}",
        }
    )
    for name in [k for k in env if k.startswith("CSC_") and not k.endswith("_LISTEN")]:
        if name != "CSC_TEST_TIMEOUT_FACTOR":
            del env[name]
    env.pop("XDG_STATE_HOME", None)
    env.pop("VIRTUAL_ENV", None)
    sh = Shell(work, env)
    try:
        yield sh, ports, home
    finally:
        sh.stop()


def _adjust(line: str, ports: dict[str, int]) -> str:
    if line.startswith("make venv"):
        return f". {Path(sys.prefix) / 'bin' / 'activate'}"
    return line.replace("127.0.0.1:8080", f"127.0.0.1:{ports['http']}").replace(
        "9000", str(ports["portal"])
    )


def test_readme_quick_start_works_and_exposes_no_state(
    shell: tuple[Shell, dict[str, int], Path],
) -> None:
    sh, ports, home = shell
    lines = [_adjust(line, ports) for line in quickstart_lines()]
    setup = [line for line in lines if not line.startswith("curl ")]
    curls = [line for line in lines if line.startswith("curl ")]
    assert len(curls) == 2 and setup[-1].endswith("&")
    for line in setup:
        sh.paste(line)
    jobs = sh.mark("echo JOBS $(jobs -p)")
    sh.jobs = [int(pid) for pid in re.findall(r"JOBS ([\d ]+)", jobs)[0].split()]
    assert len(sh.jobs) == 3, jobs  # csc serve, the portal, csc-agent
    csc = f"http://127.0.0.1:{ports['http']}"
    deadline = time.monotonic() + scaled(60)
    while _get(f"{csc}/v1/resolve/{ALIAS}")[0] != 200:
        assert time.monotonic() < deadline, sh.out.read_text(errors="replace")
        time.sleep(0.1)

    for path in (
        "state/signing-key.pem",
        "state/admin-token",
        "state/csc.db",
        "signing-key.pem",
        "admin-token",
        ".local/state/csc/admin-token",
    ):
        status, body = _get(f"{csc}/t/{ALIAS}/{path}")
        assert status == 404, (path, status, body[:200])
    resolved = sh.mark(curls[0])
    assert resolved.rstrip().endswith(" 0"), resolved
    # the background jobs log to the same terminal: find curl's line among theirs
    answer = [
        json.loads(ln[: ln.rindex("}") + 1])
        for ln in resolved.splitlines()
        if ln.startswith('{"alias"')
    ]
    assert answer and answer[0]["online"] is True, resolved
    page = sh.mark(curls[1])
    assert "Hello from the portal" in page and page.rstrip().endswith(" 0"), page

    work = home.parent / "clone"
    assert sorted(p.name for p in work.iterdir()) == ["portal-root"]
    state = home / ".local" / "state" / "csc"
    assert (state / "admin-token").is_file() and (state / "signing-key.pem").is_file()
    assert state.stat().st_mode & 0o777 == 0o700


def test_csc_serve_refuses_state_other_users_can_read(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    run = [sys.executable, "-m", "csc", "serve", "--state-dir", str(state)]
    run += ["--listen", "127.0.0.1:0", "--tcp-listen", "off", "--admin-listen", "off"]
    run += ["--metrics-listen", "off"]
    for path, mode, fix in (
        (state, 0o755, f"chmod 700 {state}"),
        (state / "signing-key.pem", 0o644, f"chmod 600 {state / 'signing-key.pem'}"),
        (state / "admin-token", 0o640, f"chmod 600 {state / 'admin-token'}"),
    ):
        if path != state:
            path.write_text("secret\n")
        path.chmod(mode)
        done = subprocess.run(
            run, env=child_env(), capture_output=True, text=True, timeout=scaled(60), check=False
        )
        assert done.returncode == 1, done.stderr
        assert f"{path} is open to other users (mode {mode:04o}); run: {fix}" in done.stderr
        path.chmod(0o700 if path == state else 0o600)
