"""``csc-portal``: the admin commands in process (exit codes, messages, JSON), and real
processes: ``serve`` with a ready file answering a logon and stopping on SIGTERM, and a large
package streamed from disk with bounded memory."""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from portal import cli, store
from portal.db import Database
from portal.passwords import Passwords
from tests.support.portal import fake_bootloader
from tests.support.procs import REPO_ROOT, ProcFactory, child_env, http_request, scaled

PASSWORD = "a long password"


class Terminal(io.StringIO):
    """A stdin that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


class Portal:
    """Runs ``csc-portal`` in process against one state directory, capturing its output."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "state"
        self.env = {
            "CSC_PORTAL_STATE_DIR": str(self.state),
            "CSC_PORTAL_PASSWORD_HASH_COST": "test",
        }

    def __call__(self, *argv: str, stdin: str = "", tty: bool = False) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        saved = sys.stdin
        sys.stdin = Terminal(stdin) if tty else io.StringIO(stdin)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = cli.main(list(argv), env=self.env)
        finally:
            sys.stdin = saved
        return code, out.getvalue(), err.getvalue()

    def ok(self, *argv: str, stdin: str = "", tty: bool = False) -> str:
        code, out, err = self(*argv, stdin=stdin, tty=tty)
        assert code == 0, err
        return out

    def json(self, *argv: str) -> Any:
        return json.loads(self.ok(*argv, "--json"))


def _setup(portal: Portal) -> None:
    portal.ok("device-type", "add", "android-arm64", "--description", "Android phones")
    portal.ok("group", "add", "field")
    portal.ok("user", "add", "alice", "--group", "field", "--password-stdin", stdin=PASSWORD + "\n")
    app = portal.root / "dist"
    (app / "bin").mkdir(parents=True)
    (app / "bin" / "run").write_text("#!/bin/sh\n")
    portal.ok(
        "app", "add", "client", "--version", "5.1.0", "--device-type", "android-arm64", str(app)
    )
    portal.ok("policy", "set", "base", "sync-interval=15m", "colour=blue")
    portal.ok("deploy", "app", "client", "--group", "field")
    portal.ok("deploy", "policy", "base", "--user", "alice")


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory set up once by :func:`_setup` (through the real commands)."""
    portal = Portal(tmp_path_factory.mktemp("template"))
    _setup(portal)
    return portal.root


@pytest.fixture
def portal(tmp_path: Path) -> Portal:
    return Portal(tmp_path)


@pytest.fixture
def seeded(template: Path, tmp_path: Path) -> Portal:
    """A portal with the template's data (its own copy)."""
    shutil.copytree(template, tmp_path, dirs_exist_ok=True)
    return Portal(tmp_path)


def test_read_only_commands_never_create_the_state(portal: Portal) -> None:
    """A listing on a missing state directory names it and creates nothing."""
    for argv in (
        ("user", "list"),
        ("group", "list"),
        ("device-type", "list"),
        ("app", "list"),
        ("policy", "list"),
        ("deployments",),
        ("devices",),
        ("key", "show"),
        ("sms", "--alias", "acme@example.com"),
        ("user", "remove", "alice"),
    ):
        code, _, err = portal(*argv)
        assert code == 1, argv
        assert f"no portal state in {portal.state} (portal.db is missing)" in err, err
        assert "--state-dir" in err and "CSC_PORTAL_STATE_DIR" in err
        assert not portal.state.exists(), argv


def test_first_use_creates_database_and_key(portal: Portal) -> None:
    code, out, err = portal("device-type", "add", "linux-x64")
    assert code == 0
    assert "created the portal key" in err and "database" in err
    code, out, err = portal("key", "show")
    assert code == 0
    assert (portal.state / "portal-key.pem").stat().st_mode & 0o777 == 0o600
    assert (portal.state / "portal.db").is_file()
    shown = portal.json("key", "show")
    assert f"fingerprint: {shown['fingerprint']}" in out
    assert portal("key", "show")[2] == ""  # nothing created the second time


def test_users_groups_and_lists(portal: Portal) -> None:
    _setup(portal)
    [alice] = portal.json("user", "list")
    assert (alice["name"], alice["groups"], alice["devices"]) == ("alice", ["field"], 0)
    assert portal.json("group", "list")[0]["members"] == ["alice"]
    [version] = portal.json("app", "list")
    assert (version["name"], version["version"], version["files"]) == ("client", "5.1.0", 1)
    assert portal.json("policy", "list") == [
        {"name": "base", "settings": {"colour": "blue", "sync-interval": "15m"}}
    ]
    kinds = {(d["kind"], d["target"]) for d in portal.json("deployments")}
    assert kinds == {("app", "field"), ("policy", "alice")}
    assert "alice  field" in portal.ok("user", "list")
    assert portal.json("devices") == []
    portal.ok("group", "remove-member", "field", "alice")
    assert portal.json("group", "list")[0]["members"] == []


@pytest.mark.parametrize(
    ("argv", "stdin", "code", "message"),
    [
        (["user", "add", "bob"], "", 2, "no password"),
        (["user", "add", "bob", "--password-stdin"], "short\n", 2, "at least 8"),
        (["user", "add", "bob b", "--password-stdin"], PASSWORD, 2, "not a valid user name"),
        (["user", "add", "alice", "--password-stdin"], PASSWORD, 1, "already exists"),
        (["user", "add", "bob", "--group", "nope", "--password-stdin"], PASSWORD, 1, "no group"),
        (["user", "remove", "carol"], "", 1, "no user named 'carol'"),
        (["user", "passwd", "carol", "--password-stdin"], PASSWORD, 1, "no user"),
        (["group", "add", "field"], "", 1, "already exists"),
        (["group", "add-member", "field", "carol"], "", 1, "no user"),
        (["device-type", "remove", "android-arm64"], "", 1, "client@5.1.0"),
        (["deploy", "app", "client@9", "--user", "alice"], "", 1, "no version '9'"),
        (["deploy", "app", "client@", "--user", "alice"], "", 2, "must follow '@'"),
        (["deploy", "app", "ghost", "--user", "alice"], "", 1, "no app named 'ghost'"),
        (["deploy", "app", "client"], "", 2, "one of the arguments --user --group"),
        (["undeploy", "policy", "base", "--group", "field"], "", 1, "not deployed"),
        (["policy", "set", "p", "novalue"], "", 2, "not KEY=VALUE"),
        (["app", "remove", "client@1.0"], "", 1, "no such version"),
        (["sms", "--user", "alice", "--alias", "a@b.c", "--get-url", "http://x/"], "", 0, ""),
        (["sms", "--alias", "a@b.c"], "", 2, "--get-url"),
        (["sms", "--get-url", "http://x/"], "", 2, "needs an alias or a proxy"),
        (["sms", "--alias", "a@b.c", "--host", "h", "--port", "1"], "", 2, "not both"),
        (["sms", "--host", "h", "--get-url", "http://x/"], "", 2, "go together"),
        (["sms", "--alias", "bad alias", "--get-url", "http://x/"], "", 2, "not a valid alias"),
        (
            ["sms", "--user", "carol", "--alias", "a@b.c", "--get-url", "http://x/"],
            "",
            1,
            "no user",
        ),
        (["sms", "--alias", "a@b.c", "--get-url", "ftp://x/"], "", 2, "configuration error"),
        (["user"], "", 2, "ACTION"),
        (["bogus"], "", 2, "invalid choice"),
    ],
)
def test_errors_have_clear_messages_and_codes(
    seeded: Portal, argv: list[str], stdin: str, code: int, message: str
) -> None:
    portal = seeded
    got, _, err = portal(*argv, stdin=stdin)
    assert got == code, err
    assert message in err
    assert "Traceback" not in err


def test_app_add_refuses_escaping_symlinks_and_duplicates(seeded: Portal, tmp_path: Path) -> None:
    portal = seeded
    evil = tmp_path / "evil"
    evil.mkdir()
    os.symlink("/etc/passwd", evil / "passwd")
    code, _, err = portal(
        "app", "add", "x", "--version", "1", "--device-type", "android-arm64", str(evil)
    )
    assert code == 2 and "outside" in err
    dist = str(tmp_path / "dist")
    code, _, err = portal(
        "app", "add", "client", "--version", "5.1.0", "--device-type", "android-arm64", dist
    )
    assert code == 1 and "immutable" in err
    code, _, err = portal(
        "app", "add", "client", "--version", "6", "--device-type", "toaster", dist
    )
    assert code == 1 and "no device type named 'toaster'" in err


def test_password_sources(portal: Portal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD + "\nsecond line ignored\n")
    portal.ok("user", "add", "bob", "--password-file", str(secret))
    portal.ok("user", "add", "carol", "--password", PASSWORD)
    answers = iter([PASSWORD, PASSWORD + "!"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
    code, _, err = portal("user", "passwd", "bob", tty=True)
    assert code == 2 and "differ" in err
    answers = iter(["another password"] * 2)
    portal.ok("user", "passwd", "bob", tty=True)
    with Database(portal.state).connect() as conn:
        stored = store.credentials(conn, "bob")
    assert stored is not None
    assert Passwords("test").verify(stored.password_hash, "another password").ok
    code, _, err = portal("user", "add", "dave", "--password", PASSWORD, "--password-stdin")
    assert code == 2 and "not allowed with argument" in err


def test_sms_text_and_length_warning(seeded: Portal, tmp_path: Path) -> None:
    portal = seeded
    fp = portal.json("key", "show")["fingerprint"]
    out = portal.ok(
        "sms",
        "--user",
        "Alice",
        "--host",
        "dmz.example.com",
        "--port",
        "8443",
        "--get-url",
        "https://p.example/get/",
    )
    assert out == (
        f"Get the client: https://p.example/get/ then User: alice Host: dmz.example.com "
        f"Port: 8443 cdzprov Key: {fp}\n"
    )
    portal.env["CSC_PORTAL_SMS_ALIAS"] = "ACME@example.com"
    portal.env["CSC_PORTAL_GET_URL"] = "https://portal.example/" + "g" * 80 + "/"
    code, out, err = portal("sms")
    assert code == 0 and "Alias: acme@example.com cdzprov" in out
    assert "warning:" in err and "2 parts" in err


def test_get_site_and_config_errors(seeded: Portal, tmp_path: Path) -> None:
    portal = seeded
    source = fake_bootloader(tmp_path / "bl")
    portal.ok("get-site", "--out", str(tmp_path / "site"), "--bootloader-source", str(source))
    assert (tmp_path / "site" / "android-arm64" / "index.html").is_file()
    assert (tmp_path / "site" / "csc-bootloader.pyz").stat().st_mode & 0o111
    code, _, err = portal(
        "get-site", "--out", str(tmp_path / "x"), "--bootloader-source", str(tmp_path)
    )
    assert code == 1 and "cli.py not found" in err
    portal.env["CSC_PORTAL_SESION_TTL"] = "5m"
    code, _, err = portal("user", "list")
    assert code == 2 and "did you mean 'CSC_PORTAL_SESSION_TTL'" in err


def test_a_database_from_a_newer_portal_is_refused(portal: Portal) -> None:
    portal.ok("group", "add", "field")
    with Database(portal.state).connect() as conn:
        conn.execute("PRAGMA user_version = 999")
    code, _, err = portal("user", "list")
    assert code == 1 and "newer than this csc-portal supports" in err


# --- real processes ------------------------------------------------------------------------


def _run(state: Path, *argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = child_env({"CSC_PORTAL_STATE_DIR": str(state), "CSC_PORTAL_PASSWORD_HASH_COST": "test"})
    return subprocess.run(
        [sys.executable, "-m", "portal", *argv],
        cwd=REPO_ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=scaled(60),
        check=False,
    )


def _serve(procs: ProcFactory, state: Path, tmp_path: Path) -> tuple[Any, str]:
    ready = tmp_path / "portal.ready.json"
    env = {"CSC_PORTAL_STATE_DIR": str(state), "CSC_PORTAL_PASSWORD_HASH_COST": "test"}
    proc = procs.spawn(
        "portal",
        [
            sys.executable,
            "-m",
            "portal",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--ready-file",
            str(ready),
        ],
        env=env,
        ready_file=ready,
    )
    return proc, f"http://{proc.ready['http']}"


def _logon(url: str, user: str = "alice") -> dict[str, Any]:
    body = {"user": user, "password": PASSWORD, "device_type": "android-arm64", "device_id": "d"}
    status, _, data = http_request(f"{url}/v1/logon", "POST", json.dumps(body).encode())
    assert status == 200, data
    result: dict[str, Any] = json.loads(data)
    return result


def test_subprocess_admin_and_serve(procs: ProcFactory, tmp_path: Path) -> None:
    state = tmp_path / "state"
    for argv, stdin in (
        (["device-type", "add", "android-arm64"], ""),
        (["user", "add", "alice", "--password-stdin"], PASSWORD + "\n"),
        (["policy", "set", "base", "k=v"], ""),
        (["deploy", "policy", "base", "--user", "alice"], ""),
    ):
        result = _run(state, *argv, stdin=stdin)
        assert result.returncode == 0, result.stderr
    assert _run(state, "user", "add", "alice", "--password-stdin", stdin=PASSWORD).returncode == 1
    proc, url = _serve(procs, state, tmp_path)
    logon = _logon(url)
    status, headers, body = http_request(
        f"{url}/{logon['package']['url']}",
        headers={"Authorization": f"Bearer {logon['session']}", "X-Request-Id": "sub-1"},
    )
    assert status == 200 and headers["X-Request-Id"] == "sub-1"
    assert hashlib.sha256(body).hexdigest() == logon["package"]["id"]
    devices = json.loads(_run(state, "devices", "--json").stdout)
    assert [d["user"] for d in devices] == ["alice"]
    proc.terminate()
    assert proc.wait(10) == 0
    assert logon["session"] not in proc.logs()[1] and PASSWORD not in proc.logs()[1]


def test_a_large_package_streams_with_bounded_memory(procs: ProcFactory, tmp_path: Path) -> None:
    size = 128 * 1024 * 1024
    big = tmp_path / "dist" / "data.bin"
    big.parent.mkdir()
    with open(big, "wb") as fh:
        block = hashlib.sha256(b"seed").digest() * 32768  # 1 MiB, not sparse
        for _ in range(size // len(block)):
            fh.write(block)
    state = tmp_path / "state"
    for argv, stdin in (
        (["device-type", "add", "android-arm64"], ""),
        (["user", "add", "alice", "--password-stdin"], PASSWORD),
        (
            [
                "app",
                "add",
                "big",
                "--version",
                "1",
                "--device-type",
                "android-arm64",
                str(big.parent),
            ],
            "",
        ),
        (["deploy", "app", "big", "--user", "alice"], ""),
    ):
        result = _run(state, *argv, stdin=stdin)
        assert result.returncode == 0, result.stderr
    big.unlink()
    proc, url = _serve(procs, state, tmp_path)
    logon = _logon(url)
    baseline = proc.rss()
    proc.reset_peak_rss()
    digest, received = hashlib.sha256(), 0
    request_headers = {"Authorization": f"Bearer {logon['session']}"}
    req = urllib.request.Request(f"{url}/{logon['package']['url']}", headers=request_headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=scaled(60)) as resp:
        while chunk := resp.read(1024 * 1024):
            digest.update(chunk)
            received += len(chunk)
    assert received == logon["package"]["size"] > size
    assert digest.hexdigest() == logon["package"]["id"]
    growth = proc.peak_rss() - baseline
    assert growth < 48 * 1024 * 1024, f"the server grew by {growth / 2**20:.0f} MiB"
