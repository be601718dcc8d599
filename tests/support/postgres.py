"""A real PostgreSQL server as pytest fixtures (the server itself: :mod:`harness.postgres`).

Fixtures: ``postgres_server`` (one per session) and ``postgres_url`` (a fresh database per test,
``CREATE DATABASE`` with a unique name, and its ``postgresql://`` URL). A missing server skips
locally and fails under ``CI=true`` (``make test`` installs Debian's ``postgresql``). The names
of :mod:`harness.postgres` are re-exported here for the tests that import them from this module.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from harness import postgres as _server
from harness.postgres import *  # noqa: F403
from harness.postgres import MISSING, PostgresServer, find_bin_dir


def require_bin_dir() -> Path:
    """:func:`harness.postgres.find_bin_dir`, or skip the test (fail it under ``CI=true``)."""
    found = find_bin_dir()
    if found is not None:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail(MISSING)
    pytest.skip(MISSING)


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A started server of its own for the block; skips the test when none is installed."""
    with _server.running_postgres(require_bin_dir()) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with running_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh database of the session server, as a ``postgresql://`` URL (with a password
    that trust authentication ignores, so tests can check it is never shown)."""
    name = postgres_server.create_database()
    yield postgres_server.url(name, password="s3cret-pw")
    with contextlib.suppress(psycopg.Error):
        postgres_server.drop_database(name)
