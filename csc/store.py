"""The embedded store of managed objects: SQLite in ``<state-dir>/csc.db``.

It holds tenants, alias assignments, the metadata of issued agent tokens (never a token itself),
revoked token ids, operators (names and SHA-256 hashes of their bearer tokens) and the audit
log. Both the running node and the offline CLI (``csc token issue``) open it, so it runs in WAL
mode with a busy timeout, and every change is one ``BEGIN IMMEDIATE`` transaction that also
appends its audit entry: a change and its audit entry are committed together or not at all.

The schema is versioned by ``PRAGMA user_version``; :data:`MIGRATIONS` upgrades it step by step
on open, and the first step imports a legacy ``tenants.json`` once (its grants become assignments
of automatically created active tenants; the file is renamed ``tenants.json.migrated``).

Invariants: an alias is assigned to at most one tenant and no tenant's pattern covers another
tenant's alias (checked in the same transaction that writes); a deleted tenant's recorded tokens
are revoked. Methods are synchronous and thread-safe (one connection behind a lock); the node
calls the writing ones from a worker thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from csc.tenants import (
    LEGACY_TENANTS_FILE,
    Actor,
    Assignment,
    AuditEntry,
    Catalog,
    Conflict,
    Limits,
    NotFound,
    Tenant,
    TenantsFileError,
    TenantUpdate,
    TokenRecord,
    conflicts,
    read_legacy_tenants,
)
from shared.aliases import normalise_grant
from shared.files import ensure_private_dir, write_atomic
from shared.tokens import DEFAULT_LEEWAY, PrivateKey, check_tenant_id, issue_token

log = logging.getLogger("csc.store")

DB_FILE = "csc.db"
ADMIN_TOKEN_FILE = "admin-token"
DEFAULT_OPERATOR = "admin"
SYSTEM = Actor("system", "local")
BUSY_TIMEOUT = 5.0
MAX_AUDIT_PAGE = 1000

_V1 = (
    """CREATE TABLE tenants (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        contact TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL CHECK (state IN ('active', 'suspended')),
        max_sessions INTEGER,
        max_streams INTEGER,
        max_request_rate REAL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL)""",
    """CREATE TABLE aliases (
        alias TEXT PRIMARY KEY,
        tenant TEXT NOT NULL REFERENCES tenants(id),
        assigned_at REAL NOT NULL)""",
    "CREATE INDEX aliases_by_tenant ON aliases(tenant)",
    """CREATE TABLE tokens (
        jti TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        aliases TEXT NOT NULL,
        issued_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        issued_by TEXT NOT NULL)""",
    "CREATE INDEX tokens_by_tenant ON tokens(tenant)",
    """CREATE TABLE revoked (
        jti TEXT PRIMARY KEY,
        revoked_at REAL NOT NULL,
        revoked_by TEXT NOT NULL,
        expires_at REAL)""",
    """CREATE TABLE operators (
        name TEXT PRIMARY KEY,
        token_sha256 TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL)""",
    """CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        operator TEXT NOT NULL,
        remote TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        details TEXT NOT NULL)""",
)

#: Schema steps: MIGRATIONS[n] upgrades user_version n to n + 1.
MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1,)


class StoreError(Exception):
    """``csc.db`` cannot be opened, is corrupt, or has a schema newer than this program."""


def token_hash(token: str) -> str:
    """How an operator token is stored and looked up (tokens are random: no slow hash needed)."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_operator_token() -> str:
    return "csc_op_" + secrets.token_urlsafe(32)


def _tenant(row: sqlite3.Row) -> Tenant:
    return Tenant(
        id=row["id"],
        name=row["name"],
        contact=row["contact"],
        state=row["state"],
        limits=Limits(row["max_sessions"], row["max_streams"], row["max_request_rate"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _token(row: sqlite3.Row) -> TokenRecord:
    return TokenRecord(
        jti=row["jti"],
        tenant=row["tenant"],
        aliases=tuple(json.loads(row["aliases"])),
        issued_at=row["issued_at"],
        expires_at=row["expires_at"],
        issued_by=row["issued_by"],
        revoked_at=row["revoked_at"],
        revoked_by=row["revoked_by"],
    )


_TOKEN_SELECT = (
    "SELECT t.*, r.revoked_at, r.revoked_by FROM tokens t LEFT JOIN revoked r ON r.jti = t.jti"
)


class Store:
    """The managed objects of one state directory."""

    def __init__(self, state_dir: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.state_dir = state_dir
        self.path = state_dir / DB_FILE
        self.clock = clock
        self._lock = threading.RLock()
        try:
            ensure_private_dir(state_dir)
            created = not self.path.exists()
            self._conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"{self.path}: cannot open the database: {exc}") from None
        try:
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            if created:
                os.chmod(self.path, 0o600)
            self._migrate()
            self._reader = self._open_reader()
        except sqlite3.Error as exc:
            self._conn.close()
            raise StoreError(f"{self.path}: {exc}") from None
        except BaseException:
            self._conn.close()
            raise

    def _open_reader(self) -> sqlite3.Connection:
        """The node's hot path reads here: in WAL mode a reader never waits for a writer, so
        :meth:`data_version` and :meth:`catalog` never wait for a write held up by another
        process (the writing connection's lock can be held for the busy timeout)."""
        self._reader_lock = threading.Lock()
        reader = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        reader.row_factory = sqlite3.Row
        reader.execute("PRAGMA query_only=ON")
        return reader

    def close(self) -> None:
        with self._reader_lock:
            self._reader.close()
        with self._lock:
            self._conn.close()

    # -- transactions and schema --------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _read(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, tuple(args)).fetchall()

    def _migrate(self) -> None:
        with self._write() as conn:
            version: int = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"{self.path}: schema version {version} is newer than this csc understands "
                    f"({len(MIGRATIONS)}): upgrade csc"
                )
            for step in range(version, len(MIGRATIONS)):
                for statement in MIGRATIONS[step]:
                    conn.execute(statement)
                if step == 0:
                    self._import_legacy(conn)
            conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
        legacy = self.state_dir / LEGACY_TENANTS_FILE
        if version == 0 and legacy.exists():
            with contextlib.suppress(OSError):
                legacy.rename(legacy.with_name(legacy.name + ".migrated"))

    def _import_legacy(self, conn: sqlite3.Connection) -> None:
        path = self.state_dir / LEGACY_TENANTS_FILE
        if not path.exists():
            return
        try:
            grants = read_legacy_tenants(path)
        except (TenantsFileError, OSError) as exc:
            raise StoreError(f"cannot migrate {path}: {exc}") from None
        now = self.clock()
        for tenant in sorted(set(grants.values())):
            self._insert_tenant(
                conn, Tenant(id=tenant, name=tenant, created_at=now, updated_at=now)
            )
        for grant, tenant in grants.items():
            conn.execute("INSERT INTO aliases VALUES (?, ?, ?)", (grant, tenant, now))
        self._audit(conn, SYSTEM, "tenants.migrate", str(path), {"aliases": len(grants)})
        log.info("migrated %d aliases of %s into %s", len(grants), path, self.path)

    def _audit(
        self,
        conn: sqlite3.Connection,
        actor: Actor,
        action: str,
        target: str,
        details: Mapping[str, Any],
    ) -> None:
        conn.execute(
            "INSERT INTO audit (at, operator, remote, action, target, details) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (self.clock(), actor.operator, actor.remote, action, target, json.dumps(details)),
        )

    # -- reads --------------------------------------------------------------------------------

    def data_version(self) -> int:
        """Changes whenever anything (this process's writes included) was committed since the
        last call (``PRAGMA data_version`` of the reading connection)."""
        with self._reader_lock:
            value: int = self._reader.execute("PRAGMA data_version").fetchone()[0]
            return value

    def catalog(self) -> Catalog:
        """The snapshot a node serves lookups from (revocations of expired tokens left out),
        read in one transaction, so it is consistent."""
        horizon = self.clock() - DEFAULT_LEEWAY
        with self._reader_lock:
            db = self._reader
            db.execute("BEGIN")
            try:
                tenants = {r["id"]: _tenant(r) for r in db.execute("SELECT * FROM tenants")}
                assigned = {r["alias"]: r["tenant"] for r in db.execute("SELECT * FROM aliases")}
                revoked = frozenset(
                    r["jti"]
                    for r in db.execute(
                        "SELECT jti FROM revoked WHERE expires_at IS NULL OR expires_at > ?",
                        (horizon,),
                    )
                )
                operators = {
                    r["token_sha256"]: r["name"] for r in db.execute("SELECT * FROM operators")
                }
            finally:
                db.execute("COMMIT")
        return Catalog(tenants, assigned, revoked, operators)

    def tenants(self) -> list[Tenant]:
        return [_tenant(row) for row in self._read("SELECT * FROM tenants ORDER BY id")]

    def tenant(self, tenant_id: str) -> Tenant:
        rows = self._read("SELECT * FROM tenants WHERE id = ?", (tenant_id,))
        if not rows:
            raise NotFound(f"no tenant {tenant_id!r}")
        return _tenant(rows[0])

    def assignments(self, tenant: str | None = None) -> list[Assignment]:
        sql, args = "SELECT * FROM aliases", tuple[str, ...]()
        if tenant is not None:
            sql, args = sql + " WHERE tenant = ?", (tenant,)
        rows = self._read(sql + " ORDER BY tenant, alias", args)
        return [Assignment(r["alias"], r["tenant"], r["assigned_at"]) for r in rows]

    def tokens(self, tenant: str | None = None) -> list[TokenRecord]:
        sql, args = _TOKEN_SELECT, tuple[str, ...]()
        if tenant is not None:
            sql, args = sql + " WHERE t.tenant = ?", (tenant,)
        return [_token(row) for row in self._read(sql + " ORDER BY t.issued_at DESC", args)]

    def token(self, jti: str) -> TokenRecord | None:
        rows = self._read(_TOKEN_SELECT + " WHERE t.jti = ?", (jti,))
        return _token(rows[0]) if rows else None

    def audit(self, limit: int = 100, before: int | None = None) -> list[AuditEntry]:
        """Audit entries, newest first; ``before`` pages back from an entry id."""
        limit = max(1, min(limit, MAX_AUDIT_PAGE))
        sql, args = "SELECT * FROM audit", [limit]
        if before is not None:
            sql, args = sql + " WHERE id < ?", [before, limit]
        rows = self._read(sql + " ORDER BY id DESC LIMIT ?", args)
        return [
            AuditEntry(
                r["id"],
                r["at"],
                r["operator"],
                r["remote"],
                r["action"],
                r["target"],
                json.loads(r["details"]),
            )
            for r in rows
        ]

    def operators(self) -> list[tuple[str, float]]:
        rows = self._read("SELECT name, created_at FROM operators ORDER BY name")
        return [(r["name"], r["created_at"]) for r in rows]

    # -- tenants ------------------------------------------------------------------------------

    @staticmethod
    def _insert_tenant(conn: sqlite3.Connection, t: Tenant) -> None:
        conn.execute(
            "INSERT INTO tenants VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                t.id,
                t.name,
                t.contact,
                t.state,
                t.limits.max_sessions,
                t.limits.max_streams,
                t.limits.max_request_rate,
                t.created_at,
                t.updated_at,
            ),
        )

    def create_tenant(self, tenant: Tenant, actor: Actor) -> Tenant:
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM tenants WHERE id = ?", (tenant.id,)).fetchone():
                raise Conflict([f"tenant {tenant.id!r} already exists"])
            self._insert_tenant(conn, tenant)
            self._audit(conn, actor, "tenant.create", tenant.id, tenant.to_json())
        return tenant

    def update_tenant(self, tenant_id: str, update: TenantUpdate, actor: Actor) -> Tenant:
        with self._write() as conn:
            rows = conn.execute("SELECT * FROM tenants WHERE id = ?", (tenant_id,)).fetchall()
            if not rows:
                raise NotFound(f"no tenant {tenant_id!r}")
            before = _tenant(rows[0])
            after = update.apply(before, self.clock())
            conn.execute(
                "UPDATE tenants SET name = ?, contact = ?, state = ?, max_sessions = ?, "
                "max_streams = ?, max_request_rate = ?, updated_at = ? WHERE id = ?",
                (
                    after.name,
                    after.contact,
                    after.state,
                    after.limits.max_sessions,
                    after.limits.max_streams,
                    after.limits.max_request_rate,
                    after.updated_at,
                    tenant_id,
                ),
            )
            changes = _changes(before.to_json(), after.to_json())
            action = "tenant.update"
            if "state" in changes:
                action = "tenant.suspend" if after.suspended else "tenant.resume"
            self._audit(conn, actor, action, tenant_id, changes)
        return after

    def delete_tenant(self, tenant_id: str, cascade: bool, actor: Actor) -> dict[str, Any]:
        """Delete a tenant; with aliases left only when ``cascade`` (they are freed).

        The tenant's unrevoked tokens are revoked, so they stay dead if the id is reused.
        """
        with self._write() as conn:
            if not conn.execute("SELECT 1 FROM tenants WHERE id = ?", (tenant_id,)).fetchone():
                raise NotFound(f"no tenant {tenant_id!r}")
            aliases = [
                r["alias"]
                for r in conn.execute(
                    "SELECT alias FROM aliases WHERE tenant = ? ORDER BY alias", (tenant_id,)
                )
            ]
            if aliases and not cascade:
                raise Conflict(
                    [
                        f"tenant {tenant_id!r} still has aliases {', '.join(aliases)}: unassign "
                        "them first or delete with cascade"
                    ]
                )
            conn.execute("DELETE FROM aliases WHERE tenant = ?", (tenant_id,))
            revoked = self._revoke_all(conn, tenant_id, actor)
            conn.execute("DELETE FROM tenants WHERE id = ?", (tenant_id,))
            summary = {"aliases_freed": aliases, "tokens_revoked": revoked}
            self._audit(conn, actor, "tenant.delete", tenant_id, summary)
        return summary

    def _revoke_all(self, conn: sqlite3.Connection, tenant_id: str, actor: Actor) -> int:
        cursor = conn.execute(
            "INSERT INTO revoked (jti, revoked_at, revoked_by, expires_at) "
            "SELECT jti, ?, ?, expires_at FROM tokens "
            "WHERE tenant = ? AND jti NOT IN (SELECT jti FROM revoked)",
            (self.clock(), actor.operator, tenant_id),
        )
        return cursor.rowcount

    # -- aliases ------------------------------------------------------------------------------

    def assign(self, tenant_id: str, grants: Iterable[str], actor: Actor) -> list[str]:
        """Assign ``grants`` to a tenant (all or nothing); the newly assigned ones."""
        wanted = _normalised(grants)
        with self._write() as conn:
            return self._assign(conn, tenant_id, wanted, actor)

    def _assign(
        self, conn: sqlite3.Connection, tenant_id: str, grants: list[str], actor: Actor
    ) -> list[str]:
        if not conn.execute("SELECT 1 FROM tenants WHERE id = ?", (tenant_id,)).fetchone():
            raise NotFound(f"no tenant {tenant_id!r}")
        current = {r["alias"]: r["tenant"] for r in conn.execute("SELECT * FROM aliases")}
        problems = conflicts(current, tenant_id, grants)
        if problems:
            raise Conflict(problems, code="alias_taken")
        added = [g for g in grants if current.get(g) != tenant_id]
        now = self.clock()
        for grant in added:
            conn.execute("INSERT INTO aliases VALUES (?, ?, ?)", (grant, tenant_id, now))
            self._audit(conn, actor, "alias.assign", grant, {"tenant": tenant_id})
        return added

    def unassign(self, tenant_id: str, grant: str, actor: Actor) -> None:
        with self._write() as conn:
            cursor = conn.execute(
                "DELETE FROM aliases WHERE alias = ? AND tenant = ?", (grant, tenant_id)
            )
            if cursor.rowcount == 0:
                raise NotFound(f"{grant!r} is not assigned to tenant {tenant_id!r}")
            self._audit(conn, actor, "alias.unassign", grant, {"tenant": tenant_id})

    # -- tokens -------------------------------------------------------------------------------

    def issue_token(
        self,
        key: PrivateKey,
        *,
        tenant: str,
        grants: list[str],
        ttl: float,
        audience: str,
        issuer: str,
        actor: Actor,
        assign: bool = False,
    ) -> tuple[str, TokenRecord]:
        """Sign a token for aliases of ``tenant`` and record it.

        NotFound for an unknown tenant, Conflict (``not_assigned``) naming every alias that is
        not the tenant's. With ``assign``, a missing tenant is created (active, named after its
        id) and free aliases are assigned to it first.
        """
        check_tenant_id(tenant)
        grants = _normalised(grants)
        with self._write() as conn:
            if assign:
                self._ensure_tenant(conn, tenant, actor)
                self._assign(conn, tenant, grants, actor)
            self._check_issuable(conn, tenant, grants)
            now = self.clock()
            issued = float(int(now))  # as issue_token puts it in the claims
            record = TokenRecord(
                uuid.uuid4().hex, tenant, tuple(grants), issued, issued + int(ttl), actor.operator
            )
            token = issue_token(
                key,
                tenant=tenant,
                aliases=grants,
                ttl_seconds=ttl,
                audience=audience,
                issuer=issuer,
                now=now,
                jti=record.jti,
            )
            conn.execute(
                "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?)",
                (record.jti, tenant, json.dumps(grants), issued, record.expires_at, actor.operator),
            )
            details = {"tenant": tenant, "aliases": grants, "expires_at": record.expires_at}
            self._audit(conn, actor, "token.issue", record.jti, details)
        return token, record

    @staticmethod
    def _check_issuable(conn: sqlite3.Connection, tenant: str, grants: list[str]) -> None:
        if not conn.execute("SELECT 1 FROM tenants WHERE id = ?", (tenant,)).fetchone():
            raise NotFound(f"no tenant {tenant!r}")
        assigned = {r["alias"]: r["tenant"] for r in conn.execute("SELECT * FROM aliases")}
        problems = Catalog(assigned=assigned).not_assigned(tenant, grants)
        if problems:
            raise Conflict(problems, code="not_assigned")

    def _ensure_tenant(self, conn: sqlite3.Connection, tenant: str, actor: Actor) -> None:
        if conn.execute("SELECT 1 FROM tenants WHERE id = ?", (tenant,)).fetchone():
            return
        now = self.clock()
        created = Tenant(id=tenant, name=tenant, created_at=now, updated_at=now)
        self._insert_tenant(conn, created)
        self._audit(conn, actor, "tenant.create", tenant, created.to_json())

    def revoke_token(self, jti: str, actor: Actor) -> tuple[TokenRecord | None, bool]:
        """Revoke a token id (recorded or not); the record if known, and whether it was new."""
        with self._write() as conn:
            row = conn.execute("SELECT expires_at FROM tokens WHERE jti = ?", (jti,)).fetchone()
            cursor = conn.execute(
                "INSERT OR IGNORE INTO revoked VALUES (?, ?, ?, ?)",
                (jti, self.clock(), actor.operator, row["expires_at"] if row else None),
            )
            fresh = cursor.rowcount == 1
            if fresh:
                self._audit(conn, actor, "token.revoke", jti, {"recorded": row is not None})
        return self.token(jti), fresh

    # -- operators and other audited events ---------------------------------------------------

    def record_event(
        self, actor: Actor, action: str, target: str, details: Mapping[str, Any]
    ) -> None:
        """An audit entry for a change that is not a stored object (disconnect, drain)."""
        with self._write() as conn:
            self._audit(conn, actor, action, target, details)

    def add_operator(self, name: str, actor: Actor) -> str:
        """Create an operator; returns its bearer token (stored only as a hash)."""
        check_tenant_id(name)  # same syntax as tenant ids
        token = new_operator_token()
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM operators WHERE name = ?", (name,)).fetchone():
                raise Conflict([f"operator {name!r} already exists"])
            conn.execute(
                "INSERT INTO operators VALUES (?, ?, ?)", (name, token_hash(token), self.clock())
            )
            self._audit(conn, actor, "operator.create", name, {})
        return token

    def remove_operator(self, name: str, actor: Actor) -> None:
        with self._write() as conn:
            if conn.execute("DELETE FROM operators WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"no operator {name!r}")
            self._audit(conn, actor, "operator.remove", name, {})

    def ensure_operator(self) -> Path | None:
        """On a store without operators, create ``admin`` and write its token to the state
        directory's ``admin-token`` (mode 0600); returns that path, or None if nothing was done.
        """
        with self._lock:
            if self.operators():
                return None
            token = self.add_operator(DEFAULT_OPERATOR, SYSTEM)
            path = self.state_dir / ADMIN_TOKEN_FILE
            write_atomic(path, (token + "\n").encode(), mode=0o600)
        return path


def _normalised(grants: Iterable[str]) -> list[str]:
    """Normalised, de-duplicated grants (raises BadAlias)."""
    return list(dict.fromkeys(normalise_grant(g) for g in grants))


def _changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """``{field: [old, new]}`` for the fields that differ (``updated_at`` left out)."""
    return {
        key: [before[key], after[key]]
        for key in after
        if key != "updated_at" and before.get(key) != after[key]
    }
