"""The portal database: migrations by ``PRAGMA user_version``, WAL, foreign keys, refusal of a
database written by a newer portal."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from portal.db import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Database,
    DatabaseError,
    Migration,
    SchemaTooNew,
    schema_version,
)

STEP_1 = Migration("things", "CREATE TABLE things (id INTEGER PRIMARY KEY, name TEXT);")
STEP_2 = Migration(
    "colour of things",
    "ALTER TABLE things ADD COLUMN colour TEXT NOT NULL DEFAULT 'red';\n"
    "CREATE INDEX things_colour ON things(colour);",
)


def test_a_new_database_gets_every_step(tmp_path: Path) -> None:
    db = Database(tmp_path / "state")
    applied = db.open()
    assert applied == [m.description for m in MIGRATIONS]
    with db.connect() as conn:
        assert schema_version(conn) == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.open() == []  # idempotent


def test_foreign_keys_are_enforced(tmp_path: Path) -> None:
    db = Database(tmp_path)
    db.open()
    with db.connect() as conn, pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO memberships (user_id, group_id) VALUES (41, 42)")


def test_an_older_database_is_migrated_forward_keeping_its_data(tmp_path: Path) -> None:
    Database(tmp_path, [STEP_1]).open()
    with Database(tmp_path, [STEP_1]).connect() as conn:
        conn.execute("INSERT INTO things (name) VALUES ('kept')")
    db = Database(tmp_path, [STEP_1, STEP_2])
    assert db.open() == ["colour of things"]
    with db.connect() as conn:
        assert schema_version(conn) == 2
        row = conn.execute("SELECT name, colour FROM things").fetchone()
        assert tuple(row) == ("kept", "red")


def test_a_newer_database_is_refused_untouched(tmp_path: Path) -> None:
    Database(tmp_path, [STEP_1, STEP_2]).open()
    with pytest.raises(SchemaTooNew) as exc:
        Database(tmp_path, [STEP_1]).open()
    message = str(exc.value)
    assert "schema version 2" in message and "supports (1)" in message
    assert "upgrade csc-portal" in message
    with Database(tmp_path, [STEP_1, STEP_2]).connect() as conn:
        assert schema_version(conn) == 2


def test_a_failing_step_leaves_the_previous_version(tmp_path: Path) -> None:
    broken = Migration("broken", "CREATE TABLE half (id INTEGER);\nINSERT INTO nowhere VALUES (1);")
    Database(tmp_path, [STEP_1]).open()
    with pytest.raises(DatabaseError):
        Database(tmp_path, [STEP_1, broken]).open()
    with Database(tmp_path, [STEP_1]).connect() as conn:
        assert schema_version(conn) == 1
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "half" not in tables


def test_concurrent_opens_apply_each_step_once(tmp_path: Path) -> None:
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            results.append(Database(tmp_path, [STEP_1, STEP_2]).open())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    applied = [step for result in results for step in result]
    assert sorted(applied) == sorted(["things", "colour of things"])


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "portal.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DatabaseError) as exc:
        Database(tmp_path).open()
    assert "portal.db" in str(exc.value)
