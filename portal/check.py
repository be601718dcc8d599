"""``csc-portal check``: look at the portal's configuration without serving or creating state.

Reports, one finding per line (shared/checks.py): the configuration (every problem at once),
the state directory, the database (opened read-only: its schema version and an integrity
check), the signing key (it must load and be Ed25519) and the SMS settings. Exit 0 when nothing
is wrong, 1 otherwise.

Invariants: nothing is created or changed: the database is opened with ``mode=ro`` and only
when it exists, the key only read.
"""

from __future__ import annotations

import os
import sqlite3

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from portal.config import PortalConfig
from portal.db import DB_FILE
from portal.keys import KEY_FILE, PortalKey
from shared.checks import Finding, note, ok, problem
from shared.tokens import SigningKeyError, load_private_key_file


def _database(config: PortalConfig) -> Finding:
    path = config.state_dir / DB_FILE
    if not path.exists():
        return note("database", f"{path} does not exist yet (csc-portal serve creates it)")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return problem("database", f"{path}: {exc}")
    if verdict != "ok":
        return problem("database", f"{path}: integrity check failed: {verdict}")
    return ok("database", f"{path} (schema version {version})")


def _key(config: PortalConfig) -> Finding:
    path = config.state_dir / KEY_FILE
    if not path.exists():
        return note("portal key", f"{path} does not exist yet (created on first use)")
    try:
        key = load_private_key_file(path, "portal key")
    except SigningKeyError as exc:
        return problem("portal key", str(exc))
    if not isinstance(key, Ed25519PrivateKey):
        return problem("portal key", f"{path}: must be Ed25519, not {type(key).__name__}")
    return ok("portal key", f"{path}, fingerprint {PortalKey(key).fingerprint}")


def check_portal(config: PortalConfig) -> list[Finding]:
    """Every finding for a configuration that loaded (see the module docstring)."""
    state = config.state_dir
    if not state.exists():
        found = [note("state_dir", f"{state} does not exist yet (csc-portal serve creates it)")]
    elif not state.is_dir():
        return [problem("state_dir", f"{state} is not a directory")]
    elif not os.access(state, os.R_OK | os.W_OK | os.X_OK):
        found = [problem("state_dir", f"{state}: this user cannot read and write it")]
    else:
        found = [ok("state_dir", str(state)), _database(config), _key(config)]
    if config.get_url is None:
        found.append(note("get_url", "unset: csc-portal sms needs --get-url"))
    else:
        found.append(ok("get_url", config.get_url))
    return found
