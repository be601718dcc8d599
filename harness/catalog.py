"""A small but complete portal catalog, as ``csc-portal`` commands, and what each device must get.

The end-to-end tests and ``python -m demo`` set up the portal the way an administrator would: the
same list of ``csc-portal`` command lines (:func:`portal_commands`), run through the command
line's entry point in this process (:func:`run_portal_cli`, :func:`seed_portal`; the demo also
writes them out as a shell script). The catalog:

* device types ``android-arm64`` and ``win-x64``; groups ``field`` (alice) and ``office`` (bob);
* app ``client`` 5.0.0 and 5.1.0 for both device types, app ``maps`` 2.3 (1 MiB) for Android only;
* policies ``base`` (to ``field``) and ``strict`` (to ``office``);
* ``client`` (newest) to ``field``; ``client@5.0.0`` pinned to bob; ``maps`` to ``office``.

:func:`expected_package` says which apps, versions, files and policies a user on a device type
must end up with, and :func:`check_installation` compares an installed ``DIR/current`` with that
and with its own signed manifest (every file listed, nothing else, sizes, SHA-256, modes).
Invariant: file contents are a pure function of (app, version, device type, path), so two
different packages never hold the same bytes by accident.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portal.cli import main

DEVICE_TYPES = {"android-arm64": "Android phones and tablets", "win-x64": "Windows laptops"}
GROUPS = {"alice": "field", "bob": "office"}
PASSWORDS = {"alice": "alice-demo-password", "bob": "bob-demo-password"}
POLICIES = {
    "base": {"sync-interval": "15m", "vpn": "on"},
    "strict": {"sync-interval": "5m", "camera": "off"},
}
POLICY_OF_GROUP = {"field": "base", "office": "strict"}
EXECUTABLE = 0o755
MAPS_TILES_SIZE = 1024 * 1024  # bob's Android package is about 1 MiB: big enough to cut in half


@dataclass(frozen=True)
class AppSource:
    """One app version for one device type: relative path -> (content, mode)."""

    name: str
    version: str
    device_type: str
    files: dict[str, tuple[bytes, int]]

    @property
    def key(self) -> str:
        return f"{self.name}-{self.version}-{self.device_type}"


def _content(app: str, version: str, device_type: str, path: str) -> bytes:
    return f"{app} {version} for {device_type}: {path}\n".encode()


def _client(version: str, device_type: str) -> AppSource:
    main = "bin/client" if device_type.startswith("android") else "client.exe"
    files = {
        main: (_content("client", version, device_type, main), EXECUTABLE),
        "etc/client.conf": (_content("client", version, device_type, "etc/client.conf"), 0o644),
    }
    return AppSource("client", version, device_type, files)


def app_sources() -> list[AppSource]:
    """Every app version of the catalog."""
    apps = [_client(v, t) for v in ("5.0.0", "5.1.0") for t in DEVICE_TYPES]
    tiles = random.Random("maps 2.3").randbytes(MAPS_TILES_SIZE)
    maps = {"share/tiles.db": (tiles, 0o644)}
    apps.append(AppSource("maps", "2.3", "android-arm64", maps))
    return apps


def write_sources(root: Path, apps: Sequence[AppSource]) -> dict[str, Path]:
    """Write each app version's files under ``root/<key>/``; returns key -> directory."""
    dirs: dict[str, Path] = {}
    for app in apps:
        base = root / app.key
        for rel, (content, mode) in app.files.items():
            path = base / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            path.chmod(mode)
        dirs[app.key] = base
    return dirs


def portal_commands(sources: Path) -> list[list[str]]:
    """The ``csc-portal`` command lines (without the program name) that build the catalog.

    App sources are written below ``sources``. Users are created with ``--password-stdin``;
    the caller feeds :data:`PASSWORDS` (see :func:`password_for_command`)."""
    dirs = write_sources(sources, app_sources())
    commands = [
        ["device-type", "add", name, "--description", text] for name, text in DEVICE_TYPES.items()
    ]
    commands += [["group", "add", group] for group in sorted(set(GROUPS.values()))]
    commands += [
        ["user", "add", user, "--group", group, "--password-stdin"]
        for user, group in GROUPS.items()
    ]
    for app in app_sources():
        version = ["--version", app.version, "--device-type", app.device_type]
        commands.append(["app", "add", app.name, *version, str(dirs[app.key])])
    for name, settings in POLICIES.items():
        commands.append(["policy", "set", name, *(f"{k}={v}" for k, v in settings.items())])
    commands += [
        ["deploy", "app", "client", "--group", "field"],
        ["deploy", "app", "client@5.0.0", "--user", "bob"],
        ["deploy", "app", "maps", "--group", "office"],
    ]
    commands += [
        ["deploy", "policy", policy, "--group", group] for group, policy in POLICY_OF_GROUP.items()
    ]
    return commands


def password_for_command(argv: Sequence[str]) -> str | None:
    """The stdin a catalog command needs: the user's password for ``user add``, else None."""
    if list(argv[:2]) == ["user", "add"] and argv[2] in PASSWORDS:
        return PASSWORDS[argv[2]] + "\n"
    return None


def run_portal_cli(argv: Sequence[str], env: Mapping[str, str], stdin: str = "") -> str:
    """``csc-portal ARGV`` in this process with its own streams; returns stdout, raises on failure."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv), env=env)
    finally:
        sys.stdin = saved
    if code != 0:
        raise RuntimeError(f"csc-portal {' '.join(argv)} exited {code}: {err.getvalue()}")
    return out.getvalue()


def seed_portal(
    env: Mapping[str, str], sources: Path, extra: Sequence[Sequence[str]] = ()
) -> list[list[str]]:
    """Run the catalog's commands, then ``extra`` ones, against the portal of ``env``;
    returns every command run."""
    commands = [*portal_commands(sources), *(list(argv) for argv in extra)]
    for argv in commands:
        run_portal_cli(argv, env, password_for_command(argv) or "")
    return commands


# --- what a device must get ----------------------------------------------------------------


@dataclass(frozen=True)
class ExpectedPackage:
    user: str
    device_type: str
    apps: dict[str, str]  # name -> version
    files: dict[str, tuple[bytes, int]]  # installed path -> (content, mode)
    policies: dict[str, str]


def expected_package(user: str, device_type: str) -> ExpectedPackage:
    """The package the catalog's deployments give ``user`` on ``device_type``."""
    wanted = {"client": "5.1.0"} if user == "alice" else {"client": "5.0.0", "maps": "2.3"}
    apps: dict[str, str] = {}
    files: dict[str, tuple[bytes, int]] = {}
    for app in app_sources():
        if app.device_type == device_type and wanted.get(app.name) == app.version:
            apps[app.name] = app.version
            files.update({f"{app.name}/{rel}": spec for rel, spec in app.files.items()})
    return ExpectedPackage(user, device_type, apps, files, POLICIES[POLICY_OF_GROUP[GROUPS[user]]])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def installed_files(release: Path) -> list[str]:
    """Relative paths of the regular files of a release, without its ``.csc/`` metadata."""
    found = []
    for dirpath, _, filenames in os.walk(release):
        for name in filenames:
            rel = Path(dirpath, name).relative_to(release).as_posix()
            if not rel.startswith(".csc/"):
                found.append(rel)
    return sorted(found)


def check_against_manifest(target: Path) -> dict[str, Any]:
    """Assert that ``target/current`` holds exactly the files of its manifest, each with the
    manifest's size, SHA-256 and mode; returns the manifest."""
    release = (target / "current").resolve()
    manifest: dict[str, Any] = json.loads((release / ".csc/manifest.json").read_bytes())
    listed = {f["path"]: f for app in manifest["apps"] for f in app["files"]}
    assert installed_files(release) == sorted(listed), "installed files differ from the manifest"
    for path, entry in listed.items():
        file = release / path
        assert file.stat().st_size == entry["size"], path
        assert file.stat().st_mode & 0o777 == entry["mode"], path
        assert _sha256(file) == entry["sha256"], path
    return manifest


def check_installation(target: Path, expected: ExpectedPackage) -> dict[str, Any]:
    """Assert the installation in ``target`` is the expected package, and matches its manifest."""
    manifest = check_against_manifest(target)
    assert (manifest["user"], manifest["device_type"]) == (expected.user, expected.device_type)
    assert {a["name"]: a["version"] for a in manifest["apps"]} == expected.apps
    assert manifest["policies"] == expected.policies
    release = (target / "current").resolve()
    for path, (content, mode) in expected.files.items():
        assert (release / path).read_bytes() == content, path
        assert (release / path).stat().st_mode & 0o777 == mode, path
    assert installed_files(release) == sorted(expected.files)
    return manifest


def client_snapshot(target: Path) -> tuple[str, str, list[str]]:
    """What a failed run must leave exactly as it was: where ``current`` points, every byte and
    mode of that release, and the set of releases."""
    link = os.readlink(target / "current")
    release = (target / "current").resolve()
    return link, tree_hash(release), sorted(p.name for p in (target / "releases").iterdir())


def tree_hash(root: Path) -> str:
    """A hash over every name, type, mode, content and symlink target below ``root``."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if path.is_symlink():
                digest.update(f"L {rel} -> {os.readlink(path)}\n".encode())
            elif path.is_dir():
                digest.update(f"D {rel} {st.st_mode & 0o7777:o}\n".encode())
            else:
                content = hashlib.sha256(path.read_bytes()).hexdigest()
                digest.update(f"F {rel} {st.st_mode & 0o7777:o} {content}\n".encode())
    return digest.hexdigest()
