"""Verify a package (docs/provisioning.md "The package"), unpacking it while checking if asked.

Order of trust: the zip's entry names are checked first (only ``manifest.json``,
``manifest.sig`` and ``files/…``, each once); then the Ed25519 signature over the exact bytes of
``manifest.json`` against the portal's key; only then is the manifest parsed and believed. Each
file the manifest lists must be in the zip with the listed size and SHA-256, and the zip may hold
no file the manifest does not list.

Invariants: a path is relative, ``/``-separated, without empty, ``.`` or ``..`` segments,
backslashes, colons or control characters, outside the reserved ``.csc/`` directory, and no path
is also a directory of another; modes are permission bits only (at most 0o777). Bytes are read
from an entry up to its listed size plus one, so a lying entry cannot fill the disk. When
unpacking, files are created exclusively (never through a symlink) below the given, empty
directory. Every failure is a :class:`~bootloader.errors.BootError` of stage ``verify``; a
filesystem error while unpacking is of stage ``install``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeGuard

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bootloader.client import fingerprint_of
from bootloader.errors import BootError, Stage, printable

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FILES_PREFIX = "files/"
RESERVED_DIR = ".csc"
MAX_MANIFEST = 16 << 20
MAX_PATH = 1024
CHUNK = 256 * 1024
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    NotImplementedError,
    RuntimeError,
    ValueError,
    zlib.error,
)


@dataclass(frozen=True, slots=True)
class FileEntry:
    path: str
    sha256: str
    size: int
    mode: int


@dataclass(frozen=True, slots=True)
class App:
    name: str
    version: str
    files: tuple[FileEntry, ...]


@dataclass(frozen=True, slots=True)
class Manifest:
    """A verified manifest; ``raw`` and ``signature`` are the exact signed bytes."""

    portal_name: str
    portal_fingerprint: str
    user: str
    device_type: str
    apps: tuple[App, ...]
    policies: dict[str, Any]
    raw: bytes
    signature: bytes


def _fail(message: str) -> BootError:
    return BootError(Stage.VERIFY, message)


def verify_package(path: Path, key: bytes, *, extract_to: Path | None = None) -> Manifest:
    """Check the package at ``path`` against the portal ``key``; unpack into ``extract_to``
    (an existing, empty directory) while hashing when given."""
    try:
        with zipfile.ZipFile(path) as archive:
            return _verify(archive, key, extract_to)
    except BootError:
        raise
    except _ZIP_ERRORS as exc:
        raise _fail(f"the package is not a valid zip file ({printable(exc, 120)})") from None
    except OSError as exc:
        stage = Stage.INSTALL if extract_to is not None else Stage.VERIFY
        raise BootError(
            stage, f"cannot read or unpack the package: {exc.strerror or exc}"
        ) from None


def _verify(archive: zipfile.ZipFile, key: bytes, extract_to: Path | None) -> Manifest:
    entries = _entries(archive)
    raw = _read_small(archive, entries, MANIFEST, MAX_MANIFEST)
    signature = _read_small(archive, entries, SIGNATURE, 64)
    check_signature(key, raw, signature)
    manifest = parse_manifest(raw, signature)
    if manifest.portal_fingerprint != fingerprint_of(key):
        raise _fail("the package names another portal than the one that sent it")
    listed = {f.path: f for app in manifest.apps for f in app.files}
    for name in entries:
        if name.startswith(FILES_PREFIX) and name[len(FILES_PREFIX) :] not in listed:
            raise _fail(
                f"the package holds {printable(name, 120)}, which its manifest does not list"
            )
    for entry in listed.values():
        info = entries.get(FILES_PREFIX + entry.path)
        if info is None:
            raise _fail(f"the package lacks {printable(entry.path, 120)}, which its manifest lists")
        _check_file(archive, info, entry, extract_to)
    return manifest


def _entries(archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    entries: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        name = info.filename
        if name in entries:
            raise _fail(f"the package holds {printable(name, 120)} twice")
        if name not in (MANIFEST, SIGNATURE) and not name.startswith(FILES_PREFIX):
            raise _fail(
                f"the package holds {printable(name, 120)}, which its manifest does not list"
            )
        if info.flag_bits & 0x1:
            raise _fail(f"the package holds an encrypted entry {printable(name, 120)}")
        entries[name] = info
    return entries


def _read_small(
    archive: zipfile.ZipFile, entries: dict[str, zipfile.ZipInfo], name: str, limit: int
) -> bytes:
    info = entries.get(name)
    if info is None:
        raise _fail(f"the package has no {name}")
    if info.file_size > limit:
        raise _fail(f"the package's {name} is larger than {limit} bytes")
    with archive.open(info) as fh:
        return fh.read(limit + 1)


def check_signature(key: bytes, raw: bytes, signature: bytes) -> None:
    if len(signature) != 64:
        raise _fail("the package's signature is not a 64-byte Ed25519 signature")
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(signature, raw)
    except (InvalidSignature, ValueError):
        raise _fail(
            "the package's signature does not match the portal's key (changed on the way, or "
            "signed by someone else); nothing was installed"
        ) from None


# --- the manifest ----------------------------------------------------------------------------


def parse_manifest(raw: bytes, signature: bytes) -> Manifest:
    """Parse and check the shape of a (signed) manifest."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # also too many digits or nested too deep
        raise _fail("the package's manifest is not UTF-8 JSON") from None
    if not isinstance(data, dict) or data.get("format") != 1:
        raise _fail("the package's manifest is not format 1; get a newer bootloader")
    portal, user, device_type = data.get("portal"), data.get("user"), data.get("device_type")
    apps, policies = data.get("apps"), data.get("policies", {})
    if not isinstance(portal, dict) or not isinstance(portal.get("name"), str):
        raise _fail("the package's manifest does not name its portal")
    fingerprint = portal.get("fingerprint")
    if not isinstance(fingerprint, str) or not isinstance(user, str):
        raise _fail("the package's manifest lacks the portal fingerprint or the user")
    if not isinstance(device_type, str) or not isinstance(apps, list):
        raise _fail("the package's manifest lacks the device type or the apps")
    if not isinstance(policies, dict):
        raise _fail("the package's policies are not an object")
    parsed = tuple(_app(item) for item in apps)
    check_paths([f.path for app in parsed for f in app.files])
    return Manifest(
        portal_name=portal["name"],
        portal_fingerprint=fingerprint.lower(),
        user=user,
        device_type=device_type,
        apps=parsed,
        policies=policies,
        raw=raw,
        signature=signature,
    )


def _app(item: object) -> App:
    if not isinstance(item, dict):
        raise _fail("an app in the package's manifest is not an object")
    name, version, files = item.get("name"), item.get("version"), item.get("files")
    if not isinstance(name, str) or not name or not isinstance(version, str):
        raise _fail("an app in the package's manifest lacks its name or version")
    if not isinstance(files, list):
        raise _fail(f"the app {printable(name, 60)} in the package's manifest lists no files")
    return App(name, version, tuple(_file(name, f) for f in files))


def _file(app: str, item: object) -> FileEntry:
    if not isinstance(item, dict):
        raise _fail(f"a file of the app {printable(app, 60)} is not an object")
    path, sha, size, mode = item.get("path"), item.get("sha256"), item.get("size"), item.get("mode")
    if not isinstance(path, str):
        raise _fail(f"a file of the app {printable(app, 60)} has no path")
    shown = printable(path, 120)
    if not isinstance(sha, str) or _SHA256_RE.fullmatch(sha) is None:
        raise _fail(f"the file {shown} has no valid sha256 in the manifest")
    if not _is_int(size) or size < 0:
        raise _fail(f"the file {shown} has no valid size in the manifest")
    if not _is_int(mode) or not 0 <= mode <= 0o777:
        raise _fail(f"the file {shown} has a mode other than permission bits (0-0o777)")
    return FileEntry(path, sha, size, mode)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def check_paths(paths: list[str]) -> None:
    """Every path safe (see the module docstring), none twice, none a directory of another."""
    seen: set[str] = set()
    directories: set[str] = set()
    for path in paths:
        check_path(path)
        if path in seen:
            raise _fail(f"the manifest lists {printable(path, 120)} twice")
        seen.add(path)
        parts = path.split("/")
        directories.update("/".join(parts[:i]) for i in range(1, len(parts)))
    clash = sorted(seen & directories)
    if clash:
        raise _fail(f"the manifest lists {printable(clash[0], 120)} as a file and a directory")


def check_path(path: str) -> None:
    shown = printable(path, 120)
    if not path or len(path) > MAX_PATH or not path.isprintable():
        raise _fail(f"the manifest lists an unusable path {shown!r}")
    if path.startswith("/") or "\\" in path or ":" in path:
        raise _fail(f"the manifest lists an unsafe path {shown!r} (absolute or not /-separated)")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise _fail(f"the manifest lists an unsafe path {shown!r} (empty, . or .. segment)")
    if parts[0] == RESERVED_DIR:
        raise _fail(f"the manifest lists {shown!r} in the reserved directory {RESERVED_DIR}/")


# --- file contents ---------------------------------------------------------------------------


def _check_file(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, entry: FileEntry, extract_to: Path | None
) -> None:
    shown = printable(entry.path, 120)
    if info.file_size != entry.size:
        raise _fail(
            f"the size of {shown} is {info.file_size} bytes in the zip but {entry.size} in the "
            "manifest"
        )
    out = _create(extract_to, entry) if extract_to is not None else None
    digest, count = hashlib.sha256(), 0
    try:
        with archive.open(info) as src:
            while block := src.read(min(CHUNK, entry.size - count + 1)):
                count += len(block)
                if count > entry.size:
                    raise _fail(f"{shown} is larger than the manifest says")
                digest.update(block)
                if out is not None:
                    out.write(block)
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
    finally:
        if out is not None:
            out.close()
    if count != entry.size:
        raise _fail(f"{shown} is smaller than the manifest says")
    if digest.hexdigest() != entry.sha256:
        raise _fail(f"{shown} does not match its SHA-256 in the manifest (tampered with?)")


def _create(root: Path, entry: FileEntry) -> IO[bytes]:
    """Open ``root/path`` for writing: new file, parents created, no symlink followed."""
    target = root.joinpath(*entry.path.split("/"))
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(target, flags, 0o600)
    try:
        os.fchmod(fd, entry.mode)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "wb")
