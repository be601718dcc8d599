"""csc/store (SQLite in the state directory) and csc/registry (the node's view of it).

The tests that take the ``db`` fixture (or ``store``, opened from it) are the store's contract:
tests/integration/test_store_postgres.py runs them again with ``db`` on PostgreSQL.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from csc.relay.registry import MemoryRegistry
from csc.store import ADMIN_TOKEN_FILE, DB_FILE, MIGRATIONS, Store, StoreError, token_hash
from csc.tenants import Actor, Conflict, NotFound, Tenant, parse_tenant_update
from shared.errors import AliasForbidden, AliasTaken
from shared.tokens import load_or_create_signing_key, verify_token

ALICE = Actor("alice", "127.0.0.1")
NOW = time.time()


class Db(Protocol):
    """One database under test: stores open on it, and a few direct manipulations."""

    state_dir: Path

    def open(self) -> Store: ...

    def set_schema_version(self, version: int) -> None: ...

    def hold_write_lock(self) -> contextlib.AbstractContextManager[None]:
        """Another process holds the write lock (and has changed something) for the block."""
        ...


@dataclass
class SQLiteDb:
    state_dir: Path

    def open(self) -> Store:
        return Store(self.state_dir)

    def set_schema_version(self, version: int) -> None:
        with sqlite3.connect(self.state_dir / DB_FILE) as conn:
            conn.execute(f"PRAGMA user_version = {version}")

    @contextlib.contextmanager
    def hold_write_lock(self) -> Iterator[None]:
        with sqlite3.connect(self.state_dir / DB_FILE, isolation_level=None) as other:
            other.execute("BEGIN IMMEDIATE")
            other.execute("DELETE FROM aliases")
            try:
                yield
            finally:
                other.execute("ROLLBACK")


@pytest.fixture
def db(tmp_path: Path) -> Db:
    return SQLiteDb(tmp_path / "state")


@pytest.fixture
def store(db: Db) -> Iterator[Store]:
    s = db.open()
    yield s
    s.close()


def _tenant(tenant_id: str, **over: object) -> Tenant:
    values: dict[str, object] = {"id": tenant_id, "name": tenant_id.title(), "created_at": NOW}
    values.update(over)
    return Tenant(**values)  # type: ignore[arg-type]


def test_fresh_store(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Store(state).close()
    assert stat.S_IMODE((state / DB_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    with sqlite3.connect(state / DB_FILE) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_first_operator(db: Db, store: Store) -> None:
    assert store.tenants() == [] and store.operators() == [] and store.audit() == []
    path = store.ensure_operator()
    assert path == db.state_dir / ADMIN_TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert token.startswith("csc_op_") and len(token) > 40
    assert store.catalog().operators == {token_hash(token): "admin"}
    assert store.ensure_operator() is None  # only once
    [entry] = store.audit()
    assert (entry.operator, entry.action, entry.target) == ("system", "operator.create", "admin")
    assert token not in json.dumps(entry.to_json())


def test_newer_schema_is_refused(db: Db) -> None:
    db.open().close()
    db.set_schema_version(len(MIGRATIONS) + 1)
    with pytest.raises(StoreError, match="newer than this csc understands"):
        db.open()


def test_not_a_database(tmp_path: Path) -> None:
    (tmp_path / DB_FILE).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=DB_FILE):
        Store(tmp_path)


def test_tenant_lifecycle_is_audited(store: Store) -> None:
    store.create_tenant(_tenant("acme"), ALICE)
    with pytest.raises(Conflict, match="already exists"):
        store.create_tenant(_tenant("acme"), ALICE)
    after = store.update_tenant("acme", parse_tenant_update({"state": "suspended"}), ALICE)
    assert after.suspended and store.tenant("acme").suspended
    store.update_tenant("acme", parse_tenant_update({"contact": "x@acme.org"}), ALICE)
    store.update_tenant("acme", parse_tenant_update({"state": "active"}), ALICE)
    with pytest.raises(NotFound, match="no tenant 'nope'"):
        store.update_tenant("nope", parse_tenant_update({}), ALICE)
    store.assign("acme", ["a@acme.org"], ALICE)
    with pytest.raises(Conflict, match=re.escape("still has aliases a@acme.org")):
        store.delete_tenant("acme", cascade=False, actor=ALICE)
    summary = store.delete_tenant("acme", cascade=True, actor=ALICE)
    assert summary == {"aliases_freed": ["a@acme.org"], "tokens_revoked": 0}
    assert store.tenants() == [] and store.assignments() == []
    actions = [e.action for e in reversed(store.audit())]
    assert actions == [
        "tenant.create",
        "tenant.suspend",
        "tenant.update",
        "tenant.resume",
        "alias.assign",
        "tenant.delete",
    ]
    update = store.audit(limit=4)[-1]
    assert update.details == {"contact": ["", "x@acme.org"]}
    assert all(e.operator == "alice" and e.remote == "127.0.0.1" for e in store.audit())
    assert [e.action for e in store.audit(limit=2, before=store.audit()[1].id)] == [
        "tenant.resume",
        "tenant.update",
    ]


def test_assign_is_all_or_nothing(store: Store) -> None:
    with pytest.raises(NotFound):
        store.assign("ghost", ["a@b.org"], ALICE)
    store.create_tenant(_tenant("acme"), ALICE)
    store.create_tenant(_tenant("evil"), ALICE)
    assert store.assign("acme", ["Acme@Example.com", "*@acme.org"], ALICE) == [
        "acme@example.com",
        "*@acme.org",
    ]
    assert store.assign("acme", ["acme@example.com"], ALICE) == []  # idempotent
    with pytest.raises(Conflict) as info:
        store.assign("evil", ["new@example.com", "acme@example.com", "x@acme.org"], ALICE)
    assert info.value.code == "alias_taken" and len(info.value.problems) == 2
    assert [a.alias for a in store.assignments("evil")] == []
    store.unassign("acme", "acme@example.com", ALICE)
    with pytest.raises(NotFound, match="not assigned to tenant 'acme'"):
        store.unassign("acme", "acme@example.com", ALICE)


def test_issue_record_and_revoke(store: Store, tmp_path: Path) -> None:
    key, _ = load_or_create_signing_key(tmp_path / "keys")
    args = {"ttl": 3600.0, "audience": "csc-agent", "issuer": "csc", "actor": ALICE}
    with pytest.raises(NotFound):
        store.issue_token(key, tenant="acme", grants=["a@acme.org"], **args)
    store.create_tenant(_tenant("acme"), ALICE)
    store.assign("acme", ["*@acme.org"], ALICE)
    with pytest.raises(Conflict) as info:
        store.issue_token(key, tenant="acme", grants=["a@acme.org", "b@x.org"], **args)
    assert info.value.code == "not_assigned"
    assert info.value.problems == ["'b@x.org' is not assigned to tenant 'acme'"]
    token, record = store.issue_token(key, tenant="acme", grants=["A@acme.org"], **args)
    claims = verify_token(token, [key.public_key()], audience="csc-agent", issuer="csc")
    assert (claims.jti, claims.aliases, claims.expires_at) == (
        record.jti,
        ("a@acme.org",),
        record.expires_at,
    )
    assert store.tokens("acme") == [record] and record.issued_by == "alice"
    assert token not in json.dumps([e.to_json() for e in store.audit()])
    revoked, fresh = store.revoke_token(record.jti, ALICE)
    assert fresh and revoked is not None and revoked.status(time.time()) == "revoked"
    assert store.revoke_token(record.jti, ALICE)[1] is False  # idempotent, audited once
    assert record.jti in store.catalog().revoked
    unknown, fresh = store.revoke_token("leaked-before-records", ALICE)
    assert unknown is None and fresh and "leaked-before-records" in store.catalog().revoked
    assert [e.action for e in store.audit(limit=2)] == ["token.revoke", "token.revoke"]


def test_issue_with_assign_and_delete_revokes(store: Store, tmp_path: Path) -> None:
    key, _ = load_or_create_signing_key(tmp_path / "keys")
    args = {"ttl": 60.0, "audience": "a", "issuer": "i", "actor": ALICE, "assign": True}
    _, record = store.issue_token(key, tenant="acme", grants=["a@acme.org"], **args)
    assert store.tenant("acme").name == "acme" and store.catalog().owner("a@acme.org") == "acme"
    with pytest.raises(Conflict) as info:
        store.issue_token(key, tenant="evil", grants=["a@acme.org"], **args)
    assert info.value.code == "alias_taken"
    with pytest.raises(NotFound):
        store.tenant("evil")  # the refused call created nothing
    summary = store.delete_tenant("acme", cascade=True, actor=ALICE)
    assert summary["tokens_revoked"] == 1
    assert store.token(record.jti) is not None
    assert store.token(record.jti).status(time.time()) == "revoked"


def test_another_process_changes_are_seen(db: Db) -> None:
    first, second = db.open(), db.open()
    try:
        version = first.data_version()
        second.create_tenant(_tenant("acme"), ALICE)
        assert first.data_version() != version
        assert "acme" in first.catalog().tenants
    finally:
        first.close()
        second.close()


def test_own_writes_change_the_version_and_reads_never_wait(db: Db, store: Store) -> None:
    version = store.data_version()
    store.create_tenant(_tenant("acme"), ALICE)
    assert store.data_version() != version
    with db.hold_write_lock():
        started = time.monotonic()
        assert "acme" in store.catalog().tenants
        store.data_version()
        assert time.monotonic() - started < 1.0  # not the 5 s busy timeout


def test_concurrent_writers_lose_nothing(db: Db) -> None:
    db.open().close()

    def work(i: int) -> None:
        s = db.open()
        try:
            s.create_tenant(_tenant(f"t{i}"), ALICE)
            s.assign(f"t{i}", [f"a{i}@example.com"], ALICE)
        finally:
            s.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = db.open()
    try:
        assert len(s.assignments()) == 8 and len(s.audit(limit=100)) == 16
    finally:
        s.close()


def test_legacy_tenants_json_is_migrated_once(db: Db) -> None:
    db.state_dir.mkdir(parents=True, exist_ok=True)
    legacy = db.state_dir / "tenants.json"
    legacy.write_text(
        json.dumps({"acme@example.com": "acme", "*@acme.org": "acme", "b@x.org": "b"})
    )
    s = db.open()
    try:
        assert [t.id for t in s.tenants()] == ["acme", "b"]
        assert s.tenant("acme").state == "active"
        assert s.catalog().owner("x@acme.org") == "acme"
        [entry] = s.audit()
        assert entry.action == "tenants.migrate" and entry.details == {"aliases": 3}
    finally:
        s.close()
    assert not legacy.exists() and (db.state_dir / "tenants.json.migrated").exists()
    legacy.write_text(json.dumps({"late@example.com": "late"}))  # not read again
    s = db.open()
    try:
        assert [t.id for t in s.tenants()] == ["acme", "b"]
    finally:
        s.close()


def test_corrupt_legacy_file_stops_the_migration(db: Db) -> None:
    db.state_dir.mkdir(parents=True, exist_ok=True)
    (db.state_dir / "tenants.json").write_text("[1]")
    with pytest.raises(StoreError, match="cannot migrate"):
        db.open()
    (db.state_dir / "tenants.json").write_text("{}")
    db.open().close()  # nothing was committed: the fixed file migrates


# --- the registry ------------------------------------------------------------------------------


@dataclass(eq=False)
class FakeSession:
    tenant: str
    grants: tuple[str, ...]
    jti: str = "j"
    expires_at: float = NOW + 3600
    accepting: bool = True
    load: int = 0


def test_registry_routes_to_the_owner_only(store: Store) -> None:
    registry: MemoryRegistry[FakeSession] = MemoryRegistry(source=store)
    store.create_tenant(_tenant("acme"), ALICE)
    store.create_tenant(_tenant("evil"), ALICE)
    store.assign("acme", ["*@acme.org", "acme@example.com"], ALICE)
    assert registry.owner("x@acme.org") == "acme"  # re-read on the miss
    busy = FakeSession("acme", ("*@acme.org",), load=3)
    idle = FakeSession("acme", ("x@acme.org",))
    for s in (busy, idle):
        registry.bind(s)
    with pytest.raises(AliasTaken):
        registry.bind(FakeSession("evil", ("acme@example.com",)))
    with pytest.raises(AliasForbidden, match="not assigned to tenant evil"):
        registry.bind(FakeSession("evil", ("free@example.com",)))
    found = registry.lookup("x@acme.org")
    assert found.tenant == "acme" and found.sessions == (idle, busy)
    assert found.owner is not None and found.owner.name == "Acme"
    assert registry.lookup("unknown@acme.com").tenant is None
    store.unassign("acme", "*@acme.org", ALICE)
    store.assign("evil", ["*@acme.org"], ALICE)
    registry.refresh(force=True)
    found = registry.lookup("x@acme.org")
    assert found.tenant == "evil" and found.sessions == ()  # acme's sessions no longer serve it
    registry.unbind(busy)
    registry.unbind(idle)
    assert list(registry.sessions()) == []


def test_registry_names_the_sessions_that_must_end(store: Store) -> None:
    registry: MemoryRegistry[FakeSession] = MemoryRegistry(source=store)
    for name in ("acme", "beta", "gone"):
        store.create_tenant(_tenant(name), ALICE)
        store.assign(name, [f"*@{name}.org"], ALICE)
    registry.refresh(force=True)
    sessions = {
        "fine": FakeSession("acme", ("*@acme.org",), jti="ok"),
        "revoked": FakeSession("acme", ("*@acme.org",), jti="bad"),
        "expired": FakeSession("acme", ("*@acme.org",), jti="old", expires_at=NOW - 60),
        "suspended": FakeSession("beta", ("*@beta.org",)),
        "deleted": FakeSession("gone", ("*@gone.org",)),
    }
    for s in sessions.values():
        registry.bind(s)
    [(expired, err)] = registry.ending(time.time())
    assert expired is sessions["expired"] and err.message == "token expired"
    store.revoke_token("bad", ALICE)
    store.update_tenant("beta", parse_tenant_update({"state": "suspended"}), ALICE)
    store.delete_tenant("gone", cascade=True, actor=ALICE)
    registry.refresh(force=True)
    ending = {s.jti + s.tenant: (err.code, err.spec.close_code) for s, err in registry.ending(NOW)}
    assert ending == {
        "badacme": ("auth_failed", 4401),
        "oldacme": ("auth_failed", 4401),
        "jbeta": ("tenant_suspended", 4423),
        "jgone": ("auth_failed", 4401),
    }
