"""The embedded backend: SQLite in ``<state-dir>/csc.db`` (one node; the default).

Both the running node and the offline CLI (``csc token issue``) open the file, so it runs in WAL
mode with a busy timeout and every write is one ``BEGIN IMMEDIATE`` transaction (serialised
against every other process). The schema version is ``PRAGMA user_version``.

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


def _dict_row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> Row:
    return {d[0]: value for d, value in zip(cursor.description, row, strict=True)}


class _SQLiteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Result:
        cursor = self._conn.execute(sql, tuple(args))
        return Result(cursor.fetchall(), cursor.rowcount)


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
            self._conn = self._connect()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"{self.path}: cannot open the database: {exc}") from None
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            if created:
                os.chmod(self.path, 0o600)
            self._reader = self._connect()
            self._reader.execute("PRAGMA query_only=ON")
        except sqlite3.Error as exc:
            self._conn.close()
            raise StoreError(f"{self.path}: {exc}") from None

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
                yield _SQLiteTx(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextlib.contextmanager
    def migration(self) -> Iterator[tuple[Tx, int]]:
        try:
            with self.write() as tx:
                version: int = self._conn.execute("PRAGMA user_version").fetchone()["user_version"]
                yield tx, version
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from None

    def set_schema_version(self, tx: Tx, version: int) -> None:
        tx.execute(f"PRAGMA user_version = {int(version)}")

    def read(self, fn: Callable[[Tx], T]) -> T:
        with self._lock:
            return fn(_SQLiteTx(self._conn))

    def snapshot(self, fn: Callable[[Tx], T]) -> T:
        with self._reader_lock:
            reader = self._reader
            reader.execute("BEGIN")
            try:
                return fn(_SQLiteTx(reader))
            finally:
                reader.execute("COMMIT")

    def data_version(self) -> int:
        """``PRAGMA data_version`` of the reading connection: changes whenever another
        connection (this process's writer included) committed."""
        with self._reader_lock:
            value: int = self._reader.execute("PRAGMA data_version").fetchone()["data_version"]
            return value
