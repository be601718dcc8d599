"""Download the package into ``DIR/.partial/<id>.zip``, resuming with ``Range`` + ``If-Range``.

Invariants:

* The partial file only ever holds a prefix of what the portal sent, never more than the
  announced size; a broken-off download keeps it, so the next run (or the next attempt) asks for
  ``Range: bytes=N-`` with ``If-Range: <etag>`` and appends.
* A 200 answer to a range request (the package changed) starts again from byte 0; a 416 drops
  the partial file and starts again once.
* The finished file is returned only when its size and SHA-256 are those the logon announced; a
  mismatch removes it (a resumed file that turns out bad is fetched once more from scratch).
* Starting a download removes the partial files of other packages: the portal has moved on.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
from pathlib import Path

from bootloader.client import Answer, Endpoint, Session, Transport, failure
from bootloader.errors import BootError, Stage, printable
from bootloader.progress import Progress, human_size

CHUNK = 64 * 1024
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+)")

_DOWNLOAD_TEXTS = {
    "session_invalid": "the portal no longer accepts the session; run again to log on anew "
    "(the download resumes where it stopped)",
}


class _Restart(Exception):
    """The partial file cannot be resumed (416): start again from byte 0."""


def download(
    transport: Transport,
    base: Endpoint,
    subject: str,
    session: Session,
    partial_dir: Path,
    progress: Progress,
) -> Path:
    """Fetch (or resume) the session's package; return the path of the complete, checked file."""
    ref = session.package
    path = partial_dir / f"{ref.id}.zip"
    _prepare(partial_dir, keep=path.name)
    for attempt in (1, 2):
        have = _existing_size(path, ref.size)
        if have < ref.size:
            _check_space(partial_dir, ref.size - have + ref.size)
            try:
                _fetch(transport, base, subject, session, path, have, progress)
            except _Restart:
                path.unlink(missing_ok=True)
                _fetch(transport, base, subject, session, path, 0, progress)
        if _sha256_of(path) == ref.sha256:
            return path
        path.unlink(missing_ok=True)
        if not (have and attempt == 1):
            break
    raise BootError(
        Stage.VERIFY,
        "the downloaded package does not match the SHA-256 the portal announced (damaged on the "
        "way?); run again",
    )


def _prepare(partial_dir: Path, keep: str) -> None:
    try:
        partial_dir.mkdir(parents=True, exist_ok=True)
        for entry in partial_dir.iterdir():
            if entry.name != keep and entry.suffix == ".zip" and entry.is_file():
                entry.unlink()
    except OSError as exc:
        raise BootError(Stage.DOWNLOAD, f"cannot use {partial_dir}: {exc.strerror}") from None


def _existing_size(path: Path, size: int) -> int:
    try:
        have = path.stat().st_size
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise BootError(Stage.DOWNLOAD, f"cannot use {path}: {exc.strerror}") from None
    if have > size:
        path.unlink()
        return 0
    return have


def _check_space(directory: Path, need: int) -> None:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    if free < need:
        raise BootError(
            Stage.DOWNLOAD,
            f"not enough free space in {directory}: the package needs {human_size(need)} "
            f"(download and unpacked), {human_size(free)} are free",
        )


def _fetch(
    transport: Transport,
    base: Endpoint,
    subject: str,
    session: Session,
    path: Path,
    have: int,
    progress: Progress,
) -> None:
    ref = session.package
    who = f"the portal of {subject}"
    headers = {"Authorization": f"Bearer {session.token}"}
    if have:
        headers["Range"] = f"bytes={have}-"
        headers["If-Range"] = ref.etag
    with transport.request(
        Stage.DOWNLOAD, base, "GET", ref.url, who=who, headers=headers
    ) as answer:
        if answer.status == 416 and have:
            raise _Restart
        if answer.status == 206 and have:
            _check_range(answer, have, ref.size)
        elif answer.status == 200:
            have = 0
            length = answer.header("Content-Length")
            if length is not None and length.strip() != str(ref.size):
                raise answer.fail(
                    f"{who} sends {length.strip()} bytes but announced {ref.size}; try again"
                )
        else:
            raise failure(answer, who=who, subject=subject, known=_DOWNLOAD_TEXTS)
        _copy(answer, path, have, ref.size, progress, who)


def _check_range(answer: Answer, start: int, size: int) -> None:
    value = answer.header("Content-Range")
    match = _CONTENT_RANGE_RE.fullmatch((value or "").strip())
    if match is None or (int(match[1]), int(match[2]), int(match[3])) != (start, size - 1, size):
        shown = printable(value or "none", 80)
        raise answer.fail(f"the portal resumed the download at the wrong place ({shown})")


def _copy(answer: Answer, path: Path, have: int, size: int, progress: Progress, who: str) -> None:
    """Append the body to ``path`` up to ``size`` bytes; a short body keeps what arrived."""
    done, reason = have, ""
    progress.start(size, have)
    try:
        with open(path, "ab" if have else "wb") as out:
            while done < size:
                try:
                    chunk = answer.read(min(CHUNK, size - done))
                except (OSError, http.client.HTTPException) as exc:
                    chunk, reason = b"", _reason(exc)
                if not chunk:
                    break
                out.write(chunk)
                done += len(chunk)
                progress.advance(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        progress.abort()
        raise BootError(Stage.DOWNLOAD, f"cannot write {path}: {exc.strerror}") from None
    if done < size:
        progress.abort()
        raise answer.fail(
            f"the connection to {who} broke off after {human_size(done)} of "
            f"{human_size(size)}{reason}; run again to resume"
        )
    progress.finish()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return " (no data within the timeout)"
    if isinstance(exc, ConnectionResetError):
        return " (connection reset)"
    return f" ({type(exc).__name__})"


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    except OSError as exc:
        raise BootError(Stage.DOWNLOAD, f"cannot read {path}: {exc.strerror}") from None
    return digest.hexdigest()
