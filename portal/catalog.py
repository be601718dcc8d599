"""Applications, policies and deployments, and what a user's device should receive.

An application version is identified by (app name, version, device type) and is immutable: its
files (content-addressed blobs, see :mod:`portal.blobs`) are recorded once and never changed.

Deployment resolution (:func:`plan_package`), for one user and one device type:

* **Apps.** Every app deployed to the user or to one of the user's groups is considered. The
  user's own deployment decides when there is one; otherwise the group deployments do: if any of
  them pins a version, the newest of the pinned versions wins, else the newest version. Only
  versions that exist for the device type count; an app with none is left out.
* **Newest** means the highest version by :func:`version_key` (dot-separated parts, numbers
  compared as numbers, a ``-suffix`` marks a pre-release that sorts before the plain version,
  ``+build`` is ignored); on a tie the version added last wins.
* **Policies.** Settings are merged in this order, each one overriding the keys of those before:
  group deployments (groups in name order, then policies in name order), then the user's own
  deployments (policies in name order). So a user deployment always beats a group one.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from portal.db import transaction
from portal.store import (
    AlreadyExists,
    InUse,
    InvalidValue,
    NotFound,
    TargetKind,
    check_name,
    device_type_id,
    now,
    target_id,
    user_groups,
)

_VERSION_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}")
_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_VALUE = 4096


def check_version(raw: str) -> str:
    version = raw.strip()
    if _VERSION_RE.fullmatch(version) is None:
        raise InvalidValue(
            f"{raw!r} is not a valid version (letters, digits, '.', '+', '_', '-'; "
            "at most 64 characters, e.g. 5.1.0)"
        )
    return version


def check_setting(key: str, value: str) -> tuple[str, str]:
    if _KEY_RE.fullmatch(key) is None:
        raise InvalidValue(
            f"{key!r} is not a valid policy key (letters, digits, '.', '_', '-'; "
            "at most 128 characters)"
        )
    if len(value) > MAX_VALUE or "\x00" in value:
        raise InvalidValue(
            f"the value of {key!r} must be at most {MAX_VALUE} characters, without NUL"
        )
    return key, value


def _part_key(part: str) -> tuple[int, int, str]:
    return (1, int(part), "") if part.isdigit() else (0, 0, part)


def version_key(version: str) -> tuple[tuple[tuple[int, int, str], ...], tuple[object, ...]]:
    """A sort key: ``1.10 > 1.9``, ``2.0-rc1 < 2.0``, ``+build`` metadata ignored."""
    main, _, pre = version.partition("+")[0].partition("-")
    release = tuple(_part_key(p) for p in main.split("."))
    pre_key: tuple[object, ...] = (
        (1,) if not pre else (0, tuple(_part_key(p) for p in pre.split(".")))
    )
    return release, pre_key


def newest(versions: Sequence[str]) -> str | None:
    """The newest of ``versions`` (given oldest-added first); None when empty."""
    if not versions:
        return None
    best = max(range(len(versions)), key=lambda i: (version_key(versions[i]), i))
    return versions[best]


# --- apps ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of an app version: its path in the package, content hash, size and mode."""

    path: str
    sha256: str
    size: int
    mode: int


@dataclass(frozen=True, slots=True)
class AppVersionInfo:
    name: str
    version: str
    device_type: str
    files: int
    size: int
    created_at: float


def add_app_version(
    conn: sqlite3.Connection, name: str, version: str, device_type: str, files: Sequence[FileEntry]
) -> str:
    """Record a new app version; an existing (name, version, device type) is an error."""
    name = check_name(name, "app")
    version = check_version(version)
    if not files:
        raise InvalidValue("an app version needs at least one file")
    with transaction(conn):
        dtid = device_type_id(conn, device_type)
        row = conn.execute("SELECT id FROM apps WHERE name = ?", (name,)).fetchone()
        if row is None:
            app_id = conn.execute(
                "INSERT INTO apps (name, created_at) VALUES (?, ?)", (name, now())
            ).lastrowid
        else:
            app_id = int(row["id"])
        if conn.execute(
            "SELECT 1 FROM app_versions WHERE app_id = ? AND version = ? AND device_type_id = ?",
            (app_id, version, dtid),
        ).fetchone():
            raise AlreadyExists(
                f"{name} {version} for {check_name(device_type, 'device type')} already exists; "
                "app versions are immutable: add a new version"
            )
        vid = conn.execute(
            "INSERT INTO app_versions (app_id, version, device_type_id, created_at) "
            "VALUES (?, ?, ?, ?)",
            (app_id, version, dtid, now()),
        ).lastrowid
        conn.executemany(
            "INSERT INTO app_files (version_id, path, sha256, size, mode) VALUES (?, ?, ?, ?, ?)",
            [(vid, f.path, f.sha256, f.size, f.mode) for f in files],
        )
    return name


def list_app_versions(conn: sqlite3.Connection) -> list[AppVersionInfo]:
    rows = conn.execute(
        """
        SELECT a.name, v.version, t.name AS device_type, v.created_at,
               count(f.path) AS files, coalesce(sum(f.size), 0) AS size
        FROM app_versions v JOIN apps a ON a.id = v.app_id
        JOIN device_types t ON t.id = v.device_type_id
        LEFT JOIN app_files f ON f.version_id = v.id
        GROUP BY v.id ORDER BY a.name, t.name, v.id
        """
    ).fetchall()
    return [
        AppVersionInfo(
            r["name"],
            r["version"],
            r["device_type"],
            int(r["files"]),
            int(r["size"]),
            float(r["created_at"]),
        )
        for r in rows
    ]


def _app_id(conn: sqlite3.Connection, name: str) -> int:
    name = check_name(name, "app")
    row = conn.execute("SELECT id FROM apps WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise NotFound(f"no app named {name!r}")
    return int(row["id"])


def remove_app(
    conn: sqlite3.Connection,
    name: str,
    version: str | None = None,
    device_type: str | None = None,
) -> int:
    """Remove versions of an app (all, one version, and/or one device type's); returns how many.

    When no version is left, the app and its deployments go too. A version pinned by a
    deployment cannot be removed while other versions remain.
    """
    with transaction(conn):
        app_id = _app_id(conn, name)
        sql = "SELECT id, version FROM app_versions WHERE app_id = ?"
        args: list[object] = [app_id]
        if version is not None:
            sql, args = sql + " AND version = ?", [*args, check_version(version)]
        if device_type is not None:
            sql, args = sql + " AND device_type_id = ?", [*args, device_type_id(conn, device_type)]
        doomed = conn.execute(sql, args).fetchall()
        if not doomed:
            raise NotFound(f"app {check_name(name, 'app')!r} has no such version")
        conn.executemany("DELETE FROM app_versions WHERE id = ?", [(r["id"],) for r in doomed])
        left = {
            r["version"]
            for r in conn.execute("SELECT version FROM app_versions WHERE app_id = ?", (app_id,))
        }
        if not left:
            conn.execute("DELETE FROM apps WHERE id = ?", (app_id,))
            return len(doomed)
        _check_pins(conn, app_id, left)
    return len(doomed)


def _check_pins(conn: sqlite3.Connection, app_id: int, left: set[str]) -> None:
    pinned = conn.execute(
        "SELECT DISTINCT version FROM deployments WHERE app_id = ? AND version IS NOT NULL",
        (app_id,),
    ).fetchall()
    gone = sorted(r["version"] for r in pinned if r["version"] not in left)
    if gone:
        raise InUse(
            f"version {', '.join(gone)} is pinned by a deployment: re-deploy or undeploy it first"
        )


# --- policies ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    name: str
    settings: dict[str, str]


def set_policy(conn: sqlite3.Connection, name: str, settings: Mapping[str, str]) -> bool:
    """Create a policy or update its keys; returns whether it was created."""
    name = check_name(name, "policy")
    checked = [check_setting(k, v) for k, v in settings.items()]
    with transaction(conn):
        row = conn.execute("SELECT id FROM policies WHERE name = ?", (name,)).fetchone()
        created = row is None
        pid = (
            conn.execute(
                "INSERT INTO policies (name, created_at) VALUES (?, ?)", (name, now())
            ).lastrowid
            if row is None
            else int(row["id"])
        )
        conn.executemany(
            "INSERT INTO policy_settings (policy_id, key, value) VALUES (?, ?, ?) "
            "ON CONFLICT (policy_id, key) DO UPDATE SET value = excluded.value",
            [(pid, k, v) for k, v in checked],
        )
    return created


def _policy_id(conn: sqlite3.Connection, name: str) -> int:
    name = check_name(name, "policy")
    row = conn.execute("SELECT id FROM policies WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise NotFound(f"no policy named {name!r}")
    return int(row["id"])


def unset_policy_keys(conn: sqlite3.Connection, name: str, keys: Iterable[str]) -> None:
    with transaction(conn):
        pid = _policy_id(conn, name)
        for key in keys:
            cur = conn.execute(
                "DELETE FROM policy_settings WHERE policy_id = ? AND key = ?", (pid, key)
            )
            if not cur.rowcount:
                raise NotFound(f"policy {check_name(name, 'policy')!r} has no key {key!r}")


def remove_policy(conn: sqlite3.Connection, name: str) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM policies WHERE id = ?", (_policy_id(conn, name),))


def _settings(conn: sqlite3.Connection, pid: int) -> dict[str, str]:
    rows = conn.execute(
        "SELECT key, value FROM policy_settings WHERE policy_id = ? ORDER BY key", (pid,)
    )
    return {r["key"]: r["value"] for r in rows}


def list_policies(conn: sqlite3.Connection) -> list[PolicyInfo]:
    rows = conn.execute("SELECT id, name FROM policies ORDER BY name").fetchall()
    return [PolicyInfo(r["name"], _settings(conn, int(r["id"]))) for r in rows]


# --- deployments ---------------------------------------------------------------------------

Kind = Literal["app", "policy"]


@dataclass(frozen=True, slots=True)
class DeploymentInfo:
    kind: Kind
    name: str
    version: str | None
    target_kind: TargetKind
    target: str


def _target_column(kind: TargetKind) -> str:
    return "user_id" if kind == "user" else "group_id"


def deploy(
    conn: sqlite3.Connection,
    kind: Kind,
    name: str,
    target_kind: TargetKind,
    target: str,
    version: str | None = None,
) -> str:
    """Assign an app (optionally pinned) or a policy; returns "added", "updated" or "unchanged"."""
    with transaction(conn):
        item = _app_id(conn, name) if kind == "app" else _policy_id(conn, name)
        if version is not None:
            version = check_version(version)
            if not conn.execute(
                "SELECT 1 FROM app_versions WHERE app_id = ? AND version = ?", (item, version)
            ).fetchone():
                raise NotFound(f"app {check_name(name, 'app')!r} has no version {version!r}")
        tid = target_id(conn, target_kind, target)
        column, tcol = f"{kind}_id", _target_column(target_kind)
        row = conn.execute(
            f"SELECT id, version FROM deployments WHERE {column} = ? AND {tcol} = ?", (item, tid)
        ).fetchone()
        if row is None:
            conn.execute(
                f"INSERT INTO deployments ({column}, version, {tcol}, created_at) "
                "VALUES (?, ?, ?, ?)",
                (item, version, tid, now()),
            )
            return "added"
        if row["version"] == version:
            return "unchanged"
        conn.execute("UPDATE deployments SET version = ? WHERE id = ?", (version, row["id"]))
        return "updated"


def undeploy(
    conn: sqlite3.Connection, kind: Kind, name: str, target_kind: TargetKind, target: str
) -> None:
    with transaction(conn):
        item = _app_id(conn, name) if kind == "app" else _policy_id(conn, name)
        tid = target_id(conn, target_kind, target)
        cur = conn.execute(
            f"DELETE FROM deployments WHERE {kind}_id = ? AND {_target_column(target_kind)} = ?",
            (item, tid),
        )
        if not cur.rowcount:
            raise NotFound(
                f"{kind} {check_name(name, kind)!r} is not deployed to {target_kind} {target!r}"
            )


def list_deployments(conn: sqlite3.Connection) -> list[DeploymentInfo]:
    rows = conn.execute(
        """
        SELECT CASE WHEN d.app_id IS NULL THEN 'policy' ELSE 'app' END AS kind,
               coalesce(a.name, p.name) AS name, d.version,
               CASE WHEN d.user_id IS NULL THEN 'group' ELSE 'user' END AS target_kind,
               coalesce(u.name, g.name) AS target
        FROM deployments d
        LEFT JOIN apps a ON a.id = d.app_id LEFT JOIN policies p ON p.id = d.policy_id
        LEFT JOIN users u ON u.id = d.user_id LEFT JOIN groups g ON g.id = d.group_id
        ORDER BY kind, name, target_kind, target
        """
    ).fetchall()
    return [
        DeploymentInfo(r["kind"], r["name"], r["version"], r["target_kind"], r["target"])
        for r in rows
    ]


# --- resolution ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResolvedApp:
    name: str
    version: str
    files: tuple[FileEntry, ...]


@dataclass(frozen=True, slots=True)
class PackagePlan:
    """Everything a package for (user, device type) holds, in canonical order."""

    user: str
    device_type: str
    apps: tuple[ResolvedApp, ...]
    policies: dict[str, str]


def pick_version(
    user_pin: tuple[str | None] | None, group_pins: Sequence[str | None], available: Sequence[str]
) -> str | None:
    """The version to install (see the module doc); ``user_pin`` is ``(pin,)`` when the user
    has a deployment of its own; ``available`` is oldest-added first."""
    if user_pin is not None:
        pinned = user_pin[0]
        if pinned is None:
            return newest(available)
        return pinned if pinned in available else None
    pins = {p for p in group_pins if p is not None}
    if pins:
        return newest([v for v in available if v in pins])
    return newest(available) if group_pins else None


def merge_policies(
    group_layers: Iterable[Mapping[str, str]], user_layers: Iterable[Mapping[str, str]]
) -> dict[str, str]:
    """Later layers override earlier ones; user layers come after every group layer."""
    merged: dict[str, str] = {}
    for layer in [*group_layers, *user_layers]:
        merged.update(layer)
    return dict(sorted(merged.items()))


def _app_choices(
    conn: sqlite3.Connection, uid: int, gids: Sequence[int], dtid: int
) -> list[ResolvedApp]:
    marks = ",".join("?" * len(gids)) or "NULL"
    rows = conn.execute(
        f"""
        SELECT d.app_id, a.name, d.version, d.user_id IS NOT NULL AS mine
        FROM deployments d JOIN apps a ON a.id = d.app_id
        WHERE d.user_id = ? OR d.group_id IN ({marks})
        """,
        (uid, *gids),
    ).fetchall()
    by_app: dict[int, tuple[str, tuple[str | None] | None, list[str | None]]] = {}
    for r in rows:
        name, mine, pins = by_app.get(r["app_id"], (r["name"], None, []))
        if r["mine"]:
            mine = (r["version"],)
        else:
            pins.append(r["version"])
        by_app[r["app_id"]] = (name, mine, pins)
    apps: list[ResolvedApp] = []
    for app_id, (name, mine, pins) in sorted(by_app.items(), key=lambda item: item[1][0]):
        versions = conn.execute(
            "SELECT id, version FROM app_versions WHERE app_id = ? AND device_type_id = ? "
            "ORDER BY id",
            (app_id, dtid),
        ).fetchall()
        chosen = pick_version(mine, pins, [v["version"] for v in versions])
        if chosen is not None:
            vid = next(v["id"] for v in versions if v["version"] == chosen)
            apps.append(ResolvedApp(name, chosen, _files(conn, int(vid))))
    return apps


def _files(conn: sqlite3.Connection, vid: int) -> tuple[FileEntry, ...]:
    rows = conn.execute(
        "SELECT path, sha256, size, mode FROM app_files WHERE version_id = ? ORDER BY path",
        (vid,),
    )
    return tuple(FileEntry(r["path"], r["sha256"], int(r["size"]), int(r["mode"])) for r in rows)


def _policy_layers(conn: sqlite3.Connection, column: str, owner: int) -> list[dict[str, str]]:
    rows = conn.execute(
        f"SELECT p.id FROM deployments d JOIN policies p ON p.id = d.policy_id "
        f"WHERE d.{column} = ? ORDER BY p.name",
        (owner,),
    ).fetchall()
    return [_settings(conn, int(r["id"])) for r in rows]


def plan_package(conn: sqlite3.Connection, uid: int, dtid: int) -> PackagePlan:
    """Resolve the deployments of user ``uid`` for device type ``dtid`` (see the module doc)."""
    with transaction(conn, immediate=False):
        user = conn.execute("SELECT name FROM users WHERE id = ?", (uid,)).fetchone()
        dtype = conn.execute("SELECT name FROM device_types WHERE id = ?", (dtid,)).fetchone()
        if user is None or dtype is None:
            raise NotFound("the user or the device type was removed")
        groups = user_groups(conn, uid)
        apps = _app_choices(conn, uid, [gid for gid, _ in groups], dtid)
        group_layers = [
            layer for gid, _ in groups for layer in _policy_layers(conn, "group_id", gid)
        ]
        policies = merge_policies(group_layers, _policy_layers(conn, "user_id", uid))
    return PackagePlan(user["name"], dtype["name"], tuple(apps), policies)
