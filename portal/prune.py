"""``csc-portal prune``: delete the packages and blobs that nothing references any more.

What is *in use* and therefore never deleted:

* a **blob** listed by any app version's files (``app_files``), or written less than ``min_age``
  seconds ago (an ``app add`` that has stored its blobs but not yet recorded the version; a blob
  that is stored again gets a fresh modification time, see :meth:`BlobStore.put_file`);
* a **package** that the current catalog gives some user on some device type (its build key,
  the SHA-256 of the manifest that :func:`portal.packages.manifest_bytes` renders for today's
  plan), or that a device was handed within the last ``session_ttl`` seconds (its session may
  still be downloading it), or whose file is younger than ``min_age`` (a build in progress in a
  running portal).

Everything else in ``packages/`` and ``blobs/`` goes, stale temporary files included: the row
first, then the file, so a running portal never finds a row without its file (and if it asks
for a package that was pruned, it simply builds it again). The manifest includes the portal's
name and key fingerprint, so prune must run with the configuration ``serve`` uses.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from portal import catalog
from portal.blobs import BlobStore
from portal.db import Database, transaction
from portal.keys import PortalKey
from portal.packages import PACKAGES_DIR, manifest_bytes

#: Default ``min_age``: files younger than this are never pruned (work in progress).
MIN_AGE = 3600.0


@dataclass(slots=True)
class PruneReport:
    """What was (or, for a dry run, would be) deleted."""

    packages: list[str] = field(default_factory=list)
    blobs: list[str] = field(default_factory=list)
    temporary: list[str] = field(default_factory=list)
    bytes: int = 0


def current_build_keys(db: Database, key: PortalKey, portal_name: str) -> set[str]:
    """The build keys of the packages the current catalog gives every user on every type."""
    keys: set[str] = set()
    with db.connect() as conn:
        users = [int(r[0]) for r in conn.execute("SELECT id FROM users")]
        types = [int(r[0]) for r in conn.execute("SELECT id FROM device_types")]
        for uid in users:
            for dtid in types:
                plan = catalog.plan_package(conn, uid, dtid)
                manifest = manifest_bytes(plan, portal_name, key.fingerprint)
                keys.add(hashlib.sha256(manifest).hexdigest())
    return keys


def _files(directory: Path) -> Iterator[tuple[Path, os.stat_result]]:
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_file(follow_symlinks=False):
            yield Path(entry.path), entry.stat(follow_symlinks=False)


def _delete(path: Path, size: int, report: PruneReport, dry_run: bool) -> bool:
    if not dry_run:
        try:
            path.unlink()
        except FileNotFoundError:
            return False
    report.bytes += size
    return True


def prune(
    db: Database,
    state_dir: Path,
    key: PortalKey,
    portal_name: str,
    *,
    session_ttl: float,
    min_age: float = MIN_AGE,
    dry_run: bool = False,
    now: float | None = None,
) -> PruneReport:
    """Delete what is not in use (see the module doc); returns what went."""
    now = time.time() if now is None else now
    report = PruneReport()
    wanted = current_build_keys(db, key, portal_name)
    with db.connect() as conn, transaction(conn):
        recent = {
            str(r[0])
            for r in conn.execute(
                "SELECT DISTINCT last_package FROM devices WHERE last_logon >= ?",
                (now - session_ttl,),
            )
        }
        rows = conn.execute("SELECT manifest_sha256, package_id FROM packages").fetchall()
        kept = {str(r[1]) for r in rows if r[0] in wanted or r[1] in recent}
        stale = [str(r[0]) for r in rows if str(r[1]) not in kept]
        if not dry_run:
            conn.executemany(
                "DELETE FROM packages WHERE manifest_sha256 = ?", [(k,) for k in stale]
            )
        used_blobs = {str(r[0]) for r in conn.execute("SELECT DISTINCT sha256 FROM app_files")}
    old_enough = now - min_age
    for path, st in _files(state_dir / PACKAGES_DIR):
        if st.st_mtime > old_enough or path.stem in kept or path.stem in recent:
            continue
        if _delete(path, st.st_size, report, dry_run):
            temporary = path.suffix != ".zip"
            (report.temporary if temporary else report.packages).append(path.name)
    blobs = BlobStore(state_dir / "blobs")
    for path, st in _files(blobs.root):
        if st.st_mtime > old_enough or path.name in used_blobs:
            continue
        if _delete(path, st.st_size, report, dry_run):
            temporary = path.name.startswith(".")
            (report.temporary if temporary else report.blobs).append(path.name)
    report.packages.sort()
    report.blobs.sort()
    report.temporary.sort()
    return report
