"""Content-addressed file storage and the collection of an app's files from the admin's disk.

Blobs live at ``<state-dir>/blobs/<sha256>``, named by the SHA-256 of their content, written once
(temporary file, fsync, rename) and never modified, so any number of app versions can share one;
storing an existing blob again refreshes its modification time, which ``csc-portal prune``
(:mod:`portal.prune`) reads as "in use by an ``app add`` in progress".

:func:`collect_files` turns the paths given to ``csc-portal app add`` into package paths
``NAME/relative/path``. Invariants of its result: every path is relative, ``/``-separated, has no
empty, ``.`` or ``..`` segment, no backslash or control character, and is unique; a symlink is
followed only when its target stays inside the directory being added; only regular files are
taken. Files are read in chunks, never whole.
"""

from __future__ import annotations

import hashlib
import os
import stat
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from portal.store import InvalidValue

CHUNK = 1024 * 1024
MAX_PATH = 1024
MODE_EXEC, MODE_PLAIN = 0o755, 0o644


class BlobStore:
    """The ``blobs/`` directory of a state directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a SHA-256 digest: {sha256!r}")
        return self.root / sha256

    def put_file(self, source: Path) -> tuple[str, int]:
        """Copy ``source`` in (streaming); returns its (sha256, size)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{uuid.uuid4().hex}.tmp"
        digest, size = hashlib.sha256(), 0
        try:
            with open(source, "rb") as src, open(tmp, "xb") as dst:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            final = self.path(digest.hexdigest())
            if final.exists():
                tmp.unlink()
                os.utime(final)  # fresh again: prune spares it until the version is recorded
            else:
                os.chmod(tmp, 0o644)
                os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return digest.hexdigest(), size


@dataclass(frozen=True, slots=True)
class SourceFile:
    """A file to add: its path in the package, where it is on disk, and its mode."""

    package_path: str
    source: Path
    mode: int


def check_package_path(path: str) -> str:
    """Return ``path`` if it is a safe relative package path, else raise :class:`InvalidValue`."""
    if not path or path.startswith("/") or len(path) > MAX_PATH:
        raise InvalidValue(f"{path!r} is not a relative path of at most {MAX_PATH} characters")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise InvalidValue(f"{path!r}: empty, '.' and '..' segments are not allowed")
        if "\\" in part or any(ord(c) < 32 or ord(c) == 127 for c in part):
            raise InvalidValue(f"{path!r}: backslashes and control characters are not allowed")
    return path


def _mode_of(st: os.stat_result) -> int:
    return MODE_EXEC if st.st_mode & 0o111 else MODE_PLAIN


def _walk(root: Path, directory: Path, seen: set[tuple[int, int]]) -> Iterator[tuple[str, Path]]:
    """(path relative to ``root``, real path) of every regular file under ``directory``."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        raise InvalidValue(f"{directory}: cannot list the directory: {exc.strerror}") from None
    for entry in entries:
        full = Path(entry.path)
        real = full.resolve()
        if entry.is_symlink() and not real.is_relative_to(root):
            raise InvalidValue(f"{full}: the symlink points outside {root} (to {real})")
        try:
            st = real.stat()
        except OSError as exc:
            raise InvalidValue(f"{full}: {exc.strerror} (a broken symlink?)") from None
        rel = full.relative_to(root).as_posix()
        if stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in seen:
                raise InvalidValue(f"{full}: a directory loop (symlink)")
            yield from _walk(root, full, seen | {key})
        elif stat.S_ISREG(st.st_mode):
            yield rel, real
        else:
            raise InvalidValue(f"{full}: not a regular file or directory")


def collect_files(app: str, paths: Sequence[Path]) -> list[SourceFile]:
    """The files of ``paths`` as ``app/...`` package paths: a directory contributes its contents
    (relative to it), a file its base name. Raises :class:`InvalidValue` on any unsafe input."""
    if not paths:
        raise InvalidValue("give at least one file or directory")
    found: dict[str, SourceFile] = {}
    for given in paths:
        try:
            st = given.stat()
        except OSError as exc:
            raise InvalidValue(f"{given}: {exc.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            root = given.resolve()
            pairs = list(_walk(root, root, {(st.st_dev, st.st_ino)}))
        elif stat.S_ISREG(st.st_mode):
            pairs = [(given.name, given.resolve())]
        else:
            raise InvalidValue(f"{given}: not a regular file or directory")
        for rel, real in pairs:
            package_path = check_package_path(f"{app}/{rel}")
            if package_path in found:
                raise InvalidValue(
                    f"{package_path}: given twice (from {found[package_path].source})"
                )
            found[package_path] = SourceFile(package_path, real, _mode_of(real.stat()))
    if not found:
        raise InvalidValue("no files found in the given paths")
    return [found[p] for p in sorted(found)]
