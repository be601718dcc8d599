"""The store of managed objects, written once for every backend (SQLite or PostgreSQL).

It holds tenants, alias assignments, the metadata of issued agent tokens (never a token itself),
revoked token ids, operators (names and SHA-256 hashes of their bearer tokens), the audit log
and, for a cluster, the shared token-signing key. Every change is one write transaction of the
backend (serialised against every other writer, of any process or node) that also appends its
audit entry: a change and its audit entry are committed together or not at all.

The schema is versioned (:data:`csc.store.schema.MIGRATIONS`, upgraded step by step on open; a
newer schema is refused). The first step imports a legacy ``tenants.json`` of the state
directory once (its grants become assignments of automatically created active tenants; the file
is renamed ``tenants.json.migrated``).

Invariants: an alias is assigned to at most one tenant and no tenant's pattern covers another
tenant's alias (checked in the same transaction that writes); a deleted tenant's recorded tokens
are revoked. Methods are synchronous and thread-safe; the node calls them from worker threads,
except :meth:`Store.data_version` and :meth:`Store.catalog` (the registry's polling).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from csc.store.backend import Backend, Row, StoreError, Tx
from csc.store.schema import MIGRATIONS
from csc.store.sqlite import SQLiteBackend
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

ADMIN_TOKEN_FILE = "admin-token"
DEFAULT_OPERATOR = "admin"
SYSTEM = Actor("system", "local")
MAX_AUDIT_PAGE = 1000


def token_hash(token: str) -> str:
    """How an operator token is stored and looked up (tokens are random: no slow hash needed)."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_operator_token() -> str:
    return "csc_op_" + secrets.token_urlsafe(32)


def _tenant(row: Row) -> Tenant:
    return Tenant(
        id=row["id"],
        name=row["name"],
        contact=row["contact"],
        state=row["state"],
        limits=Limits(row["max_sessions"], row["max_streams"], row["max_request_rate"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _token(row: Row) -> TokenRecord:
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


def _exists(tx: Tx, sql: str, *args: Any) -> bool:
    return tx.execute(sql, args).first() is not None


class Store:
    """The managed objects: by default SQLite ``csc.db`` in ``state_dir``; another database
    through ``backend`` (:func:`csc.store.open_store` picks it from the configuration).
    ``state_dir`` is where a legacy ``tenants.json`` is imported from and the first operator's
    ``admin-token`` is written."""

    def __init__(
        self,
        state_dir: Path,
        *,
        clock: Callable[[], float] = time.time,
        backend: Backend | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.clock = clock
        self._db: Backend = backend if backend is not None else SQLiteBackend(state_dir)
        self._dialect = self._db.dialect
        self.where = self._db.where
        try:
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    # -- schema -------------------------------------------------------------------------------

    def _write(self) -> contextlib.AbstractContextManager[Tx]:
        return self._db.write()

    def _read(self, sql: str, args: Iterable[Any] = ()) -> list[Row]:
        return self._db.read(lambda tx: tx.execute(sql, tuple(args)).rows)

    def _migrate(self) -> None:
        with self._db.migration() as (tx, version):
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"{self.where}: schema version {version} is newer than this csc understands "
                    f"({len(MIGRATIONS)}): upgrade csc"
                )
            for step in range(version, len(MIGRATIONS)):
                for statement in MIGRATIONS[step]:
                    tx.execute(self._dialect.ddl(statement))
                if step == 0:
                    self._import_legacy(tx)
            if version < len(MIGRATIONS):
                self._db.set_schema_version(tx, len(MIGRATIONS))
        legacy = self.state_dir / LEGACY_TENANTS_FILE
        if version == 0 and legacy.exists():
            with contextlib.suppress(OSError):
                legacy.rename(legacy.with_name(legacy.name + ".migrated"))

    def _import_legacy(self, tx: Tx) -> None:
        path = self.state_dir / LEGACY_TENANTS_FILE
        if not path.exists():
            return
        try:
            grants = read_legacy_tenants(path)
        except (TenantsFileError, OSError) as exc:
            raise StoreError(f"cannot migrate {path}: {exc}") from None
        now = self.clock()
        for tenant in sorted(set(grants.values())):
            self._insert_tenant(tx, Tenant(id=tenant, name=tenant, created_at=now, updated_at=now))
        for grant, tenant in grants.items():
            tx.execute("INSERT INTO aliases VALUES (?, ?, ?)", (grant, tenant, now))
        self._audit(tx, SYSTEM, "tenants.migrate", str(path), {"aliases": len(grants)})
        log.info("migrated %d aliases of %s into %s", len(grants), path, self.where)

    def _audit(
        self,
        tx: Tx,
        actor: Actor,
        action: str,
        target: str,
        details: Mapping[str, Any],
    ) -> None:
        tx.execute(
            "INSERT INTO audit (at, operator, remote, action, target, details) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (self.clock(), actor.operator, actor.remote, action, target, json.dumps(details)),
        )

    # -- reads --------------------------------------------------------------------------------

    def data_version(self) -> int:
        """Changes whenever anything (this process's writes included) was committed since the
        last call; cheap, so the node polls it."""
        return self._db.data_version()

    def catalog(self) -> Catalog:
        """The snapshot a node serves lookups from (revocations of expired tokens left out),
        read in one transaction, so it is consistent."""
        horizon = self.clock() - DEFAULT_LEEWAY

        def read(tx: Tx) -> Catalog:
            rows = tx.execute("SELECT * FROM tenants").rows
            tenants = {r["id"]: _tenant(r) for r in rows}
            assigned = {r["alias"]: r["tenant"] for r in tx.execute("SELECT * FROM aliases").rows}
            revoked = frozenset(
                r["jti"]
                for r in tx.execute(
                    "SELECT jti FROM revoked WHERE expires_at IS NULL OR expires_at > ?",
                    (horizon,),
                ).rows
            )
            rows = tx.execute("SELECT * FROM operators").rows
            operators = {r["token_sha256"]: r["name"] for r in rows}
            return Catalog(tenants, assigned, revoked, operators)

        return self._db.snapshot(read)

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
    def _insert_tenant(tx: Tx, t: Tenant) -> None:
        tx.execute(
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
        with self._write() as tx:
            if _exists(tx, "SELECT 1 FROM tenants WHERE id = ?", tenant.id):
                raise Conflict([f"tenant {tenant.id!r} already exists"])
            self._insert_tenant(tx, tenant)
            self._audit(tx, actor, "tenant.create", tenant.id, tenant.to_json())
        return tenant

    def update_tenant(self, tenant_id: str, update: TenantUpdate, actor: Actor) -> Tenant:
        with self._write() as tx:
            rows = tx.execute("SELECT * FROM tenants WHERE id = ?", (tenant_id,)).rows
            if not rows:
                raise NotFound(f"no tenant {tenant_id!r}")
            before = _tenant(rows[0])
            after = update.apply(before, self.clock())
            tx.execute(
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
            self._audit(tx, actor, action, tenant_id, changes)
        return after

    def delete_tenant(self, tenant_id: str, cascade: bool, actor: Actor) -> dict[str, Any]:
        """Delete a tenant; with aliases left only when ``cascade`` (they are freed).

        The tenant's unrevoked tokens are revoked, so they stay dead if the id is reused.
        """
        with self._write() as tx:
            if not _exists(tx, "SELECT 1 FROM tenants WHERE id = ?", tenant_id):
                raise NotFound(f"no tenant {tenant_id!r}")
            aliases = [
                r["alias"]
                for r in tx.execute(
                    "SELECT alias FROM aliases WHERE tenant = ? ORDER BY alias", (tenant_id,)
                ).rows
            ]
            if aliases and not cascade:
                raise Conflict(
                    [
                        f"tenant {tenant_id!r} still has aliases {', '.join(aliases)}: unassign "
                        "them first, or delete with --cascade (cascade=true) to free them"
                    ]
                )
            tx.execute("DELETE FROM aliases WHERE tenant = ?", (tenant_id,))
            revoked = self._revoke_all(tx, tenant_id, actor)
            tx.execute("DELETE FROM tenants WHERE id = ?", (tenant_id,))
            summary = {"aliases_freed": aliases, "tokens_revoked": revoked}
            self._audit(tx, actor, "tenant.delete", tenant_id, summary)
        return summary

    def _revoke_all(self, tx: Tx, tenant_id: str, actor: Actor) -> int:
        result = tx.execute(
            "INSERT INTO revoked (jti, revoked_at, revoked_by, expires_at) "
            "SELECT jti, ?, ?, expires_at FROM tokens "
            "WHERE tenant = ? AND jti NOT IN (SELECT jti FROM revoked)",
            (self.clock(), actor.operator, tenant_id),
        )
        return result.rowcount

    # -- aliases ------------------------------------------------------------------------------

    def assign(self, tenant_id: str, grants: Iterable[str], actor: Actor) -> list[str]:
        """Assign ``grants`` to a tenant (all or nothing); the newly assigned ones."""
        wanted = _normalised(grants)
        with self._write() as tx:
            return self._assign(tx, tenant_id, wanted, actor)

    def _assign(self, tx: Tx, tenant_id: str, grants: list[str], actor: Actor) -> list[str]:
        if not _exists(tx, "SELECT 1 FROM tenants WHERE id = ?", tenant_id):
            raise NotFound(f"no tenant {tenant_id!r}")
        current = {r["alias"]: r["tenant"] for r in tx.execute("SELECT * FROM aliases").rows}
        problems = conflicts(current, tenant_id, grants)
        if problems:
            raise Conflict(problems, code="alias_taken")
        added = [g for g in grants if current.get(g) != tenant_id]
        now = self.clock()
        for grant in added:
            tx.execute("INSERT INTO aliases VALUES (?, ?, ?)", (grant, tenant_id, now))
            self._audit(tx, actor, "alias.assign", grant, {"tenant": tenant_id})
        return added

    def unassign(self, tenant_id: str, grant: str, actor: Actor) -> None:
        with self._write() as tx:
            result = tx.execute(
                "DELETE FROM aliases WHERE alias = ? AND tenant = ?", (grant, tenant_id)
            )
            if result.rowcount == 0:
                raise NotFound(f"{grant!r} is not assigned to tenant {tenant_id!r}")
            self._audit(tx, actor, "alias.unassign", grant, {"tenant": tenant_id})

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
        with self._write() as tx:
            if assign:
                self._ensure_tenant(tx, tenant, actor)
                self._assign(tx, tenant, grants, actor)
            self._check_issuable(tx, tenant, grants)
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
            tx.execute(
                "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?)",
                (record.jti, tenant, json.dumps(grants), issued, record.expires_at, actor.operator),
            )
            details = {"tenant": tenant, "aliases": grants, "expires_at": record.expires_at}
            self._audit(tx, actor, "token.issue", record.jti, details)
        return token, record

    @staticmethod
    def _check_issuable(tx: Tx, tenant: str, grants: list[str]) -> None:
        if not _exists(tx, "SELECT 1 FROM tenants WHERE id = ?", tenant):
            raise NotFound(f"no tenant {tenant!r}")
        assigned = {r["alias"]: r["tenant"] for r in tx.execute("SELECT * FROM aliases").rows}
        problems = Catalog(assigned=assigned).not_assigned(tenant, grants)
        if problems:
            raise Conflict(problems, code="not_assigned")

    def _ensure_tenant(self, tx: Tx, tenant: str, actor: Actor) -> None:
        if _exists(tx, "SELECT 1 FROM tenants WHERE id = ?", tenant):
            return
        now = self.clock()
        created = Tenant(id=tenant, name=tenant, created_at=now, updated_at=now)
        self._insert_tenant(tx, created)
        self._audit(tx, actor, "tenant.create", tenant, created.to_json())

    def revoke_token(self, jti: str, actor: Actor) -> tuple[TokenRecord | None, bool]:
        """Revoke a token id (recorded or not); the record if known, and whether it was new."""
        with self._write() as tx:
            row = tx.execute("SELECT expires_at FROM tokens WHERE jti = ?", (jti,)).first()
            result = tx.execute(
                self._dialect.insert_ignore("INTO revoked VALUES (?, ?, ?, ?)"),
                (jti, self.clock(), actor.operator, row["expires_at"] if row else None),
            )
            fresh = result.rowcount == 1
            if fresh:
                self._audit(tx, actor, "token.revoke", jti, {"recorded": row is not None})
        return self.token(jti), fresh

    # -- operators and other audited events ---------------------------------------------------

    def record_event(
        self, actor: Actor, action: str, target: str, details: Mapping[str, Any]
    ) -> None:
        """An audit entry for a change that is not a stored object (disconnect, drain)."""
        with self._write() as tx:
            self._audit(tx, actor, action, target, details)

    def add_operator(self, name: str, actor: Actor) -> str:
        """Create an operator; returns its bearer token (stored only as a hash)."""
        check_tenant_id(name)  # same syntax as tenant ids
        with self._write() as tx:
            return self._add_operator(tx, name, actor)

    def _add_operator(self, tx: Tx, name: str, actor: Actor) -> str:
        if _exists(tx, "SELECT 1 FROM operators WHERE name = ?", name):
            raise Conflict([f"operator {name!r} already exists"])
        token = new_operator_token()
        tx.execute(
            "INSERT INTO operators VALUES (?, ?, ?)", (name, token_hash(token), self.clock())
        )
        self._audit(tx, actor, "operator.create", name, {})
        return token

    def remove_operator(self, name: str, actor: Actor) -> None:
        with self._write() as tx:
            if tx.execute("DELETE FROM operators WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"no operator {name!r}")
            self._audit(tx, actor, "operator.remove", name, {})

    def ensure_operator(self) -> Path | None:
        """On a store without operators, create ``admin`` and write its token to the state
        directory's ``admin-token`` (mode 0600); returns that path, or None if nothing was done.
        One transaction: of several nodes starting at once on one database, exactly one does it
        (and a token file that cannot be written creates nothing).
        """
        path = self.state_dir / ADMIN_TOKEN_FILE
        ensure_private_dir(self.state_dir)
        with self._write() as tx:
            if tx.execute("SELECT 1 FROM operators LIMIT 1").first() is not None:
                return None
            token = self._add_operator(tx, DEFAULT_OPERATOR, SYSTEM)
            write_atomic(path, (token + "\n").encode(), mode=0o600)
        return path

    # -- the shared signing key ---------------------------------------------------------------

    def signing_key_pem(self, new_pem: Callable[[], bytes] | None = None) -> tuple[bytes, bool]:
        """The signing key (PEM) kept in the store, and whether this call created it.

        When there is none yet: with ``new_pem``, its result is stored, unless another node
        stored one first (insert-or-ignore, then read back: every caller ends up with the same
        key); without, StoreError.
        """
        rows = self._read("SELECT pem FROM signing_key WHERE id = 1")
        if rows:
            return str(rows[0]["pem"]).encode(), False
        if new_pem is None:
            raise StoreError(f"{self.where}: no signing key in the database yet")
        pem = new_pem()
        with self._write() as tx:
            result = tx.execute(
                self._dialect.insert_ignore("INTO signing_key VALUES (1, ?, ?)"),
                (pem.decode(), self.clock()),
            )
            created = result.rowcount == 1
            if created:
                self._audit(tx, SYSTEM, "signing_key.create", "signing_key", {})
            row = tx.execute("SELECT pem FROM signing_key WHERE id = 1").first()
        if row is None:  # pragma: no cover - the insert or another node's just made it
            raise StoreError(f"{self.where}: the signing key vanished")
        return str(row["pem"]).encode(), created


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
