"""``python -m demo`` (what ``make demo`` runs) as a real process: it provisions a device, and
either exits right after the story (stdin not a terminal) or stays up on a terminal until Ctrl-C
or SIGTERM; either way every process it started is gone afterwards and it exits 0."""

from __future__ import annotations

import contextlib
import io
import os
import pty
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from demo.__main__ import should_wait
from tests.support.catalog import check_installation, expected_package
from tests.support.procs import REPO_ROOT, child_env, scaled, wait_until

DEMO_TIMEOUT = 120.0


def _env() -> dict[str, str]:
    env = child_env()
    for name in ("CI", "DEMO_EXIT"):
        env.pop(name, None)
    return env


def _leftovers(workdir: Path) -> dict[int, str]:
    """Processes whose command line names the demo's directory (the demo and its children)."""
    found = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(workdir) in cmdline and proc.info["pid"] != os.getpid():
            found[int(proc.info["pid"])] = cmdline
    return found


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """The demo's scratch directory; whatever the demo left running is killed (by PID) after."""
    path = tmp_path / "demo"
    yield path
    for pid in _leftovers(path):
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


def _check_story(workdir: Path, out: str) -> None:
    check_installation(workdir / "device", expected_package("alice", "android-arm64"))
    assert "[8/8] What the device has now" in out
    assert "then Alias: acme@example.com cdzprov Key: " in out
    assert "client 5.1.0 (2 files)" in out
    assert "Traceback" not in out
    wait_until(lambda: not _leftovers(workdir), 10, message="the demo's children gone")


def test_the_demo_provisions_a_device_and_exits_without_a_terminal(workdir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "demo", "--workdir", str(workdir)],
        cwd=REPO_ROOT,
        env=_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=scaled(DEMO_TIMEOUT),
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    _check_story(workdir, done.stdout)
    assert "Not waiting" in done.stdout and "Press Ctrl-C" not in done.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_on_a_terminal_the_demo_stays_up_until_a_signal(
    workdir: Path, tmp_path: Path, sig: int
) -> None:
    out_path = tmp_path / "demo.out"
    master, terminal = pty.openpty()
    try:
        with open(out_path, "wb") as log:
            demo = subprocess.Popen(
                [sys.executable, "-m", "demo", "--workdir", str(workdir)],
                cwd=REPO_ROOT,
                env=_env(),
                stdin=terminal,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until(
                lambda: "Press Ctrl-C to stop." in out_path.read_text() or demo.poll() is not None,
                DEMO_TIMEOUT,
                message="the demo waiting for Ctrl-C",
            )
            assert demo.poll() is None, out_path.read_text()
            demo.send_signal(sig)
            code = demo.wait(scaled(30))
        finally:
            if demo.poll() is None:
                demo.kill()
                demo.wait()
    finally:
        os.close(master)
        os.close(terminal)
    out = out_path.read_text()
    assert code == 0, out
    assert f"{signal.Signals(sig).name}: stopping." in out
    assert "resolve the alias  curl http://127.0.0.1:" in out
    _check_story(workdir, out)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("env", "flag", "tty", "waits"),
    [
        ({}, False, True, True),
        ({}, False, False, False),
        ({"CI": "true"}, False, True, False),
        ({"DEMO_EXIT": "1"}, False, True, False),
        ({"DEMO_EXIT": "0"}, False, True, True),
        ({}, True, True, False),
    ],
)
def test_when_the_demo_waits(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], flag: bool, tty: bool, waits: bool
) -> None:
    for name in ("CI", "DEMO_EXIT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "stdin", _Terminal() if tty else io.StringIO())
    assert should_wait(flag) is waits
