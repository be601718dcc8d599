"""A damaged ``csc.db`` and ``csc db check|backup`` over real files and real ``csc`` processes.

An existing empty database is never a first start; a truncated or garbled one stops ``csc
serve`` with one line naming the file and what to do (no traceback); ``csc db check`` reports
integrity and schema; a backup taken with ``csc db backup`` restores every tenant, alias and
operator. With ``database_url`` (a real PostgreSQL), ``check`` reaches it and ``backup`` points
to pg_dump.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from csc.store import Store
from csc.store.postgres import PostgresBackend
from csc.tenants import Actor
from tests.support.inproc import make_token
from tests.support.procs import scaled

DB = "csc.db"


def csc(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "csc", *argv],
        capture_output=True,
        text=True,
        timeout=scaled(timeout),
        check=False,
        env={**os.environ, "CSC_LOG_FORMAT": "text"},
    )


def serve(state: Path) -> subprocess.CompletedProcess[str]:
    """``csc serve`` on ``state`` (it must refuse to start: the timeout fails the test)."""
    return csc(
        "serve",
        "--state-dir",
        str(state),
        "--listen",
        "127.0.0.1:0",
        "--tcp-listen",
        "off",
        "--admin-listen",
        "off",
        "--metrics-listen",
        "off",
    )


@pytest.fixture
def good_state(tmp_path: Path) -> Path:
    """A state directory with a tenant, an alias, a token and an operator, WAL folded in."""
    state = tmp_path / "good"
    make_token(state, "acme", ["acme@example.com"])
    store = Store(state)
    try:
        store.add_operator("bob", Actor("test", "local"))
    finally:
        store.close()
    for leftover in state.glob(f"{DB}-*"):
        leftover.unlink()
    return state


def _copy(good: Path, to: Path, damage: str) -> Path:
    shutil.copytree(good, to)
    path = to / DB
    data = bytearray(path.read_bytes())
    if damage == "empty":
        data = bytearray()
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    elif damage == "garbled pages":  # a valid header, the pages after the first scrambled
        data[8192:] = os.urandom(len(data) - 8192)
    path.write_bytes(bytes(data))
    return to


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "garbled pages"])
def test_a_damaged_database_stops_the_node_with_one_clear_line(
    good_state: Path, tmp_path: Path, damage: str
) -> None:
    state = _copy(good_state, tmp_path / "damaged", damage)
    before = (state / DB).read_bytes()
    done = serve(state)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"csc: cannot start: {state / DB} is ")
    assert ("is empty (0 bytes)" if damage == "empty" else "is damaged") in lines[0]
    assert "restore the last backup" in lines[0] and "csc db check" in lines[0]
    assert (state / DB).read_bytes() == before  # never turned into a new, empty CSC

    checked = csc("db", "check", "--state-dir", str(state))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "problem" in checked.stdout and "Traceback" not in checked.stderr


def test_a_backup_restores_tenants_aliases_and_operators(good_state: Path, tmp_path: Path) -> None:
    checked = csc("db", "check", "--state-dir", str(good_state))
    assert checked.returncode == 0, checked.stderr
    assert "PRAGMA integrity_check: ok" in checked.stdout
    assert "version 2 (current)" in checked.stdout
    assert "1 tenants, 1 aliases, 1 operators, 1 tokens" in checked.stdout

    saved = tmp_path / "backup" / "csc-backup.db"
    saved.parent.mkdir()
    store = Store(good_state)  # a node holding the database open while it is backed up
    try:
        done = csc("db", "backup", "--state-dir", str(good_state), str(saved))
        assert done.returncode == 0, done.stderr
        assert saved.stat().st_mode & 0o777 == 0o600
        again = csc("db", "backup", "--state-dir", str(good_state), str(saved))
        assert again.returncode == 2 and "exists already" in again.stderr
    finally:
        store.close()

    (good_state / DB).write_bytes(b"\0" * 4096)  # the disk lost it
    assert serve(good_state).returncode == 1
    for leftover in good_state.glob(f"{DB}-*"):
        leftover.unlink()
    shutil.copyfile(saved, good_state / DB)  # the restore of docs/operations.md

    assert csc("db", "check", "--state-dir", str(good_state)).returncode == 0
    restored = Store(good_state)
    try:
        assert [t.id for t in restored.tenants()] == ["acme"]
        assert [name for name, _ in restored.operators()] == ["bob"]
    finally:
        restored.close()


def test_check_and_backup_of_a_missing_database(tmp_path: Path) -> None:
    checked = csc("db", "check", "--state-dir", str(tmp_path / "none"))
    assert checked.returncode == 1 and "does not exist" in checked.stdout
    done = csc("db", "backup", "--state-dir", str(tmp_path / "none"), str(tmp_path / "b.db"))
    assert done.returncode == 1 and "does not exist" in done.stderr
    assert not (tmp_path / "b.db").exists()


def test_postgres_check_and_backup(postgres_url: str, tmp_path: Path) -> None:
    fresh = csc("db", "check", "--database-url", postgres_url)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert "reachable" in fresh.stdout and "no CSC schema yet" in fresh.stdout
    assert "s3cret-pw" not in fresh.stdout + fresh.stderr
    Store(tmp_path / "s", backend=PostgresBackend(postgres_url)).close()
    done = csc("db", "check", "--database-url", postgres_url)
    assert done.returncode == 0 and "version 2 (current)" in done.stdout, done.stdout
    refused = csc("db", "backup", "--database-url", postgres_url, str(tmp_path / "b.db"))
    assert refused.returncode == 2 and "pg_dump" in refused.stderr
    assert "s3cret-pw" not in refused.stderr
