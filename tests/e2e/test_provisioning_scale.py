"""Provisioning under load, with real processes: 50 bootloaders at once through one CSC and one
agent, and a 200 MiB package that survives the agent being killed mid-download.

The stack is that of tests/e2e/test_provisioning.py plus a ``linux-x64`` device type whose only
app, ``bigdata``, is one 200 MiB file deployed to alice. The file is generated once (a random
MiB rotated by its index, so no two MiB are alike and a resume at a wrong offset cannot go
unnoticed); the portal's argon2 cost is its ``test`` profile.

For the resume, a man in the middle between the bootloader and the CSC holds the download after
100 MiB; the agent is SIGKILLed, the CSC notices (the alias answers 503), the held download is let
go and ends short, and the bootloader exits 6 keeping the partial file. A new agent starts, and the
next run asks for ``Range: bytes=N-`` and receives only the rest.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.catalog import (
    PASSWORDS,
    check_against_manifest,
    check_installation,
    expected_package,
    run_portal_cli,
    seed_portal,
)
from tests.support.mitm import Mitm
from tests.support.procs import ProcFactory, http_request, scaled, wait_until
from tests.support.stack import BootRun, Stack, start_bootloader, start_stack

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
BIG_SIZE = 200 * MiB
HOLD_AT = 100 * MiB
LINUX = "linux-x64"
DEVICES = 50
COMBOS = [(u, t) for u in ("alice", "bob") for t in ("android-arm64", "win-x64")]


@dataclass(frozen=True)
class BigFile:
    path: Path
    sha256: str


@pytest.fixture(scope="session")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> BigFile:
    path = tmp_path_factory.mktemp("big") / "data.bin"
    block = random.Random("bigdata").randbytes(MiB)
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for index in range(BIG_SIZE // MiB):
            chunk = block[index:] + block[:index]
            digest.update(chunk)
            out.write(chunk)
    return BigFile(path, digest.hexdigest())


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest, big_file: BigFile
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("provisioning-scale")
    procs = ProcFactory(root)
    extra = [
        ["device-type", "add", LINUX],
        ["app", "add", "bigdata", "--version", "1.0", "--device-type", LINUX, str(big_file.path)],
        ["deploy", "app", "bigdata", "--user", "alice"],
    ]
    failed = request.session.testsfailed
    try:
        yield start_stack(procs, root, lambda env: seed_portal(env, root / "sources", extra))
    finally:
        procs.stop_all()
        if request.session.testsfailed > failed:
            procs.dump_logs(sys.stderr)


def _args(stack: Stack, user: str, device_type: str, csc: str | None = None) -> list[str]:
    return [
        *("--alias", stack.alias, "--csc", csc or stack.csc.http_url),
        *("--user", user, "--device-type", device_type, "--quiet"),
    ]


def test_fifty_bootloaders_at_once_through_one_csc_and_one_agent(
    stack: Stack, tmp_path: Path
) -> None:
    assert stack.agent is not None
    agent_pid = stack.agent.pid

    def one(index: int) -> BootRun:
        user, device_type = COMBOS[index % len(COMBOS)]
        target = tmp_path / f"device-{index:02d}"
        return stack.bootloader(_args(stack, user, device_type), target, password=PASSWORDS[user])

    with ThreadPoolExecutor(max_workers=DEVICES) as pool:
        runs = list(pool.map(one, range(DEVICES)))

    failed = [str(run) for run in runs if run.code != 0]
    assert failed == [], "\n".join(failed[:3])
    ids = {}
    for index in range(DEVICES):
        user, device_type = COMBOS[index % len(COMBOS)]
        target = tmp_path / f"device-{index:02d}"
        check_installation(target, expected_package(user, device_type))
        ids[(target / ".csc/device-id").read_text().strip()] = (user, device_type)
    devices = json.loads(run_portal_cli(["devices", "--json"], stack.env))
    seen = {d["device_id"]: (d["user"], d["device_type"]) for d in devices}
    assert {k: seen.get(k) for k in ids} == ids
    assert stack.agent.pid == agent_pid and stack.agent.running


def test_a_200_mib_package_resumes_after_the_agent_is_killed_mid_download(
    stack: Stack, big_file: BigFile, tmp_path: Path
) -> None:
    target = tmp_path / "device"
    password = PASSWORDS["alice"]
    with Mitm(stack.csc.http_url) as mitm:
        args = _args(stack, "alice", LINUX, mitm.url)
        mitm.hold_after = HOLD_AT
        first_run = start_bootloader(args, target, password=password, log_dir=tmp_path / "run-1")
        try:
            mitm.wait_held(timeout=120)
            assert stack.agent is not None
            stack.agent.kill()
            stack.agent.wait(10)
            wait_until(lambda: http_request(stack.resolve_url)[0] == 503, 10, message="offline")
            mitm.release()
            code = first_run.wait(scaled(60))
        finally:
            if first_run.poll() is None:
                first_run.kill()
                first_run.wait()
        err = (tmp_path / "run-1/bootloader.err").read_text()
        assert code == 6, err
        assert "download failed: the connection to the portal of acme@example.com broke off" in err
        [partial] = (target / ".partial").iterdir()
        have = partial.stat().st_size
        [first] = mitm.downloads()
        assert first.length is not None and first.length > BIG_SIZE
        assert first.outcome.startswith("held") and HOLD_AT <= have < first.length

        stack.start_agent()
        second_run = stack.bootloader(args, target, password=password, timeout=300)

        assert second_run.code == 0, second_run
        second = mitm.downloads()[-1]
        assert second.headers["range"] == f"bytes={have}-" and second.status == 206
        assert second.body_bytes == first.length - have < first.length
    manifest = check_against_manifest(target)
    assert [(a["name"], a["version"]) for a in manifest["apps"]] == [("bigdata", "1.0")]
    [entry] = manifest["apps"][0]["files"]
    assert (entry["path"], entry["size"], entry["sha256"]) == (
        "bigdata/data.bin",
        BIG_SIZE,
        big_file.sha256,
    )
    assert (target / "current").resolve().name == partial.stem
