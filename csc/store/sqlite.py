"""The embedded backend: SQLite in ``<state-dir>/csc.db`` (one node; the default).

Both the running node and the offline CLI (``csc token issue``) open the file, so it runs in WAL
mode with a busy timeout and every write is one ``BEGIN IMMEDIATE`` transaction (serialised
against every other process). The schema version is ``PRAGMA user_version``.

A database that exists is never taken for a first start: an empty ``csc.db`` (0 bytes) is
refused (opening it would create a new, empty CSC in its place), and so is one that fails
SQLite's ``PRAGMA quick_check`` or is not a database at all; the error names the file and
what to do (:func:`damaged`). Damage found later (a read of a garbled page) is a StoreError
too, never a driver traceback. ``csc db check`` and ``csc db backup`` (csc/admin/db.py) use
:func:`integrity` and :func:`backup`.

Two connections: the writing one (also used by the admin API's reads) behind a lock, and a
read-only one for the node's hot path (:meth:`SQLiteBackend.snapshot`, ``data_version``): in
WAL mode a reader never waits for a writer, even one of another process that holds the write
lock for the busy timeout. Methods are thread-safe.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from csc.store.backend import SQLITE, Result, Row, StoreError, Tx
from shared.files import ensure_private_dir

T = TypeVar("T")

DB_FILE = "csc.db"
BUSY_TIMEOUT = 5.0


#: SQLite's primary result codes that mean the file is damaged or not a database.
_DAMAGE_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
RESTORE_HINT = (
    "restore the last backup (`csc db backup`; docs/operations.md, 'Backup and restore'), "
    "or move the file away to start a new, empty CSC; `csc db check` shows what is wrong"
)


def is_damage(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` says the database file is damaged (not busy, not a usage error)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in _DAMAGE_CODES
    return type(exc) is sqlite3.DatabaseError


def damaged(path: Path, detail: str) -> StoreError:
    """The refusal of a damaged database file: what is wrong and what to do."""
    return StoreError(f"{path} is damaged ({detail}); the CSC will not use it: {RESTORE_HINT}")


def empty_database(path: Path) -> StoreError:
    return StoreError(
        f"{path} is empty (0 bytes): it is not a CSC database, and opening it would start a "
        "new, empty CSC in its place (tenants, aliases, operators and revocations gone); "
        f"{RESTORE_HINT}"
    )


def integrity(conn: sqlite3.Connection, pragma: str = "integrity_check") -> list[str]:
    """The problems SQLite's ``PRAGMA integrity_check`` (or ``quick_check``) finds; [] when
    none (at most 20 are listed)."""
    rows = conn.execute(f"PRAGMA {pragma}(20)").fetchall()
    found = [str(next(iter(row.values())) if isinstance(row, dict) else row[0]) for row in rows]
    return [] if found == ["ok"] else found


def backup(source: Path, target: Path) -> None:
    """Copy the database ``source`` to the new file ``target`` (mode 0600) with SQLite's online
    backup: consistent while a node writes. Raises FileExistsError, OSError, sqlite3.Error."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=BUSY_TIMEOUT)
        try:
            dst = sqlite3.connect(target)
            try:
                src.backup(dst)
                problems = integrity(dst)
                if problems:
                    raise sqlite3.DatabaseError("; ".join(problems))
            finally:
                dst.close()
        finally:
            src.close()
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def _dict_row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> Row:
    return {d[0]: value for d, value in zip(cursor.description, row, strict=True)}


class _SQLiteTx:
    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._path = path

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Result:
        try:
            cursor = self._conn.execute(sql, tuple(args))
            return Result(cursor.fetchall(), cursor.rowcount)
        except sqlite3.DatabaseError as exc:
            if is_damage(exc):
                raise damaged(self._path, str(exc)) from None
            raise


class SQLiteBackend:
    """``<state_dir>/csc.db`` (created mode 0600, the directory 0700)."""

    dialect = SQLITE

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / DB_FILE
        self.where = str(self.path)
        self._lock = threading.RLock()
        self._reader_lock = threading.Lock()
        try:
            ensure_private_dir(state_dir)
            created = not self.path.exists()
            if not created and self.path.stat().st_size == 0:
                raise empty_database(self.path)
            self._conn = self._connect()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"{self.path}: cannot open the database: {exc}") from None
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            if created:
                os.chmod(self.path, 0o600)
            else:
                problems = integrity(self._conn, "quick_check")
                if problems:
                    raise damaged(self.path, "; ".join(problems[:3]))
            self._reader = self._connect()
            self._reader.execute("PRAGMA query_only=ON")
        except sqlite3.Error as exc:
            self._conn.close()
            if is_damage(exc):
                raise damaged(self.path, str(exc)) from None
            raise StoreError(f"{self.path}: {exc}") from None
        except StoreError:
            self._conn.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        conn.row_factory = _dict_row
        return conn

    def close(self) -> None:
        with self._reader_lock:
            self._reader.close()
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def write(self) -> Iterator[Tx]:
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield _SQLiteTx(conn, self.path)
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            self._commit(conn)

    @contextlib.contextmanager
    def migration(self) -> Iterator[tuple[Tx, int]]:
        try:
            with self.write() as tx:
                version: int = self._conn.execute("PRAGMA user_version").fetchone()["user_version"]
                yield tx, version
        except sqlite3.Error as exc:
            if is_damage(exc):
                raise damaged(self.path, str(exc)) from None
            raise StoreError(f"{self.path}: {exc}") from None

    def _commit(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            if is_damage(exc):
                raise damaged(self.path, str(exc)) from None
            raise

    def set_schema_version(self, tx: Tx, version: int) -> None:
        tx.execute(f"PRAGMA user_version = {int(version)}")

    def read(self, fn: Callable[[Tx], T]) -> T:
        with self._lock:
            return fn(_SQLiteTx(self._conn, self.path))

    def snapshot(self, fn: Callable[[Tx], T]) -> T:
        with self._reader_lock:
            reader = self._reader
            reader.execute("BEGIN")
            try:
                result = fn(_SQLiteTx(reader, self.path))
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    reader.execute("ROLLBACK")
                raise
            self._commit(reader)
            return result

    def data_version(self) -> int:
        """``PRAGMA data_version`` of the reading connection: changes whenever another
        connection (this process's writer included) committed."""
        with self._reader_lock:
            value: int = self._reader.execute("PRAGMA data_version").fetchone()["data_version"]
            return value
