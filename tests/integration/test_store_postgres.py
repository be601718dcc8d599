"""The store on a real PostgreSQL: the store contract of tests/unit/test_admin_store.py again,
several nodes on one database (changes seen, one migration, one shared signing key), ``csc token
issue --database-url`` verified by a node, and a node outliving a PostgreSQL restart."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from csc import cli
from csc.config import CSCConfig
from csc.relay.registry import MemoryRegistry
from csc.server import running_node
from csc.signing import signing_key
from csc.store import MIGRATIONS, Store, StoreError, StoreUnavailable, open_store
from csc.store.postgres import PostgresBackend
from csc.tenants import Actor
from shared.config import Secret
from tenant_agent.agent import Agent
from tests.support.admin import admin_token
from tests.support.inproc import agent_config, wait_online
from tests.support.postgres import PostgresServer, free_port, running_postgres
from tests.support.procs import REPO_ROOT, child_env, scaled
from tests.support.upstream import start_upstream_server
from tests.unit import test_admin_store as contract

ALICE = Actor("alice", "127.0.0.1")
ALIAS = "acme@example.com"
PASSWORD = "s3cret-pw"  # in every URL of these tests; trust authentication ignores it

# The store contract: every test of the unit module that works through the ``db`` fixture,
# collected here again with ``db`` (below) on PostgreSQL.
CONTRACT = [
    name
    for name, fn in vars(contract).items()
    if name.startswith("test_") and {"db", "store"} & set(inspect.signature(fn).parameters)
]
globals().update({name: getattr(contract, name) for name in CONTRACT})
store = contract.store  # the contract's fixture, opened from ``db`` below


@dataclass
class PostgresDb:
    url: str
    state_dir: Path

    def open(self) -> Store:
        return Store(self.state_dir, backend=PostgresBackend(self.url))

    def set_schema_version(self, version: int) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("UPDATE csc_meta SET schema_version = %s", (version,))

    @contextlib.contextmanager
    def hold_write_lock(self) -> Iterator[None]:
        with psycopg.connect(self.url, autocommit=True) as other:
            other.execute("BEGIN")
            other.execute("UPDATE csc_meta SET data_version = data_version + 1")
            other.execute("DELETE FROM aliases")
            try:
                yield
            finally:
                other.execute("ROLLBACK")


@pytest.fixture
def db(postgres_url: str, tmp_path: Path) -> PostgresDb:
    return PostgresDb(postgres_url, tmp_path / "state")


def _config(url: str, state_dir: Path, **over: Any) -> CSCConfig:
    settings: dict[str, Any] = {"metrics_listen": None, **over}
    return CSCConfig(state_dir=state_dir, database_url=Secret(url), **settings)


def _tenant(tenant_id: str) -> Any:
    return contract._tenant(tenant_id)


def test_the_contract_is_collected_here() -> None:
    assert len(CONTRACT) >= 12 and "test_not_a_database" not in CONTRACT
    assert "test_registry_routes_to_the_owner_only" in CONTRACT


# --- several nodes on one database ---------------------------------------------------------------


def test_two_nodes_see_each_others_changes(db: PostgresDb) -> None:
    first, second = db.open(), db.open()
    try:
        registry: MemoryRegistry[Any] = MemoryRegistry(source=first)
        registry.refresh(force=True)
        assert not registry.refresh()  # nothing changed: the cheap version check says so
        second.create_tenant(_tenant("acme"), ALICE)
        second.assign("acme", [ALIAS], ALICE)
        assert registry.refresh() and registry.owner(ALIAS) == "acme"
        version = second.data_version()
        first.revoke_token("leaked", ALICE)
        assert second.data_version() != version
        assert "leaked" in second.catalog().revoked
    finally:
        first.close()
        second.close()


def test_concurrent_first_start_migrates_once(db: PostgresDb) -> None:
    count = 6
    barrier = threading.Barrier(count)
    stores: list[Store] = []
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            stores.append(db.open())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == [] and len(stores) == count
        with psycopg.connect(db.url) as conn:
            row = conn.execute("SELECT schema_version FROM csc_meta").fetchone()
            assert row == (len(MIGRATIONS),)
        paths = {s.ensure_operator() for s in stores}
        assert len(paths - {None}) == 1  # one node created the first operator
        assert [name for name, _ in stores[0].operators()] == ["admin"]
    finally:
        for s in stores:
            s.close()


def test_signing_key_is_created_once_and_shared(postgres_url: str, tmp_path: Path) -> None:
    configs = [_config(postgres_url, tmp_path / f"node{i}") for i in range(4)]
    stores = [open_store(c) for c in configs]
    try:
        results: list[Any] = [None] * len(stores)
        barrier = threading.Barrier(len(stores))

        def load(i: int) -> None:
            barrier.wait()
            results[i] = signing_key(configs[i], stores[i])

        threads = [threading.Thread(target=load, args=(i,)) for i in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(r.created for r in results) == 1
        raw = {r.key.private_bytes_raw() for r in results}
        assert len(raw) == 1
        assert not any((c.state_dir / "signing-key.pem").exists() for c in configs)
        again = signing_key(configs[0], stores[0], create=False)
        assert again.key.private_bytes_raw() in raw and not again.created
        assert "signing_key.create" in [e.action for e in stores[0].audit()]
    finally:
        for s in stores:
            s.close()


def test_signing_key_file_wins_over_the_database(postgres_url: str, tmp_path: Path) -> None:
    from shared.tokens import create_ed25519_key_file

    key = create_ed25519_key_file(tmp_path / "keys" / "cluster.pem")
    config = _config(
        postgres_url, tmp_path / "node", signing_key_file=tmp_path / "keys/cluster.pem"
    )
    store = open_store(config)
    try:
        found = signing_key(config, store)
        assert found.key.private_bytes_raw() == key.private_bytes_raw() and not found.created
        with pytest.raises(StoreError, match="no signing key in the database"):
            store.signing_key_pem()  # nothing was put in the database
    finally:
        store.close()


# --- the CLI and a node on the same database ----------------------------------------------------


async def test_cli_token_is_verified_by_a_node_on_the_same_database(
    postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["token", "issue", "--database-url", postgres_url, "--state-dir", str(tmp_path / "cli")]
    code = cli.main([*args, "--tenant", "acme", "--alias", ALIAS, "--assign"], env={})
    out, err = capsys.readouterr()
    assert code == 0, err
    token = out.strip()
    assert "created a new signing key in the database postgresql://postgres:***@" in err
    assert PASSWORD not in err
    assert not (tmp_path / "cli" / "signing-key.pem").exists()
    code = cli.main(["token", "verify", token], env={"CSC_DATABASE_URL": postgres_url})
    assert code == 0 and '"tenant": "acme"' in capsys.readouterr().out
    config = _config(postgres_url, tmp_path / "node", listen="127.0.0.1:0", tcp_listen=None)
    upstream = await start_upstream_server()
    try:
        async with running_node(config) as node:
            agent = Agent(agent_config(f"http://{node.http_address}", token, upstream))
            task = asyncio.create_task(agent.run())
            try:
                await wait_online(f"http://{node.http_address}", ALIAS)
            finally:
                agent.stop()
                await asyncio.wait_for(task, scaled(30))
    finally:
        await upstream.close()


def test_operator_cli_on_the_database(
    postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--database-url", postgres_url, "--state-dir", str(tmp_path / "cli")]
    assert cli.main(["operator", "add", "bob", *base], env={}) == 0
    token = capsys.readouterr().out.strip()
    assert cli.main(["operator", "list"], env={"CSC_DATABASE_URL": postgres_url}) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert (
        header.split() == ["OPERATOR", "CREATED"]
        and row.split()[0] == "bob"
        and row.split()[1].startswith("20")
    )
    store = open_store(_config(postgres_url, tmp_path / "node"))
    try:
        assert store.catalog().operators == {contract.token_hash(token): "bob"}
    finally:
        store.close()
    assert cli.main(["operator", "remove", "bob", *base], env={}) == 0


# --- PostgreSQL down -----------------------------------------------------------------------------


def test_unreachable_database_at_start_is_one_clear_line(tmp_path: Path) -> None:
    url = f"postgresql://csc:{PASSWORD}@127.0.0.1:{free_port()}/cscdb"
    flags = ["--listen", "127.0.0.1:0", "--tcp-listen", "off", "--admin-listen", "off"]
    flags += ["--metrics-listen", "off"]
    done = subprocess.run(
        [sys.executable, "-m", "csc", "serve", "--state-dir", str(tmp_path), *flags],
        env=child_env({"CSC_DATABASE_URL": url}),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("csc: cannot start: PostgreSQL postgresql://csc:***@127.0.0.1:")
    assert "/cscdb is unavailable" in lines[0] and "check that the server runs" in lines[0]
    assert PASSWORD not in done.stderr + done.stdout


def test_store_calls_fail_typed_and_recover(tmp_path: Path) -> None:
    with running_postgres() as server:
        url = server.url(server.create_database(), password=PASSWORD)
        store = Store(tmp_path, backend=PostgresBackend(url))
        try:
            store.catalog()
            server.stop()
            server.start()  # both connections of the store are stale now: each is replaced
            store.create_tenant(_tenant("acme"), ALICE)
            assert "acme" in store.catalog().tenants
            server.stop()
            for call in (store.tenants, store.catalog, store.data_version):
                with pytest.raises(StoreUnavailable) as info:
                    call()
                assert PASSWORD not in str(info.value) and "127.0.0.1" in str(info.value)
            with pytest.raises(StoreUnavailable):
                store.create_tenant(_tenant("beta"), ALICE)
            server.start()
            assert [t.id for t in store.tenants()] == ["acme"]  # a fresh connection
            store.create_tenant(_tenant("beta"), ALICE)
        finally:
            store.close()


async def _admin(
    http: aiohttp.ClientSession, base: str, token: str, body: dict[str, Any]
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with http.post(f"{base}/v1/admin/tenants", json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_node_relays_through_a_postgres_restart(tmp_path: Path) -> None:
    with running_postgres() as server:
        await _relay_through_restart(server, tmp_path)


async def _relay_through_restart(server: PostgresServer, tmp_path: Path) -> None:
    url = server.url(server.create_database(), password=PASSWORD)
    state = tmp_path / "node"
    config = _config(
        url,
        state,
        listen="127.0.0.1:0",
        tcp_listen=None,
        admin_listen="127.0.0.1:0",
        metrics_listen=None,
        registry_refresh=0.2,
    )
    upstream = await start_upstream_server()
    try:
        async with running_node(config) as node, aiohttp.ClientSession() as http:
            csc_url = f"http://{node.http_address}"
            base, token = f"http://{node.admin_address}", admin_token(state)
            assert (await _admin(http, base, token, {"id": "acme"}))[0] == 201
            store = node.state.store
            assert store is not None
            agent_token, _ = store.issue_token(
                signing_key(config, store).key,
                tenant="acme",
                grants=[ALIAS],
                ttl=600,
                audience=config.token_audience,
                issuer=config.token_issuer,
                actor=ALICE,
                assign=True,
            )
            agent = Agent(agent_config(csc_url, agent_token, upstream))
            task = asyncio.create_task(agent.run())
            try:
                await wait_online(csc_url, ALIAS)
                await asyncio.to_thread(server.stop)
                status, body = await _admin(http, base, token, {"id": "beta"})
                assert status == 503 and body["error"] == "store_unavailable", body
                assert "127.0.0.1" in body["message"] and PASSWORD not in body["message"]
                assert not node.state.registry.refresh(force=True)  # the last catalog stays
                async with http.get(f"{csc_url}/t/{ALIAS}/small") as resp:
                    assert resp.status == 200  # still relaying
                async with http.get(f"{csc_url}/v1/resolve/nobody@example.com") as resp:
                    assert resp.status == 404  # a miss tries the store, then answers
                await asyncio.to_thread(server.start)
                status, body = await _admin(http, base, token, {"id": "beta"})
                assert status == 201, body
            finally:
                agent.stop()
                await asyncio.wait_for(task, scaled(30))
    finally:
        await upstream.close()
