"""``csc check``: look at a node's configuration without serving (like ``frpc verify``).

Reports, one finding per line (shared/checks.py): the configuration (every problem at once), the
TLS certificate and key, the state directory, the signing key, and in a cluster one attempt each
to reach PostgreSQL (``database_url``) and Redis (``redis_url``). Exit 0 when nothing is wrong,
1 otherwise.

Invariants: nothing is created or changed (no state directory, no key, no database file; the
PostgreSQL server gets one connection, closed at once); each server is tried once, within a few seconds;
URLs are shown with their password masked.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path

from csc.config import CSCConfig
from csc.signing import signing_key
from csc.store import StoreError
from shared.checks import Finding, note, ok, problem
from shared.tokens import SIGNING_KEY_FILE, SigningKeyError

REDIS_TIMEOUT = 3.0


def _tls(config: CSCConfig) -> Finding:
    if not config.tls_enabled:
        return note("tls", "off (tls_cert and tls_key unset): listeners speak plain HTTP")
    assert config.tls_cert is not None and config.tls_key is not None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            config.tls_cert, config.tls_key
        )
    except (OSError, ssl.SSLError, ValueError) as exc:
        return problem("tls", f"{config.tls_cert} / {config.tls_key}: {exc}")
    return ok("tls", f"certificate {config.tls_cert} and its key load")


def _state_dir(path: Path) -> Finding:
    if not path.exists():
        return note("state_dir", f"{path} does not exist yet (csc serve creates it)")
    if not path.is_dir():
        return problem("state_dir", f"{path} is not a directory")
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        return problem("state_dir", f"{path}: this user cannot read and write it")
    return ok("state_dir", str(path))


def _local_key(config: CSCConfig) -> Finding:
    if config.signing_key_file is not None:
        try:
            found = signing_key(config, None, create=False)
        except SigningKeyError as exc:
            return problem("signing key", str(exc))
        return ok("signing key", f"{found.where} loads")
    path = config.state_dir / SIGNING_KEY_FILE
    if not path.exists():
        return note("signing key", f"{path} does not exist yet (created on first use)")
    try:
        signing_key(config, None, create=False)
    except SigningKeyError as exc:
        return problem("signing key", str(exc))
    return ok("signing key", f"{path} loads")


def _database(config: CSCConfig) -> Finding:
    """One connection to PostgreSQL (closed at once: nothing is read or written)."""
    from csc.store.postgres import PostgresBackend

    assert config.database_url is not None
    backend = PostgresBackend(config.database_url.reveal())
    try:
        backend.connect().close()
    except StoreError as exc:
        return problem("database_url", str(exc))
    finally:
        backend.close()
    return ok("database_url", f"PostgreSQL {backend.where}: reachable")


async def _redis_once(config: CSCConfig) -> Finding:
    from csc.cluster.redisconn import RedisUnavailable, connect_redis, redacted

    assert config.redis_url is not None
    try:
        client = await connect_redis(config.redis_url, timeout=REDIS_TIMEOUT, client_name="check")
    except (RedisUnavailable, ValueError) as exc:
        return problem("redis_url", str(exc))
    await client.aclose()
    return ok("redis_url", f"{redacted(config.redis_url)}: reachable")


def check_csc(config: CSCConfig) -> list[Finding]:
    """Every finding for a configuration that loaded (see the module docstring)."""
    found = [_tls(config), _state_dir(config.state_dir)]
    if config.database_url is not None:
        found.append(_database(config))
        if config.signing_key_file is not None:
            found.append(_local_key(config))
    else:
        found.append(_local_key(config))
    if config.redis_url is not None:
        found.append(asyncio.run(_redis_once(config)))
    return found
