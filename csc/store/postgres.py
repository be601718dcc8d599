"""The cluster backend: PostgreSQL at ``database_url`` (psycopg 3, synchronous), shared by nodes.

Schema: the same :data:`csc.store.schema.MIGRATIONS` as SQLite. The schema version lives in
the one-row table ``csc_meta`` with the data version; migrations run in one transaction under
a transaction-level advisory lock, so nodes starting at once migrate exactly once (the others
wait, then find the schema current). A database of a newer schema is refused.

Writes: every write transaction first bumps ``csc_meta.data_version``. That row lock
serialises all writers of all nodes (as ``BEGIN IMMEDIATE`` does for SQLite), so the checks a
change makes (alias conflicts) see every committed change; and :meth:`data_version`, one
primary-key read, changes after any node committed.

Connections: two, each behind a lock, autocommit with explicit ``BEGIN``: the main one for writes
and the admin API's reads, the hot one for the node's catalog reads. A connection that is found
broken is replaced by a fresh one on the next call (no restart needed when the server comes
back). A read whose connection breaks is retried once on a fresh connection; a write is retried
only when the break happened before anything was sent after ``BEGIN`` and the bump, otherwise it
raises :class:`StoreUnavailable` rather than risk a double write. While the server is
unreachable the hot connection fails fast for a growing pause (capped), so a node polling the
catalog does not wait on the connect timeout again and again. Messages never show the password.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row

from csc.store.backend import POSTGRES, Result, Row, StoreError, StoreUnavailable, Tx

T = TypeVar("T")
log = logging.getLogger("csc.store.postgres")

CONNECT_TIMEOUT = 3
#: fail-fast pauses of the hot connection after failed connects: first, then doubled up to max
PAUSE_FIRST, PAUSE_MAX = 0.5, 10.0
#: key of the advisory lock migrations hold ("cscmigr")
MIGRATION_LOCK = 0x6373636D696772

_BOOTSTRAP = (
    """CREATE TABLE IF NOT EXISTS csc_meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        schema_version INTEGER NOT NULL,
        data_version BIGINT NOT NULL)""",
    "INSERT INTO csc_meta VALUES (1, 0, 0) ON CONFLICT DO NOTHING",
)
_BUMP = "UPDATE csc_meta SET data_version = data_version + 1 WHERE id = 1"


def masked_url(url: str) -> str:
    """``url`` with the password replaced by ``***`` and the query (which may hold one) left
    out; something that cannot be parsed is shown as ``postgresql://***``."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "postgresql://***"
    if ":" in host:
        host = f"[{host}]"
    user = parts.username or ""
    if parts.password is not None:
        user += ":***"
    netloc = f"{user}@{host}{port}" if user else f"{host}{port}"
    return f"{parts.scheme}://{netloc}{parts.path}"


def _qmark(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s`` (our statements hold no other ``?`` or ``%``)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _Broken(StoreUnavailable):
    """The connection broke during a call (as opposed to: could not connect)."""


class _PgTx:
    def __init__(self, conn: psycopg.Connection[Row], backend: PostgresBackend) -> None:
        self._conn, self._backend = conn, backend

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Result:
        try:
            cursor = self._conn.execute(_qmark(sql), tuple(args))
            rows = cursor.fetchall() if cursor.description is not None else []
        except psycopg.OperationalError as exc:
            if _is_broken(self._conn):
                raise self._backend.unavailable(exc, _Broken) from None
            raise
        return Result(rows, cursor.rowcount)


def _is_broken(conn: psycopg.Connection[Row]) -> bool:
    return conn.closed or conn.broken


class _Link:
    """One connection, made on demand and replaced when broken; callers hold :attr:`lock`."""

    def __init__(self, backend: PostgresBackend, *, fail_fast: bool) -> None:
        self.lock = threading.Lock()
        self._backend = backend
        self._conn: psycopg.Connection[Row] | None = None
        self._fail_fast = fail_fast
        self._pause = 0.0
        self._paused_until = 0.0

    def get(self) -> psycopg.Connection[Row]:
        if self._conn is not None and not _is_broken(self._conn):
            return self._conn
        self.discard()
        if self._fail_fast and time.monotonic() < self._paused_until:
            raise StoreUnavailable(self._backend.unavailable_message("not reachable a moment ago"))
        try:
            self._conn = self._backend.connect()
        except StoreUnavailable:
            self._pause = min(PAUSE_MAX, self._pause * 2 or PAUSE_FIRST)
            self._paused_until = time.monotonic() + self._pause
            raise
        self._pause = 0.0
        return self._conn

    def discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


class PostgresBackend:
    """The store's tables in the PostgreSQL database at ``url``."""

    dialect = POSTGRES

    def __init__(self, url: str, *, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self._url = url
        self._password = _password(url)
        self.where = masked_url(url)
        self._connect_timeout = connect_timeout
        self._main = _Link(self, fail_fast=False)
        self._hot = _Link(self, fail_fast=True)
        self._down: bool | None = None  # None: never connected yet
        self._down_lock = threading.Lock()

    # -- connections and errors ---------------------------------------------------------------

    def connect(self) -> psycopg.Connection[Row]:
        try:
            conn = psycopg.connect(
                self._url,
                autocommit=True,
                row_factory=dict_row,
                connect_timeout=max(1, round(self._connect_timeout)),
                application_name="csc",
            )
        except psycopg.OperationalError as exc:
            raise self.unavailable(exc) from None
        except psycopg.Error as exc:  # e.g. a malformed URL option
            raise StoreError(f"PostgreSQL {self.where}: {self._clean(exc)}") from None
        self._set_down(False)
        return conn

    def _clean(self, exc: BaseException) -> str:
        text = " ".join(str(exc).split()) or type(exc).__name__
        if self._password:
            text = text.replace(self._password, "***")
        return text

    def unavailable_message(self, reason: str) -> str:
        return (
            f"PostgreSQL {self.where} is unavailable: {reason} (check that the server runs, "
            "accepts connections from this host, and that the URL's user, password and "
            "database are right)"
        )

    def unavailable(
        self, exc: BaseException, kind: type[StoreUnavailable] = StoreUnavailable
    ) -> StoreUnavailable:
        self._set_down(True)
        return kind(self.unavailable_message(self._clean(exc)))

    def _set_down(self, down: bool) -> None:
        """Log the transitions between reachable and not (none before the first connection)."""
        with self._down_lock:
            before, self._down = self._down, down
        if before is False and down:
            log.warning("PostgreSQL %s is unreachable; retrying on the next call", self.where)
        elif before and not down:
            log.warning("PostgreSQL %s is reachable again", self.where)

    def close(self) -> None:
        for link in (self._hot, self._main):
            with link.lock:
                link.discard()

    # -- transactions -------------------------------------------------------------------------

    def _begin(self, link: _Link, statements: Sequence[str]) -> psycopg.Connection[Row]:
        """``BEGIN`` and ``statements`` on a healthy connection: when the connection turns out
        broken here, nothing was done yet, so once more on a fresh one."""
        for attempt in (1, 2):
            conn = link.get()
            try:
                for statement in statements:
                    conn.execute(statement)
                return conn
            except psycopg.OperationalError as exc:
                if not _is_broken(conn):
                    with contextlib.suppress(psycopg.Error):
                        conn.execute("ROLLBACK")
                    raise
                link.discard()
                if attempt == 2:
                    raise self.unavailable(exc) from None
        raise AssertionError("unreachable")  # pragma: no cover

    @contextlib.contextmanager
    def _transaction(self, link: _Link, statements: Sequence[str]) -> Iterator[Tx]:
        """Hold ``link`` for one transaction: committed if the block returns, else rolled back.
        A broken connection becomes StoreUnavailable (the commit's fate may be unknown)."""
        with link.lock:
            conn = self._begin(link, statements)
            try:
                yield _PgTx(conn, self)
            except BaseException:
                if _is_broken(conn):
                    link.discard()
                else:
                    with contextlib.suppress(psycopg.Error):
                        conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except psycopg.OperationalError as exc:
                if not _is_broken(conn):
                    raise
                link.discard()
                raise self.unavailable(exc, _Broken) from None

    def write(self) -> contextlib.AbstractContextManager[Tx]:
        return self._transaction(self._main, ("BEGIN", _BUMP))

    @contextlib.contextmanager
    def migration(self) -> Iterator[tuple[Tx, int]]:
        lock = f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"
        try:
            with self._transaction(self._main, ("BEGIN", lock, *_BOOTSTRAP, _BUMP)) as tx:
                row = tx.execute("SELECT schema_version FROM csc_meta WHERE id = 1").first()
                yield tx, int(row["schema_version"]) if row else 0
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL {self.where}: {self._clean(exc)}") from None

    def set_schema_version(self, tx: Tx, version: int) -> None:
        tx.execute("UPDATE csc_meta SET schema_version = ? WHERE id = 1", (version,))

    def _read_on(self, link: _Link, fn: Callable[[Tx], T], begin: str) -> T:
        """Run ``fn`` in a read transaction; once more on a fresh connection if it broke."""
        for attempt in (1, 2):
            try:
                with self._transaction(link, (begin,)) as tx:
                    return fn(tx)
            except _Broken:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def read(self, fn: Callable[[Tx], T]) -> T:
        return self._read_on(self._main, fn, "BEGIN READ ONLY")

    def snapshot(self, fn: Callable[[Tx], T]) -> T:
        return self._read_on(self._hot, fn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def data_version(self) -> int:
        def version(tx: Tx) -> int:
            row = tx.execute("SELECT data_version FROM csc_meta WHERE id = 1").first()
            return int(row["data_version"]) if row else 0

        return self.snapshot(version)


def _password(url: str) -> str | None:
    try:
        return urllib.parse.urlsplit(url).password or None
    except ValueError:
        return None
