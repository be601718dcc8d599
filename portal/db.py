"""The portal's SQLite database: opening it, and its schema migrations.

The database is ``<state-dir>/portal.db``. :data:`MIGRATIONS` is an ordered list of steps; the
number of steps applied is kept in ``PRAGMA user_version``, so step ``i`` (0-based) takes a
database from version ``i`` to ``i + 1``. Steps are only ever appended, never edited.

Invariants:

* Every connection has ``foreign_keys`` on, a busy timeout, and autocommit off-by-default handling
  replaced by explicit transactions (``isolation_level=None`` + :func:`transaction`).
* The journal is WAL (readers never block the writer).
* :func:`migrate` runs each step in its own ``BEGIN IMMEDIATE`` transaction and re-reads the
  version inside it, so two processes starting at once never apply a step twice.
* A database whose version is newer than :data:`SCHEMA_VERSION` is refused with
  :class:`SchemaTooNew` before anything is written.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.files import ensure_private_dir

DB_FILE = "portal.db"
BUSY_TIMEOUT_MS = 10_000


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step: a description (for logs) and the SQL script that performs it."""

    description: str
    script: str


_INITIAL = """
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE groups (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
CREATE TABLE memberships (
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    group_id INTEGER NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    PRIMARY KEY (user_id, group_id)
);
CREATE INDEX memberships_group ON memberships(group_id);
CREATE TABLE device_types (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
CREATE TABLE apps (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
CREATE TABLE app_versions (
    id INTEGER PRIMARY KEY,
    app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    version TEXT NOT NULL,
    device_type_id INTEGER NOT NULL REFERENCES device_types(id) ON DELETE RESTRICT,
    created_at REAL NOT NULL,
    UNIQUE (app_id, version, device_type_id)
);
CREATE TABLE app_files (
    version_id INTEGER NOT NULL REFERENCES app_versions(id) ON DELETE CASCADE,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    mode INTEGER NOT NULL,
    PRIMARY KEY (version_id, path)
);
CREATE INDEX app_files_blob ON app_files(sha256);
CREATE TABLE policies (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
CREATE TABLE policy_settings (
    policy_id INTEGER NOT NULL REFERENCES policies(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (policy_id, key)
);
CREATE TABLE deployments (
    id INTEGER PRIMARY KEY,
    app_id INTEGER REFERENCES apps(id) ON DELETE CASCADE,
    version TEXT,
    policy_id INTEGER REFERENCES policies(id) ON DELETE CASCADE,
    user_id INTEGER REFERENCES users(id) ON DELETE CASCADE,
    group_id INTEGER REFERENCES groups(id) ON DELETE CASCADE,
    created_at REAL NOT NULL,
    CHECK ((app_id IS NULL) != (policy_id IS NULL)),
    CHECK ((user_id IS NULL) != (group_id IS NULL)),
    CHECK (version IS NULL OR app_id IS NOT NULL)
);
CREATE UNIQUE INDEX deployments_unique ON deployments(
    coalesce(app_id, 0), coalesce(policy_id, 0), coalesce(user_id, 0), coalesce(group_id, 0)
);
CREATE TABLE devices (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    device_type_id INTEGER NOT NULL REFERENCES device_types(id) ON DELETE CASCADE,
    first_logon REAL NOT NULL,
    last_logon REAL NOT NULL,
    last_package TEXT NOT NULL,
    last_address TEXT NOT NULL DEFAULT '',
    UNIQUE (user_id, device_id)
);
CREATE TABLE packages (
    manifest_sha256 TEXT PRIMARY KEY,
    package_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL
);
"""

#: The schema's history. Append only: a released step is never changed.
MIGRATIONS: tuple[Migration, ...] = (
    Migration("users, groups, device types, apps, policies, deployments, devices", _INITIAL),
    Migration(
        "users.password_epoch (a password change ends the user's sessions)",
        "ALTER TABLE users ADD COLUMN password_epoch INTEGER NOT NULL DEFAULT 0;",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


class DatabaseError(Exception):
    """The database cannot be opened or used (message fit for the operator)."""


class SchemaTooNew(DatabaseError):
    """The database was written by a newer portal."""


def _connect_raw(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, *, immediate: bool = True) -> Iterator[None]:
    """``BEGIN [IMMEDIATE]`` ... ``COMMIT``, or ``ROLLBACK`` when the block raises."""
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def schema_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def _check_not_newer(path: Path, version: int, supported: int) -> None:
    if version > supported:
        raise SchemaTooNew(
            f"{path} has schema version {version}, newer than this csc-portal supports "
            f"({supported}): upgrade csc-portal, or restore a backup made by this version"
        )


def migrate(
    conn: sqlite3.Connection, path: Path, migrations: Sequence[Migration] = MIGRATIONS
) -> list[str]:
    """Apply the missing steps of ``migrations``; return the descriptions of those applied."""
    _check_not_newer(path, schema_version(conn), len(migrations))
    applied: list[str] = []
    while True:
        with transaction(conn):
            version = schema_version(conn)
            _check_not_newer(path, version, len(migrations))
            if version == len(migrations):
                return applied
            step = migrations[version]
            for statement in _statements(step.script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
        applied.append(step.description)


def _statements(script: str) -> list[str]:
    """Split a migration script into complete statements (``executescript`` would COMMIT)."""
    statements: list[str] = []
    current = ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current.strip())
            current = ""
    if current.strip():
        raise ValueError(f"incomplete SQL statement in a migration: {current.strip()[:80]!r}")
    return statements


class Database:
    """The portal database of one state directory; :meth:`connect` opens a connection."""

    def __init__(self, state_dir: Path, migrations: Sequence[Migration] = MIGRATIONS) -> None:
        self.path = state_dir / DB_FILE
        self._state_dir = state_dir
        self._migrations = tuple(migrations)

    def open(self) -> list[str]:
        """Create the file if needed, switch to WAL and migrate; returns the steps applied."""
        try:
            ensure_private_dir(self._state_dir)
            conn = _connect_raw(self.path)
        except (OSError, sqlite3.Error) as exc:
            raise DatabaseError(f"{self.path}: cannot open the database: {exc}") from None
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise DatabaseError(f"{self.path}: cannot switch the journal to WAL ({mode})")
            return migrate(conn, self.path, self._migrations)
        except sqlite3.DatabaseError as exc:
            raise DatabaseError(f"{self.path}: {exc}") from None
        finally:
            conn.close()

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection (foreign keys on) for the duration of the block; call :meth:`open` first."""
        try:
            conn = _connect_raw(self.path)
        except sqlite3.Error as exc:
            raise DatabaseError(f"{self.path}: cannot open the database: {exc}") from None
        try:
            yield conn
        finally:
            conn.close()
