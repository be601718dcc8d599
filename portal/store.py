"""Users, groups, device types and devices in the portal database.

Functions take an open connection (see :mod:`portal.db`) and do their own transactions. Names are
checked and normalised here, once, so the database only ever holds valid ones:

* user names: lower-case letters, digits and ``. _ @ + -``, starting with a letter or digit,
  at most 64 characters (case-insensitive: ``Alice`` is ``alice``);
* group, device type, app and policy names: the same without ``@`` and ``+``.

Every failure an operator can cause (unknown name, duplicate, still in use) raises a
:class:`PortalDataError` subclass whose message says what is wrong and names the thing.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from portal.db import transaction

MAX_NAME = 64
_USER_RE = re.compile(r"[a-z0-9][a-z0-9._@+-]{0,63}")
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")

TargetKind = Literal["user", "group"]


class PortalDataError(Exception):
    """An operation on the portal's data failed; ``str()`` is the message for the operator."""


class NotFound(PortalDataError):
    pass


class AlreadyExists(PortalDataError):
    pass


class InUse(PortalDataError):
    pass


class InvalidValue(PortalDataError):
    pass


def check_user_name(raw: str) -> str:
    """The normalised user name, or :class:`InvalidValue`."""
    name = raw.strip().lower()
    if _USER_RE.fullmatch(name) is None:
        raise InvalidValue(
            f"{raw!r} is not a valid user name (letters, digits, '.', '_', '@', '+', '-'; "
            f"at most {MAX_NAME} characters, starting with a letter or digit)"
        )
    return name


def check_name(raw: str, what: str) -> str:
    """The normalised name of a group, device type, app or policy, or :class:`InvalidValue`."""
    name = raw.strip().lower()
    if _NAME_RE.fullmatch(name) is None:
        raise InvalidValue(
            f"{raw!r} is not a valid {what} name (letters, digits, '.', '_', '-'; "
            f"at most {MAX_NAME} characters, starting with a letter or digit)"
        )
    return name


def now() -> float:
    return time.time()


def _id_of(conn: sqlite3.Connection, table: str, name: str, what: str) -> int:
    row = conn.execute(f"SELECT id FROM {table} WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise NotFound(f"no {what} named {name!r}")
    return int(row["id"])


def user_id(conn: sqlite3.Connection, name: str) -> int:
    return _id_of(conn, "users", check_user_name(name), "user")


def group_id(conn: sqlite3.Connection, name: str) -> int:
    return _id_of(conn, "groups", check_name(name, "group"), "group")


def device_type_id(conn: sqlite3.Connection, name: str) -> int:
    return _id_of(conn, "device_types", check_name(name, "device type"), "device type")


def target_id(conn: sqlite3.Connection, kind: TargetKind, name: str) -> int:
    return user_id(conn, name) if kind == "user" else group_id(conn, name)


# --- users ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserInfo:
    name: str
    groups: tuple[str, ...]
    devices: int
    created_at: float


@dataclass(frozen=True, slots=True)
class Credentials:
    user_id: int
    name: str
    password_hash: str
    #: bumped by every password change; a session remembers the one of its logon
    epoch: int = 0


def add_user(
    conn: sqlite3.Connection, name: str, password_hash: str, groups: Iterable[str] = ()
) -> str:
    """Create a user (and its memberships); returns the normalised name."""
    name = check_user_name(name)
    group_names = [check_name(g, "group") for g in groups]
    with transaction(conn):
        if conn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
            raise AlreadyExists(f"a user named {name!r} already exists")
        gids = [group_id(conn, g) for g in group_names]
        cur = conn.execute(
            "INSERT INTO users (name, password_hash, created_at) VALUES (?, ?, ?)",
            (name, password_hash, now()),
        )
        uid = cur.lastrowid
        conn.executemany(
            "INSERT OR IGNORE INTO memberships (user_id, group_id) VALUES (?, ?)",
            [(uid, gid) for gid in gids],
        )
    return name


def set_password_hash(conn: sqlite3.Connection, name: str, password_hash: str) -> None:
    """A new password; bumps the user's ``password_epoch``, which ends the live sessions."""
    with transaction(conn):
        uid = user_id(conn, name)
        conn.execute(
            "UPDATE users SET password_hash = ?, password_epoch = password_epoch + 1 WHERE id = ?",
            (password_hash, uid),
        )


def password_epoch(conn: sqlite3.Connection, uid: int) -> int | None:
    """The user's current password epoch, or None when the user was removed."""
    row = conn.execute("SELECT password_epoch FROM users WHERE id = ?", (uid,)).fetchone()
    return None if row is None else int(row[0])


def replace_password_hash(conn: sqlite3.Connection, uid: int, old: str, new: str) -> bool:
    """Rehash on logon: replace ``old`` by ``new`` unless the password changed meanwhile."""
    with transaction(conn):
        cur = conn.execute(
            "UPDATE users SET password_hash = ? WHERE id = ? AND password_hash = ?",
            (new, uid, old),
        )
    return cur.rowcount == 1


def remove_user(conn: sqlite3.Connection, name: str) -> None:
    with transaction(conn):
        uid = user_id(conn, name)
        conn.execute("DELETE FROM users WHERE id = ?", (uid,))


def credentials(conn: sqlite3.Connection, raw_name: str) -> Credentials | None:
    """The stored hash of a user, or None for an unknown or invalid name."""
    try:
        name = check_user_name(raw_name)
    except InvalidValue:
        return None
    row = conn.execute(
        "SELECT id, name, password_hash, password_epoch FROM users WHERE name = ?", (name,)
    ).fetchone()
    if row is None:
        return None
    return Credentials(
        int(row["id"]), str(row["name"]), str(row["password_hash"]), int(row["password_epoch"])
    )


def list_users(conn: sqlite3.Connection) -> list[UserInfo]:
    rows = conn.execute(
        """
        SELECT u.name, u.created_at,
               (SELECT group_concat(name, char(10)) FROM (
                    SELECT g.name FROM memberships m JOIN groups g ON g.id = m.group_id
                    WHERE m.user_id = u.id ORDER BY g.name)) AS groups,
               (SELECT count(*) FROM devices d WHERE d.user_id = u.id) AS devices
        FROM users u ORDER BY u.name
        """
    ).fetchall()
    return [
        UserInfo(
            r["name"],
            tuple(r["groups"].split("\n")) if r["groups"] else (),
            int(r["devices"]),
            float(r["created_at"]),
        )
        for r in rows
    ]


def user_groups(conn: sqlite3.Connection, uid: int) -> list[tuple[int, str]]:
    rows = conn.execute(
        "SELECT g.id, g.name FROM memberships m JOIN groups g ON g.id = m.group_id "
        "WHERE m.user_id = ? ORDER BY g.name",
        (uid,),
    ).fetchall()
    return [(int(r["id"]), str(r["name"])) for r in rows]


# --- groups --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupInfo:
    name: str
    members: tuple[str, ...]
    created_at: float


def add_group(conn: sqlite3.Connection, name: str) -> str:
    name = check_name(name, "group")
    with transaction(conn):
        if conn.execute("SELECT 1 FROM groups WHERE name = ?", (name,)).fetchone():
            raise AlreadyExists(f"a group named {name!r} already exists")
        conn.execute("INSERT INTO groups (name, created_at) VALUES (?, ?)", (name, now()))
    return name


def remove_group(conn: sqlite3.Connection, name: str) -> None:
    with transaction(conn):
        gid = group_id(conn, name)
        conn.execute("DELETE FROM groups WHERE id = ?", (gid,))


def list_groups(conn: sqlite3.Connection) -> list[GroupInfo]:
    groups = conn.execute("SELECT id, name, created_at FROM groups ORDER BY name").fetchall()
    result: list[GroupInfo] = []
    for g in groups:
        members = conn.execute(
            "SELECT u.name FROM memberships m JOIN users u ON u.id = m.user_id "
            "WHERE m.group_id = ? ORDER BY u.name",
            (g["id"],),
        ).fetchall()
        result.append(
            GroupInfo(g["name"], tuple(m["name"] for m in members), float(g["created_at"]))
        )
    return result


def add_members(conn: sqlite3.Connection, group: str, users: Iterable[str]) -> list[str]:
    """Add users to a group; returns those that were not members yet."""
    added: list[str] = []
    with transaction(conn):
        gid = group_id(conn, group)
        for user in users:
            uid = user_id(conn, user)
            cur = conn.execute(
                "INSERT OR IGNORE INTO memberships (user_id, group_id) VALUES (?, ?)", (uid, gid)
            )
            if cur.rowcount:
                added.append(check_user_name(user))
    return added


def remove_members(conn: sqlite3.Connection, group: str, users: Iterable[str]) -> None:
    """Remove users from a group; a user that is not a member is an error (nothing changes)."""
    with transaction(conn):
        gid = group_id(conn, group)
        for user in users:
            uid = user_id(conn, user)
            cur = conn.execute(
                "DELETE FROM memberships WHERE user_id = ? AND group_id = ?", (uid, gid)
            )
            if not cur.rowcount:
                raise NotFound(
                    f"user {check_user_name(user)!r} is not a member of group "
                    f"{check_name(group, 'group')!r}"
                )


# --- device types --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceTypeInfo:
    name: str
    description: str


def add_device_type(conn: sqlite3.Connection, name: str, description: str = "") -> str:
    name = check_name(name, "device type")
    if len(description) > 200 or any(ord(c) < 32 for c in description):
        raise InvalidValue("the description must be one line of at most 200 characters")
    with transaction(conn):
        if conn.execute("SELECT 1 FROM device_types WHERE name = ?", (name,)).fetchone():
            raise AlreadyExists(f"a device type named {name!r} already exists")
        conn.execute(
            "INSERT INTO device_types (name, description, created_at) VALUES (?, ?, ?)",
            (name, description.strip(), now()),
        )
    return name


def remove_device_type(conn: sqlite3.Connection, name: str) -> None:
    with transaction(conn):
        dtid = device_type_id(conn, name)
        apps = conn.execute(
            "SELECT DISTINCT a.name || '@' || v.version AS app FROM app_versions v "
            "JOIN apps a ON a.id = v.app_id WHERE v.device_type_id = ? ORDER BY 1",
            (dtid,),
        ).fetchall()
        if apps:
            listed = ", ".join(r["app"] for r in apps)
            raise InUse(
                f"device type {check_name(name, 'device type')!r} still has app versions "
                f"({listed}): remove them first with 'app remove'"
            )
        conn.execute("DELETE FROM device_types WHERE id = ?", (dtid,))


def list_device_types(conn: sqlite3.Connection) -> list[DeviceTypeInfo]:
    rows = conn.execute("SELECT name, description FROM device_types ORDER BY name").fetchall()
    return [DeviceTypeInfo(r["name"], r["description"]) for r in rows]


def find_device_type(conn: sqlite3.Connection, raw: str) -> int | None:
    """The id of a device type named ``raw`` (normalised), or None."""
    name = raw.strip().lower()
    row = conn.execute("SELECT id FROM device_types WHERE name = ?", (name,)).fetchone()
    return None if row is None else int(row["id"])


# --- devices -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    device_id: str
    user: str
    device_type: str
    first_logon: float
    last_logon: float
    last_package: str
    last_address: str


def record_device(
    conn: sqlite3.Connection,
    *,
    uid: int,
    dtid: int,
    device_id: str,
    package_id: str,
    address: str,
) -> None:
    """Insert or update the device a user just logged on from."""
    stamp = now()
    with transaction(conn):
        conn.execute(
            """
            INSERT INTO devices (device_id, user_id, device_type_id, first_logon, last_logon,
                                 last_package, last_address)
            VALUES (?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (user_id, device_id) DO UPDATE SET
                device_type_id = excluded.device_type_id, last_logon = excluded.last_logon,
                last_package = excluded.last_package, last_address = excluded.last_address
            """,
            (device_id, uid, dtid, stamp, stamp, package_id, address),
        )


def list_devices(conn: sqlite3.Connection) -> list[DeviceInfo]:
    rows = conn.execute(
        """
        SELECT d.device_id, u.name AS user, t.name AS device_type, d.first_logon,
               d.last_logon, d.last_package, d.last_address
        FROM devices d JOIN users u ON u.id = d.user_id
        JOIN device_types t ON t.id = d.device_type_id
        ORDER BY u.name, d.device_id
        """
    ).fetchall()
    return [
        DeviceInfo(
            r["device_id"],
            r["user"],
            r["device_type"],
            float(r["first_logon"]),
            float(r["last_logon"]),
            r["last_package"],
            r["last_address"],
        )
        for r in rows
    ]
