"""``tenants.json``: which tenant each grant (an alias or a ``*@domain`` pattern) belongs to.

``csc token issue`` records the grants of every token it signs here, and the running CSC's
registry reads the file (re-reading it when :meth:`TenantsFile.mtime` changes), so it knows an
alias even before its agent connects. The file is one JSON object ``{grant: tenant}``.

Invariants: a grant belongs to exactly one tenant, and no tenant's pattern covers an alias of
another tenant (nor the reverse), so every alias resolves to at most one tenant; the file is
replaced atomically (a reader never sees a partial file), and writers are serialised by an
exclusive lock on ``tenants.json.lock``, so concurrent ``assign`` calls lose nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from shared.aliases import grant_covers, normalise_grant
from shared.errors import AliasTaken, BadAlias
from shared.files import ensure_private_dir, write_atomic
from shared.tokens import check_tenant_id

TENANTS_FILE = "tenants.json"
_THREAD_LOCK = threading.Lock()  # flock is per open file; this covers threads of one process


class TenantsFileError(ValueError):
    """``tenants.json`` exists but is not a valid ``{grant: tenant}`` object."""


def _conflicts(current: dict[str, str], tenant: str, grants: Iterable[str]) -> list[str]:
    problems: list[str] = []
    for grant in grants:
        for held, owner in current.items():
            if owner == tenant:
                continue
            if held == grant:
                problems.append(f"{grant!r} belongs to tenant {owner!r}")
            elif grant_covers(held, grant):
                problems.append(f"{grant!r} is covered by {held!r} of tenant {owner!r}")
            elif grant_covers(grant, held):
                problems.append(f"{grant!r} would cover {held!r} of tenant {owner!r}")
    return problems


class TenantsFile:
    """The ``tenants.json`` file of one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / TENANTS_FILE

    def mtime(self) -> float | None:
        """Modification time of the file, or None when it does not exist (yet)."""
        try:
            return self.path.stat().st_mtime
        except FileNotFoundError:
            return None

    def load(self) -> dict[str, str]:
        """The recorded ``{grant: tenant}`` map; empty when the file does not exist."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise TenantsFileError(f"{self.path}: not valid JSON: {exc}") from None
        return self._validated(data)

    def _validated(self, data: object) -> dict[str, str]:
        if not isinstance(data, dict):
            raise TenantsFileError(f"{self.path}: expected a JSON object of grant -> tenant")
        result: dict[str, str] = {}
        for grant, tenant in data.items():
            try:
                result[normalise_grant(grant)] = check_tenant_id(tenant)
            except (BadAlias, ValueError) as exc:
                raise TenantsFileError(f"{self.path}: entry {grant!r}: {exc}") from None
        return result

    def assign(self, tenant: str, grants: Iterable[str]) -> None:
        """Record ``grants`` for ``tenant``; AliasTaken if any belongs to another tenant.

        Raises ValueError for a bad tenant id and BadAlias for a bad grant. All or nothing: a
        refused assignment writes nothing.
        """
        check_tenant_id(tenant)
        wanted = list(dict.fromkeys(normalise_grant(g) for g in grants))
        with self._locked():
            current = self.load()
            problems = _conflicts(current, tenant, wanted)
            if problems:
                raise AliasTaken("; ".join(problems))
            if all(current.get(g) == tenant for g in wanted):
                return
            current.update(dict.fromkeys(wanted, tenant))
            data = json.dumps(current, indent=2, sort_keys=True) + "\n"
            write_atomic(self.path, data.encode(), mode=0o644)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        ensure_private_dir(self.state_dir)
        lock_path = self.state_dir / f"{TENANTS_FILE}.lock"
        with _THREAD_LOCK:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)
