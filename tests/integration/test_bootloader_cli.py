"""``csc-bootloader`` as a real process, through a real CSC and tenant agent to a fake portal;
and the zipapp rule: the bootloader imports only the standard library, ``cryptography`` and
``shared.aliases``."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.support.packages import ALIAS, DEVICE_TYPE, PASSWORD, FakePortal, fingerprint
from tests.support.procs import (
    REPO_ROOT,
    ProcFactory,
    child_env,
    http_request,
    issue_token,
    resolve_url,
    scaled,
    wait_alias_online,
    wait_until,
)

KEY = Ed25519PrivateKey.generate()


def _bootloader(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bootloader", *argv],
        cwd=REPO_ROOT,
        env=child_env(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=scaled(60),
        check=False,
    )


def test_provisioning_through_a_real_relay(procs: ProcFactory, tmp_path: Path) -> None:
    target = tmp_path / "device"
    sms = (
        "Get the client: http://portal.example/get/ then User: alice "
        f"Alias: {ALIAS.upper()} cdzprov Key: {fingerprint(KEY)}"
    )
    with FakePortal(KEY) as portal:
        csc = procs.csc()
        agent = procs.agent(csc.http_url, issue_token(csc.state_dir, "acme", ALIAS), portal.url)
        wait_alias_online(csc.http_url, ALIAS)
        argv = ["--sms", sms, "--csc", csc.http_url, "--target", str(target)]
        argv += ["--device-type", DEVICE_TYPE]
        done = _bootloader(argv, {"CSC_BOOTLOADER_PASSWORD": PASSWORD})
        assert done.returncode == 0, done.stderr
        assert "client 5.1.0 (2 files)" in done.stdout
        assert (target / "current/client/bin/run").read_bytes().startswith(b"#!/bin/sh")
        tunneled = list(portal.requests)
        assert [r.path for r in tunneled] == [
            "/v1/portal",
            "/v1/logon",
            f"/v1/package/{portal.package_id}",
        ]
        assert all(r.headers.get("X-Request-Id") for r in tunneled)

        agent.stop()
        wait_until(
            lambda: http_request(resolve_url(csc.http_url, ALIAS))[0] == 503,
            10,
            message="alias offline",
        )
        offline = _bootloader(argv, {"CSC_BOOTLOADER_PASSWORD": PASSWORD})
    assert offline.returncode == 3
    line = offline.stderr.strip().splitlines()[-1]
    assert line.startswith(f"csc-bootloader: resolve failed: the portal of {ALIAS} is offline; ")
    assert "try again in" in line and "(request " in line
    assert "Traceback" not in offline.stderr
    assert (target / "current/client/bin/run").exists()  # the installed client is untouched


def test_bootloader_imports_only_what_a_zipapp_carries() -> None:
    probe = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        "import bootloader.cli\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=scaled(30),
        check=True,
    )
    loaded = json.loads(result.stdout)
    top = {name.split(".")[0] for name in loaded}
    stdlib = set(sys.stdlib_module_names)
    # _cffi_backend and _openssl come with cryptography (its compiled bindings register them)
    allowed = {"bootloader", "shared", "cryptography", "_cffi_backend", "_openssl"}
    foreign = sorted(top - stdlib - allowed)
    assert foreign == []
    # shared.compiled (the compiled modules' guard) is imported only where it exists: the
    # zipapp goes without it (tests/unit/test_portal_getsite.py)
    shared = sorted(name for name in loaded if name.startswith("shared."))
    assert shared == ["shared.aliases", "shared.compiled", "shared.errors", "shared.resolve_sig"]


def _converse(fd: int, answers: list[tuple[bytes, str]], deadline: float) -> bytes:
    """Read the terminal until it closes, typing each answer after its prompt."""
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        if answers and seen.endswith(answers[0][0]):
            os.write(fd, answers.pop(0)[1].encode() + b"\n")
    return seen


def test_questions_on_a_real_terminal_never_echo_the_password(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "bootloader", "--target", str(tmp_path / "device")]
    with FakePortal(KEY) as portal:
        argv += ["--csc", portal.url, "--device-type", DEVICE_TYPE]
        pid, fd = pty.fork()
        if pid == 0:  # the child: the bootloader on the terminal
            os.chdir(REPO_ROOT)
            os.execve(sys.executable, argv, child_env({"CSC_BOOTLOADER_PASSWORD": ""}))
        answers = [(b"(or host:port): ", ALIAS), (b"User: ", "alice"), (b"alice: ", PASSWORD)]
        try:
            seen = _converse(fd, answers, time.monotonic() + scaled(30))
        finally:
            _, status = os.waitpid(pid, 0)
            os.close(fd)
    text = seen.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert answers == []
    assert PASSWORD not in text
    assert "\r100% [########################]" in text  # the bar, redrawn in place
    assert "Installed package" in text
