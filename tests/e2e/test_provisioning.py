"""Provisioning end to end, with real processes: ``csc serve``, ``csc-agent``, ``csc-agent proxy``,
``csc-portal serve`` and ``csc-bootloader`` (docs/provisioning.md).

One stack serves the module (see :mod:`tests.support.stack`); its portal holds the catalog of
:mod:`tests.support.catalog` (alice and bob, two device types, three apps, two policies). What
must hold:

* each of the seed's methods provisions a device: the administrator's SMS (printed by
  ``csc-portal sms``, run by the zipapp from the get site it names), the user's alias through the CSC (typed at the bootloader's questions on
  a terminal, or given as flags), the user's host and port through the DMZ proxy, and migration
  files (one with Alias, a registry export with Host and Port);
* two users on two device types get four different packages, installed exactly as their signed
  manifests say;
* a wrong password, a download cut off halfway, and a package forged by a man in the middle
  (a file changed, or file and manifest changed consistently) install nothing and leave the
  existing client byte for byte as it was; an impostor's key is refused before any credential
  leaves the device; the cut download resumes with ``Range`` on the next run;
* an offline portal, an unknown alias, an unreachable portal and a configuration with both Alias
  and Host each fail with their own message and exit status.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.support.catalog import (
    MAPS_TILES_SIZE,
    PASSWORDS,
    check_installation,
    client_snapshot,
    expected_package,
    run_portal_cli,
    seed_portal,
)
from tests.support.mitm import Mitm, alter_file, forge_manifest
from tests.support.packages import fingerprint
from tests.support.procs import (
    REPO_ROOT,
    ProcFactory,
    child_env,
    http_request,
    issue_token,
    resolve_url,
    scaled,
    tunnel_url,
    wait_alias_online,
    wait_until,
)
from tests.support.stack import (
    BootRun,
    Stack,
    run_bootloader_on_terminal,
    spawn_dmz_proxy,
    start_stack,
)

ANDROID, WINDOWS = "android-arm64", "win-x64"


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("provisioning")
    procs = ProcFactory(root)
    failed = request.session.testsfailed
    try:
        yield start_stack(procs, root, lambda env: seed_portal(env, root / "sources"))
    finally:
        procs.stop_all()
        if request.session.testsfailed > failed:
            procs.dump_logs(sys.stderr)


@pytest.fixture
def mitm(stack: Stack) -> Iterator[Mitm]:
    """A man in the middle between the bootloader and the CSC."""
    with Mitm(stack.csc.http_url) as proxy:
        yield proxy


def by_alias(stack: Stack, user: str, device_type: str, csc: str | None = None) -> list[str]:
    """Flags of a user-initiated run with the alias (through ``csc``, default the CSC)."""
    return [
        *("--alias", stack.alias, "--csc", csc or stack.csc.http_url),
        *("--user", user, "--device-type", device_type),
    ]


def provision(stack: Stack, target: Path, user: str, device_type: str) -> BootRun:
    """Install ``user``'s package on ``target`` (the state a failure test starts from)."""
    run = stack.bootloader(by_alias(stack, user, device_type), target, password=PASSWORDS[user])
    assert run.code == 0, run
    check_installation(target, expected_package(user, device_type))
    return run


# --- the methods ----------------------------------------------------------------------------


def test_administrator_initiated_the_sms_from_csc_portal(stack: Stack, tmp_path: Path) -> None:
    """The user gets the SMS, downloads the bootloader from the get site it names (through the
    tunnel) and runs that zipapp on the SMS."""
    sms = stack.sms("--user", "alice", "--alias", stack.alias)
    key = run_portal_cli(["key", "show", "--json"], stack.env)
    fp = json.loads(key)["fingerprint"]
    get_url = stack.tunnel_url("get/")
    assert (
        sms == f"Get the client: {get_url} then User: alice Alias: {stack.alias} cdzprov Key: {fp}"
    )
    status, _, pyz = http_request(get_url + "csc-bootloader.pyz")
    assert status == 200
    (tmp_path / "csc-bootloader.pyz").write_bytes(pyz)

    target = tmp_path / "device"
    args = ["--sms", sms, "--csc", stack.csc.http_url, "--device-type", ANDROID]
    run = stack.bootloader(
        args, target, password=PASSWORDS["alice"], pyz=tmp_path / "csc-bootloader.pyz"
    )

    assert run.code == 0, run
    assert f"The key matches the fingerprint {fp}" in run.err
    assert "client 5.1.0 (2 files)" in run.out and "sync-interval = 15m" in run.out
    check_installation(target, expected_package("alice", ANDROID))
    device_id = (target / ".csc/device-id").read_text().strip()
    devices = json.loads(run_portal_cli(["devices", "--json"], stack.env))
    mine = [d for d in devices if d["device_id"] == device_id]
    assert [(d["user"], d["device_type"]) for d in mine] == [("alice", ANDROID)]


def _name_the_tenant(stack: Stack, name: str, contact: str) -> None:
    """Give the tenant a display name and contact, and wait until the CSC's answers carry them."""
    _csc_admin(stack, "tenants", "update", "acme", "--name", name, "--contact", contact)
    wait_until(
        lambda: (
            json.loads(http_request(resolve_url(stack.csc.http_url, stack.alias))[2])
            .get("tenant", {})
            .get("name")
            == name
        ),
        30,
        0.05,
        message="the tenant's new name in the resolve answer",
    )


def _get_site_pyz(stack: Stack, tmp_path: Path, csc: str) -> Path:
    """The bootloader as the get site serves it, downloaded through ``csc``'s tunnel."""
    status, _, pyz = http_request(tunnel_url(csc, stack.alias, "get/csc-bootloader.pyz"))
    assert status == 200
    path = tmp_path / "csc-bootloader.pyz"
    path.write_bytes(pyz)
    return path


def test_the_get_site_bootloader_knows_its_csc_and_shows_the_verified_tenant(
    stack: Stack, tmp_path: Path
) -> None:
    """Run exactly as the get page says (no --csc, no
    CSC_BOOTLOADER_CSC); it resolves at the CSC it was downloaded through, checks the CSC's
    signature and names the tenant before it asks for the password."""
    _name_the_tenant(stack, "Acme Corp", "help@acme.example")
    sms = stack.sms("--user", "alice", "--alias", stack.alias)
    status, _, page = http_request(stack.tunnel_url(f"get/{ANDROID}/"))
    assert status == 200
    said = f"python3 csc-bootloader.pyz --device-type {ANDROID} --sms &#x27;&hellip;&#x27;"
    assert said in page.decode() or f"--device-type {ANDROID} --sms '&hellip;'" in page.decode()
    pyz = _get_site_pyz(stack, tmp_path, stack.csc.http_url)

    target = tmp_path / "device"
    args = ["--device-type", ANDROID, "--sms", sms]
    run = stack.bootloader(args, target, password=PASSWORDS["alice"], pyz=pyz)

    assert run.code == 0, run
    assert f"Resolving {stack.alias} at {stack.csc.http_url}" in run.err
    assert "Logging on to Acme Corp (verified by the CSC); support: help@acme.example" in run.err, (
        run.err
    )
    check_installation(target, expected_package("alice", ANDROID))


def test_a_tampered_resolve_answer_stops_the_bootloader_at_resolve(
    stack: Stack, mitm: Mitm, tmp_path: Path
) -> None:
    """The tenant's name rewritten on the way fails the CSC's signature; the
    bootloader (preset with the CSC it came through, here the man in the middle's address) stops
    at the resolve stage and never contacts the portal."""
    _name_the_tenant(stack, "Acme Corp", "help@acme.example")
    pyz = _get_site_pyz(stack, tmp_path, mitm.url)
    sms = stack.sms("--user", "alice", "--alias", stack.alias)
    mitm.rename_tenant = "Acme Corp Payroll"

    run = stack.bootloader(
        ["--device-type", ANDROID, "--sms", sms],
        tmp_path / "device",
        password=PASSWORDS["alice"],
        pyz=pyz,
    )

    assert run.code == 3, run
    assert "resolve failed: the answer for acme@example.com is not signed by the key" in run.err
    assert "Logging on to" not in run.err
    assert not [p for p in mitm.paths() if "/v1/portal" in p or "/v1/logon" in p], mitm.paths()
    mitm.rename_tenant = None
    run = stack.bootloader(
        ["--device-type", ANDROID, "--sms", sms],
        tmp_path / "device",
        password=PASSWORDS["alice"],
        pyz=pyz,
    )
    assert run.code == 0, run  # the same bootloader through the same path, untampered


def test_user_initiated_with_an_alias_through_the_csc(stack: Stack, tmp_path: Path) -> None:
    args = by_alias(stack, "bob", WINDOWS)
    args[1] = "ACME@Example.COM"  # as a user might type it
    run = stack.bootloader(args, tmp_path / "device", password=PASSWORDS["bob"])
    assert run.code == 0, run
    assert f"Resolving {stack.alias} at {stack.csc.http_url}" in run.err
    assert "trusting the key" in run.err and "on first use" in run.err  # no Key: given
    check_installation(tmp_path / "device", expected_package("bob", WINDOWS))


def test_user_initiated_on_a_terminal_the_user_types_the_alias(
    stack: Stack, tmp_path: Path
) -> None:
    answers = [
        ("Alias (or host:port): ", "ACME@Example.com"),
        (f"Device type ({ANDROID}, {WINDOWS}): ", ANDROID),  # this machine is neither
        ("User: ", "bob"),
        ("Password for bob: ", PASSWORDS["bob"]),
    ]
    run = run_bootloader_on_terminal(
        [], tmp_path / "device", answers, env={"CSC_BOOTLOADER_CSC": stack.csc.http_url}
    )
    assert run.code == 0, run
    assert PASSWORDS["bob"] not in run.out  # typed without echo
    assert "Installed package" in run.out
    check_installation(tmp_path / "device", expected_package("bob", ANDROID))


def test_user_initiated_with_host_and_port_through_the_dmz_proxy(
    stack: Stack, tmp_path: Path
) -> None:
    host, port = stack.proxy.addr
    args = ["--host", host, "--port", str(port), "--user", "alice", "--device-type", WINDOWS]
    run = stack.bootloader(args, tmp_path / "device", password=PASSWORDS["alice"])
    assert run.code == 0, run
    assert f"Portal: Acme Ltd ({host}:{port})" in run.err and "Resolving" not in run.err
    check_installation(tmp_path / "device", expected_package("alice", WINDOWS))


def _registry_export(host: str, port: int) -> bytes:
    text = (
        "Windows Registry Editor Version 5.00\r\n\r\n"
        "[HKEY_LOCAL_MACHINE\\SOFTWARE\\Vendor\\Client\\Provisioning]\r\n"
        f'"Host"="{host}"\r\n"Port"=dword:{port:08x}\r\n"User"="bob"\r\n'
    )
    return text.encode("utf-16")  # with its byte order mark, as regedit writes it


def test_migration_files_with_an_alias_and_with_host_and_port(stack: Stack, tmp_path: Path) -> None:
    by_alias_file = tmp_path / "provisioning.ini"
    by_alias_file.write_text(f"[Provisioning]\nAlias = {stack.alias}\nUser = alice\n")
    host, port = stack.proxy.addr
    by_host_file = tmp_path / "provisioning.reg"
    by_host_file.write_bytes(_registry_export(host, port))

    first = stack.bootloader(
        [
            "--config-file",
            str(by_alias_file),
            "--csc",
            stack.csc.http_url,
            "--device-type",
            ANDROID,
        ],
        tmp_path / "phone",
        password=PASSWORDS["alice"],
    )
    assert first.code == 0, first
    check_installation(tmp_path / "phone", expected_package("alice", ANDROID))

    second = stack.bootloader(
        ["--config-file", str(by_host_file), "--device-type", ANDROID],
        tmp_path / "tablet",
        password=PASSWORDS["bob"],
    )
    assert second.code == 0, second
    assert f"({host}:{port})" in second.err
    check_installation(tmp_path / "tablet", expected_package("bob", ANDROID))


def test_two_users_on_two_device_types_get_four_different_packages(
    stack: Stack, tmp_path: Path
) -> None:
    packages = {}
    for user in ("alice", "bob"):
        for device_type in (ANDROID, WINDOWS):
            target = tmp_path / f"{user}-{device_type}"
            provision(stack, target, user, device_type)
            packages[user, device_type] = (target / "current").resolve().name
    assert len(set(packages.values())) == 4, packages
    bob_android = expected_package("bob", ANDROID)
    assert bob_android.apps == {"client": "5.0.0", "maps": "2.3"}  # pinned, and the group's app
    assert expected_package("bob", WINDOWS).apps == {"client": "5.0.0"}  # maps is Android only
    assert expected_package("alice", WINDOWS).apps == {"client": "5.1.0"}  # the newest


# --- failures that must leave the installed client alone ---------------------------------------


def test_a_wrong_password_installs_nothing(stack: Stack, mitm: Mitm, tmp_path: Path) -> None:
    target = tmp_path / "device"
    provision(stack, target, "alice", ANDROID)
    before = client_snapshot(target)

    run = stack.bootloader(
        by_alias(stack, "alice", ANDROID, mitm.url), target, password="not-the-password"
    )

    assert run.code == 5, run
    assert run.line.startswith("csc-bootloader: logon failed: wrong user name or password")
    assert "(request " in run.line
    assert client_snapshot(target) == before
    assert mitm.downloads() == []
    assert not any((target / ".partial").iterdir())


def test_a_download_cut_off_halfway_keeps_the_client_and_resumes(
    stack: Stack, mitm: Mitm, tmp_path: Path
) -> None:
    target = tmp_path / "device"
    provision(stack, target, "alice", ANDROID)
    before = client_snapshot(target)
    half = MAPS_TILES_SIZE // 2
    mitm.cut_after = half

    cut = stack.bootloader(
        by_alias(stack, "bob", ANDROID, mitm.url), target, password=PASSWORDS["bob"]
    )

    assert cut.code == 6, cut
    assert (
        "download failed: the connection to the portal of acme@example.com broke off after"
        in cut.line
    )
    assert "run again to resume" in cut.line
    assert client_snapshot(target) == before
    [partial] = (target / ".partial").iterdir()
    assert partial.stat().st_size == half
    [first] = mitm.downloads()
    assert first.outcome == "cut" and first.status == 200

    resumed = stack.bootloader(
        by_alias(stack, "bob", ANDROID, mitm.url), target, password=PASSWORDS["bob"]
    )

    assert resumed.code == 0, resumed
    assert "Replaced the previous release" in resumed.out
    check_installation(target, expected_package("bob", ANDROID))
    second = mitm.downloads()[-1]
    assert second.headers["range"] == f"bytes={half}-"
    assert second.headers["if-range"] == f'"{partial.stem}"'
    assert second.status == 206
    assert first.length is not None and first.length > 2 * half
    assert second.body_bytes == first.length - half  # only the rest travelled again
    assert (target / "current").resolve().name == partial.stem
    assert not partial.exists()


@pytest.mark.parametrize(
    ("forgery", "message"),
    [
        (alter_file, "does not match its SHA-256 in the manifest (tampered with?)"),
        (forge_manifest, "the package's signature does not match the portal's key"),
    ],
    ids=["a-file-changed", "file-and-manifest-changed"],
)
def test_a_forged_package_is_refused(
    stack: Stack, mitm: Mitm, tmp_path: Path, forgery: Callable[[bytes], bytes], message: str
) -> None:
    target = tmp_path / "device"
    provision(stack, target, "alice", ANDROID)
    before = client_snapshot(target)
    mitm.forge = forgery

    run = stack.bootloader(
        by_alias(stack, "alice", ANDROID, mitm.url), target, password=PASSWORDS["alice"]
    )

    assert run.code == 7, run
    assert run.line.startswith("csc-bootloader: verify failed: ") and message in run.line
    assert [x.outcome for x in mitm.downloads()] == ["forged"]
    assert client_snapshot(target) == before
    assert not any((target / ".partial").iterdir())  # bytes that failed are not resumed from


def test_an_impostor_key_is_refused_before_any_credential_is_sent(
    stack: Stack, mitm: Mitm, tmp_path: Path
) -> None:
    target = tmp_path / "device"
    provision(stack, target, "alice", ANDROID)
    before = client_snapshot(target)
    impostor = Ed25519PrivateKey.generate()
    mitm.impostor = impostor
    sms = stack.sms("--user", "alice", "--alias", stack.alias)

    with_key = stack.bootloader(
        ["--sms", sms, "--csc", mitm.url, "--device-type", ANDROID],
        tmp_path / "new-device",
        password=PASSWORDS["alice"],
    )
    without_key = stack.bootloader(
        by_alias(stack, "alice", ANDROID, mitm.url), target, password=PASSWORDS["alice"]
    )

    assert with_key.code == 4, with_key
    assert f"has the key {fingerprint(impostor)}, not the " in with_key.line
    assert not (tmp_path / "new-device/current").exists()
    assert without_key.code == 4, without_key
    assert "but the installed client came from the key" in without_key.line
    assert client_snapshot(target) == before
    assert not any(x.path.endswith("/v1/logon") for x in mitm.exchanges())


# --- clear messages ------------------------------------------------------------------------------


def _dead_port(holder: list[socket.socket]) -> int:
    """A port that refuses connections (bound, never listening) while ``holder`` keeps it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    holder.append(sock)
    return int(sock.getsockname()[1])


def _csc_admin(stack: Stack, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "csc", "admin", "--state-dir", str(stack.csc.state_dir), *args],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        check=True,
        timeout=scaled(60),
    )


def test_each_failure_has_its_own_message_and_exit_status(stack: Stack, tmp_path: Path) -> None:
    """An offline portal (alias assigned, no agent), an unknown alias, a portal that is down
    behind its agent or behind the DMZ proxy, and both Alias and Host in one configuration."""
    procs: ProcFactory = stack.procs
    holder: list[socket.socket] = []
    try:
        _csc_admin(stack, "tenants", "create", "globex", "--contact", "it@globex.example")
        _csc_admin(stack, "aliases", "assign", "globex", "globex@example.com")
        down = f"http://127.0.0.1:{_dead_port(holder)}"
        token = issue_token(stack.csc.state_dir, "initech", "initech@example.com")
        procs.agent(stack.csc.http_url, token, down, env={"CSC_AGENT_LOG_LEVEL": "error"})
        dead_proxy = spawn_dmz_proxy(procs, down)
        wait_alias_online(stack.csc.http_url, "initech@example.com")
        both = tmp_path / "both.ini"
        both.write_text(f"Alias = {stack.alias}\nHost = 127.0.0.1\nPort = 8443\n")
        csc = stack.csc.http_url
        host, port = dead_proxy.addr
        cases = {
            "offline": ["--alias", "globex@example.com", "--csc", csc],
            "unknown": ["--alias", "nobody@example.com", "--csc", csc],
            "down-behind-agent": ["--alias", "initech@example.com", "--csc", csc],
            "down-behind-proxy": ["--host", host, "--port", str(port)],
            "both-in-file": ["--config-file", str(both)],
            "both-in-sms": ["--sms", "Alias: a@example.com Host: h Port: 1 cdzprov"],
        }
        runs = {
            name: stack.bootloader(
                [*args, "--user", "alice"], tmp_path / name, password=PASSWORDS["alice"]
            )
            for name, args in cases.items()
        }
    finally:
        for sock in holder:
            sock.close()

    expected = {
        "offline": (3, "resolve failed: the portal of globex@example.com is offline; try again in"),
        "unknown": (3, "resolve failed: no portal is registered for the alias nobody@example.com"),
        "down-behind-agent": (4, "connect failed: the portal of initech@example.com cannot be "),
        "down-behind-proxy": (4, f"connect failed: the portal of {host}:{port} cannot be reached"),
        "both-in-file": (2, f"config: both Alias and Host are set in {both}; a configuration "),
        "both-in-sms": (2, "config: both Alias and Host are set in the SMS"),
    }
    for name, (code, text) in expected.items():
        run = runs[name]
        assert run.code == code, run
        assert run.line.startswith(f"csc-bootloader: {text}"), run
        assert "Traceback" not in run.err
        assert not (tmp_path / name / "current").exists()
    assert "; for help, contact globex: it@globex.example (request " in runs["offline"].line
    assert len({run.line for run in runs.values()}) == len(runs)
