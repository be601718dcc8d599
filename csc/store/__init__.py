"""The durable store of managed objects: tenants, aliases, tokens, revocations, operators, audit.

One :class:`Store` (the logic, :mod:`csc.store.core`) over one backend: SQLite ``csc.db`` in the
state directory (:mod:`csc.store.sqlite`, the embedded default, one node) or PostgreSQL at
``database_url`` (:mod:`csc.store.postgres`, shared by the nodes of a cluster). Same schema
steps (:mod:`csc.store.schema`), same semantics. :func:`open_store` picks the backend from the
configuration; ``Store(state_dir)`` alone opens SQLite.

Errors: :class:`StoreError` when the database cannot be used at all (refused at start);
its subclass :class:`StoreUnavailable` when a database server cannot be reached right now (the
admin API answers 503 ``store_unavailable``; the store reconnects by itself).
"""

from __future__ import annotations

from csc.config import CSCConfig
from csc.store.backend import StoreError, StoreUnavailable
from csc.store.core import (
    ADMIN_TOKEN_FILE,
    DEFAULT_OPERATOR,
    SYSTEM,
    Store,
    new_operator_token,
    token_hash,
)
from csc.store.schema import MIGRATIONS
from csc.store.sqlite import DB_FILE

__all__ = [
    "ADMIN_TOKEN_FILE",
    "DB_FILE",
    "DEFAULT_OPERATOR",
    "MIGRATIONS",
    "SYSTEM",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "new_operator_token",
    "open_store",
    "token_hash",
]


def open_store(config: CSCConfig) -> Store:
    """The store the configuration names: PostgreSQL when ``database_url`` is set, else SQLite
    in ``state_dir``. Raises StoreError (StoreUnavailable: the server cannot be reached)."""
    if config.database_url is None:
        return Store(config.state_dir)
    from csc.store.postgres import PostgresBackend  # psycopg is loaded only with database_url

    return Store(config.state_dir, backend=PostgresBackend(config.database_url.reveal()))
