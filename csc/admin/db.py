"""``csc db check`` and ``csc db backup PATH``: the store's database, looked at offline.

``check`` reports on the database the configuration names without changing it: for SQLite
(``<state_dir>/csc.db``) that the file exists and is not empty, SQLite's ``PRAGMA
integrity_check``, the schema version against this program's, and how many tenants, aliases,
operators, tokens and revocations it holds; for PostgreSQL (``database_url``) that the server
answers and the schema version. ``backup`` copies ``csc.db`` to a new file with SQLite's online
backup (consistent while a node runs and writes), then checks the copy; with ``database_url``
it refuses and points to ``pg_dump``. How to restore: docs/operations.md, "Backup and restore".

Exit codes as for every ``csc`` command: 0 sound (or backed up), 1 a problem found (or the
backup failed), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from csc.config import CSCConfig, load_csc_config
from csc.store import MIGRATIONS, StoreError
from csc.store.sqlite import DB_FILE, backup, integrity
from shared.checks import PROBLEM, Finding, note, ok, problem
from shared.cli_support import EXIT_OK, EXIT_USAGE, config_file, fail, load_or_report

PROG = "csc"
ENV_PREFIX = "CSC_"
#: What ``check`` counts (table: what it holds).
CONTENTS = (
    ("tenants", "tenants"),
    ("aliases", "aliases"),
    ("operators", "operators"),
    ("tokens", "tokens"),
    ("revoked", "revocations"),
)


def add_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    add_store_args: Callable[[argparse.ArgumentParser], None],
    usage: Callable[[argparse.ArgumentParser], int],
) -> None:
    db = commands.add_parser("db", help="check or back up the store's database (offline)")
    actions = db.add_subparsers(dest="action", metavar="ACTION")
    check = actions.add_parser(
        "check", help="integrity and schema version of csc.db (or of the PostgreSQL database)"
    )
    add_store_args(check)
    check.set_defaults(handler=_cmd_check)
    save = actions.add_parser("backup", help="copy csc.db to PATH (SQLite online backup)")
    add_store_args(save)
    save.add_argument("path", type=Path, metavar="PATH", help="the new file (must not exist)")
    save.set_defaults(handler=_cmd_backup)
    db.set_defaults(handler=lambda args, env: usage(db))


def _config(args: argparse.Namespace, env: Mapping[str, str]) -> CSCConfig | None:
    file = config_file(args.config, env, ENV_PREFIX)
    overrides = {"state_dir": args.state_dir, "database_url": args.database_url}
    return load_or_report(PROG, lambda: load_csc_config(file=file, env=env, overrides=overrides))


def _cmd_check(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    config = _config(args, env)
    if config is None:
        return EXIT_USAGE
    if config.database_url is not None:
        findings = check_postgres(config.database_url.reveal())
    else:
        findings = check_sqlite(config.state_dir.absolute() / DB_FILE)
    return _report(findings)


def _report(findings: list[Finding]) -> int:
    width = max((len(f.subject) for f in findings), default=0)
    for f in findings:
        print(f"{f.status:<8} {f.subject:<{width}}  {f.detail}")
    problems = sum(1 for f in findings if f.status == PROBLEM)
    if problems:
        word = "problem" if problems == 1 else "problems"
        print(f"{PROG}: {problems} {word} found in the database", file=sys.stderr)
        return 1
    return EXIT_OK


def _schema(version: int) -> Finding:
    current = len(MIGRATIONS)
    if version == current:
        return ok("schema", f"version {version} (current)")
    if version < current:
        return note("schema", f"version {version}; upgraded to {current} when a node starts")
    return problem("schema", f"version {version} is newer than this csc understands ({current})")


def check_sqlite(path: Path) -> list[Finding]:
    """What ``csc db check`` reports on the SQLite database at ``path`` (read only)."""
    if not path.exists():
        return [problem("database", f"{path} does not exist (a node creates it on first start)")]
    if path.stat().st_size == 0:
        return [problem("database", f"{path} is empty (0 bytes): not a CSC database")]
    findings = [ok("database", f"{path}, {path.stat().st_size} bytes")]
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        return [*findings, problem("open", str(exc))]
    try:
        problems = integrity(conn)
        if problems:
            shown = "; ".join(problems[:5])
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            findings.append(problem("integrity", f"{shown}{more}"))
        else:
            findings.append(ok("integrity", "PRAGMA integrity_check: ok"))
        findings.append(_schema(int(conn.execute("PRAGMA user_version").fetchone()[0])))
        if not problems:
            findings.append(ok("contents", _contents(conn)))
    except sqlite3.Error as exc:
        findings.append(problem("integrity", str(exc)))
    finally:
        conn.close()
    return findings


def _contents(conn: sqlite3.Connection) -> str:
    counts = []
    for table, what in CONTENTS:
        try:
            (count,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        except sqlite3.OperationalError:  # an older schema without it
            continue
        counts.append(f"{count} {what}")
    return ", ".join(counts) or "no CSC tables yet"


def check_postgres(url: str) -> list[Finding]:
    """What ``csc db check`` reports on the PostgreSQL database at ``url``."""
    from csc.store.postgres import PostgresBackend  # psycopg is loaded only for PostgreSQL

    backend = PostgresBackend(url)
    try:

        def look(tx: Any) -> int | None:
            present = tx.execute("SELECT to_regclass('csc_meta') IS NOT NULL AS present").first()
            if not present or not present["present"]:
                return None
            row = tx.execute("SELECT schema_version FROM csc_meta WHERE id = 1").first()
            return int(row["schema_version"]) if row else 0

        version = backend.read(look)
    except StoreError as exc:
        return [problem("database_url", str(exc))]
    except Exception as exc:
        return [problem("database_url", f"PostgreSQL {backend.where}: {exc}")]
    finally:
        backend.close()
    reached = ok("database_url", f"PostgreSQL {backend.where}: reachable")
    if version is None:
        return [reached, note("schema", "no CSC schema yet (created when a node starts)")]
    return [
        reached,
        _schema(version),
        note("integrity", "PostgreSQL keeps its own; back it up with pg_dump"),
    ]


def _cmd_backup(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    config = _config(args, env)
    if config is None:
        return EXIT_USAGE
    if config.database_url is not None:
        return fail(
            PROG,
            "the store is PostgreSQL (database_url): back it up with pg_dump "
            "(e.g. pg_dump --format=custom --file=csc.dump URL), not csc db backup",
            EXIT_USAGE,
        )
    source = config.state_dir.absolute() / DB_FILE
    target: Path = args.path
    problems = [f for f in check_sqlite(source) if f.status == PROBLEM]
    if problems:
        details = "; ".join(f.detail for f in problems)
        return fail(PROG, f"cannot back up {source}: {details}")
    try:
        backup(source, target)
    except FileExistsError:
        return fail(PROG, f"{target} exists already; give a new file", EXIT_USAGE)
    except (OSError, sqlite3.Error) as exc:
        return fail(PROG, f"cannot back up {source} to {target}: {exc}")
    print(f"{PROG}: {source} backed up to {target} ({target.stat().st_size} bytes, checked)")
    return EXIT_OK
