"""Packages: the signed, deterministic zip a device downloads (docs/provisioning.md, "The package").

A package is fully determined by its ``manifest.json`` (which lists every file's SHA-256), so:

* :func:`manifest_bytes` renders a :class:`~portal.catalog.PackagePlan` canonically (UTF-8 JSON,
  keys sorted, no whitespace), and the SHA-256 of those bytes is the package's *build key*;
* :func:`write_package` writes the zip deterministically: ``ZIP_STORED`` entries in sorted name
  order, timestamps fixed at 1980-01-01, Unix permissions 0644/0755 from the manifest, so identical
  inputs give byte-identical output. File contents are streamed from the blob store in chunks and
  checked against their recorded size and SHA-256 on the way;
* the package id is the SHA-256 of the zip; it is built into a temporary file and renamed to
  ``<state-dir>/packages/<id>.zip``, and the build key -> id mapping is kept in the database.

:class:`PackageBuilder` is the server's entry point: one build per build key at a time, however
many logons ask for it at once (they all await the same task), and the build itself runs in a
worker thread so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import stat
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from portal.blobs import CHUNK, BlobStore
from portal.catalog import PackagePlan
from portal.db import Database, transaction
from portal.keys import PortalKey

log = logging.getLogger(__name__)

PACKAGES_DIR = "packages"
FIXED_TIME = (1980, 1, 1, 0, 0, 0)
MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"


class PackageError(Exception):
    """A package cannot be built (a blob is missing or corrupt, the disk is full, ...)."""


@dataclass(frozen=True, slots=True)
class PackageInfo:
    """A built package on disk."""

    id: str
    size: int
    path: Path

    @property
    def etag(self) -> str:
        return f'"{self.id}"'

    @property
    def url(self) -> str:
        return f"v1/package/{self.id}"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "url": self.url,
            "size": self.size,
            "sha256": self.id,
            "etag": self.etag,
        }


def manifest_bytes(plan: PackagePlan, portal_name: str, fingerprint: str) -> bytes:
    """The canonical ``manifest.json`` of ``plan``."""
    manifest = {
        "format": 1,
        "portal": {"name": portal_name, "fingerprint": fingerprint},
        "user": plan.user,
        "device_type": plan.device_type,
        "apps": [
            {
                "name": app.name,
                "version": app.version,
                "files": [
                    {"path": f.path, "sha256": f.sha256, "size": f.size, "mode": f.mode}
                    for f in app.files
                ],
            }
            for app in plan.apps
        ],
        "policies": plan.policies,
    }
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


def _info(name: str, size: int, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 3  # Unix, so external_attr carries the permissions
    info.external_attr = (stat.S_IFREG | mode) << 16
    info.file_size = size
    return info


def _copy_blob(blobs: BlobStore, sha256: str, size: int, out: IO[bytes]) -> None:
    digest, copied = hashlib.sha256(), 0
    try:
        src = open(blobs.path(sha256), "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise PackageError(f"blob {sha256} is missing: {exc.strerror}") from None
    with src:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            copied += len(chunk)
            out.write(chunk)
    if copied != size or digest.hexdigest() != sha256:
        raise PackageError(f"blob {sha256} is corrupt (size or SHA-256 differ from the record)")


def write_package(
    out: IO[bytes], plan: PackagePlan, manifest: bytes, signature: bytes, blobs: BlobStore
) -> None:
    """Write the zip of ``plan`` to the seekable binary file ``out`` (see the module doc)."""
    entries: list[tuple[str, Any]] = [(MANIFEST, manifest), (SIGNATURE, signature)]
    entries += [(f"files/{f.path}", f) for app in plan.apps for f in app.files]
    entries.sort(key=lambda item: item[0])
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, content in entries:
            if isinstance(content, bytes):
                zf.writestr(_info(name, len(content), 0o644), content)
                continue
            info = _info(name, content.size, content.mode)
            with zf.open(info, "w", force_zip64=content.size >= zipfile.ZIP64_LIMIT) as dst:
                _copy_blob(blobs, content.sha256, content.size, dst)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build_package_file(
    directory: Path, plan: PackagePlan, manifest: bytes, key: PortalKey, blobs: BlobStore
) -> PackageInfo:
    """Build into a temporary file, hash it, and rename it to ``<id>.zip`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "xb") as out:
            write_package(out, plan, manifest, key.sign(manifest), blobs)
            out.flush()
            os.fsync(out.fileno())
        package_id = _sha256_file(tmp)
        final = directory / f"{package_id}.zip"
        size = tmp.stat().st_size
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    except OSError as exc:
        raise PackageError(f"cannot write the package in {directory}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return PackageInfo(package_id, size, final)


class PackageBuilder:
    """Builds packages for the server: cached by build key, one build per key at a time."""

    def __init__(self, db: Database, state_dir: Path, key: PortalKey, portal_name: str) -> None:
        self.db = db
        self.key = key
        self.portal_name = portal_name
        self.directory = state_dir / PACKAGES_DIR
        self.blobs = BlobStore(state_dir / "blobs")
        self.builds = 0  # zips actually written (tests count them)
        self._lock = threading.Lock()
        self._inflight: dict[str, asyncio.Future[PackageInfo]] = {}

    def manifest(self, plan: PackagePlan) -> bytes:
        return manifest_bytes(plan, self.portal_name, self.key.fingerprint)

    def path_of(self, package_id: str) -> Path:
        return self.directory / f"{package_id}.zip"

    async def ensure(self, plan: PackagePlan) -> PackageInfo:
        """The package of ``plan``, built now unless it already exists."""
        manifest = self.manifest(plan)
        build_key = hashlib.sha256(manifest).hexdigest()
        task = self._inflight.get(build_key)
        if task is None:
            task = asyncio.ensure_future(asyncio.to_thread(self.ensure_sync, plan, manifest))
            self._inflight[build_key] = task
            task.add_done_callback(lambda t: self._done(build_key, t))
        return await asyncio.shield(task)

    def _done(self, build_key: str, task: asyncio.Future[PackageInfo]) -> None:
        self._inflight.pop(build_key, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("package build failed: %s", task.exception())

    async def close(self) -> None:
        """Wait for builds in progress (cleanup)."""
        pending = list(self._inflight.values())
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    def ensure_sync(self, plan: PackagePlan, manifest: bytes) -> PackageInfo:
        """Blocking: look the build key up, else build and record it. (Callers on the event
        loop go through :meth:`ensure`, which never runs two builds of one key at once.)"""
        build_key = hashlib.sha256(manifest).hexdigest()
        known = self._lookup(build_key)
        if known is not None:
            return known
        info = build_package_file(self.directory, plan, manifest, self.key, self.blobs)
        with self._lock:
            self.builds += 1
        with self.db.connect() as conn, transaction(conn):
            conn.execute(
                "INSERT OR REPLACE INTO packages (manifest_sha256, package_id, size, created_at) "
                "VALUES (?, ?, ?, ?)",
                (build_key, info.id, info.size, time.time()),
            )
        log.info(
            "built package %s (%d bytes) for %s on %s",
            info.id,
            info.size,
            plan.user,
            plan.device_type,
        )
        return info

    def _lookup(self, build_key: str) -> PackageInfo | None:
        with self.db.connect() as conn:
            row = conn.execute(
                "SELECT package_id, size FROM packages WHERE manifest_sha256 = ?", (build_key,)
            ).fetchone()
        if row is None:
            return None
        path = self.path_of(row["package_id"])
        with contextlib.suppress(OSError):
            if path.stat().st_size == row["size"]:
                return PackageInfo(row["package_id"], int(row["size"]), path)
        return None
