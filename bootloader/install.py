"""The installation directory and the atomic switch to a new release (docs/provisioning.md).

Layout of ``DIR`` (``--target``)::

    current            -> releases/<name>   relative symlink, replaced by one rename
    releases/<name>/   a release: the manifest's files, plus .csc/manifest.json and .csc/manifest.sig;
                       <name> is the package id (<id>.1 when that id is the current release already)
    .staging/<random>/ a release being unpacked and verified
    .partial/<id>.zip  a download in progress (bootloader.download)
    .csc/device-id     this device's id;  .csc/lock  held while a bootloader works here

Invariants:

* Until the rename of ``current`` nothing ``current`` points to is touched: the new release is
  unpacked in ``.staging``, verified while unpacking, moved into ``releases/`` and only then does
  ``current`` switch. Any failure before the switch removes what this run created and leaves
  ``current`` and its release byte-identical.
* Only after the switch is the previous release removed (a failure there is a warning: the new
  client is installed). Releases and staging directories ``current`` does not point to are
  leftovers of interrupted runs and are removed before a new installation starts.
* One bootloader at a time per ``DIR`` (an exclusive ``flock`` where the platform has one).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bootloader.errors import BootError, Stage, printable
from bootloader.package import RESERVED_DIR, Manifest, verify_package

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

MAX_DEVICE_ID = 128


@dataclass(frozen=True, slots=True)
class Installed:
    manifest: Manifest
    release: Path
    previous: Path | None
    warnings: list[str] = field(default_factory=list)


def _install_error(message: str) -> BootError:
    return BootError(Stage.INSTALL, message)


def _os_message(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


class Target:
    """The installation directory ``DIR`` and the paths inside it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.current = root / "current"
        self.releases = root / "releases"
        self.staging = root / ".staging"
        self.partial = root / ".partial"
        self.state = root / RESERVED_DIR

    def prepare(self) -> None:
        """Create ``DIR`` and its private state directory if missing."""
        try:
            self.state.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _install_error(f"cannot create {self.root}: {_os_message(exc)}") from None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        if fcntl is None:  # pragma: no cover - not POSIX
            yield
            return
        try:
            fd = os.open(self.state / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise _install_error(f"cannot lock {self.root}: {_os_message(exc)}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _install_error(
                    f"another csc-bootloader is working in {self.root}; wait for it to finish"
                ) from None
            yield
        finally:
            os.close(fd)

    def current_release(self) -> Path | None:
        """The release ``current`` points to, or None when nothing is installed."""
        try:
            link = os.readlink(self.current)
        except (FileNotFoundError, OSError):
            return None
        release = (self.root / link).resolve()
        return release if release.parent == self.releases.resolve() else None

    def installed_manifest(self) -> dict[str, object] | None:
        """The manifest of the current release (verified when it was installed), if readable."""
        release = self.current_release()
        if release is None:
            return None
        try:
            data = json.loads((release / RESERVED_DIR / "manifest.json").read_bytes())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def installed_fingerprint(self) -> str | None:
        manifest = self.installed_manifest()
        portal = manifest.get("portal") if manifest else None
        fingerprint = portal.get("fingerprint") if isinstance(portal, dict) else None
        return fingerprint.lower() if isinstance(fingerprint, str) else None

    def device_id(self) -> str:
        """This device's id: read from ``.csc/device-id``, created (random) on first use."""
        path = self.state / "device-id"
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = path.read_text(encoding="utf-8").strip()
            if 0 < len(text) <= MAX_DEVICE_ID and text.isprintable():
                return text
        device_id = secrets.token_hex(16)
        try:
            _write_file(path, device_id.encode() + b"\n")
        except OSError as exc:
            raise _install_error(f"cannot store the device id: {_os_message(exc)}") from None
        return device_id


def _write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``path`` atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


# --- installing ------------------------------------------------------------------------------


def install(
    target: Target, package: Path, key: bytes, package_id: str, *, device_type: str | None = None
) -> Installed:
    """Unpack and verify ``package`` beside the current release, then switch ``current``."""
    _check_current(target)
    previous = target.current_release()
    _remove_leftovers(target, previous)
    staging = target.staging / secrets.token_hex(8)
    release: Path | None = None
    try:
        staging.mkdir(parents=True, mode=0o755)
        manifest = verify_package(package, key, extract_to=staging)
        if device_type is not None and manifest.device_type != device_type:
            raise BootError(
                Stage.VERIFY,
                f"the package is for {printable(manifest.device_type, 60)}, not for "
                f"{printable(device_type, 60)}",
            )
        _write_metadata(staging, manifest)
        release = _free_name(target, package_id)
        os.rename(staging, release)
        _fsync_dir(target.releases)
        _switch(target, release)
    except BaseException as exc:
        if release is not None and target.current_release() == release.resolve():
            raise  # interrupted right after the switch: the new release is the client now
        _discard(staging, release)
        if isinstance(exc, OSError):
            raise _install_error(
                f"cannot install into {target.root}: {_os_message(exc)}; the previous client "
                "is untouched"
            ) from None
        raise
    warnings = _after_switch(target, package, previous, release)
    return Installed(manifest, release, previous, warnings)


def _check_current(target: Target) -> None:
    if os.path.lexists(target.current) and not target.current.is_symlink():
        raise _install_error(
            f"{target.current} exists and is not a symlink; move it away so that the bootloader "
            "can manage it"
        )


def _remove_leftovers(target: Target, previous: Path | None) -> None:
    """Remove staging directories and releases ``current`` does not point to."""
    try:
        target.releases.mkdir(parents=True, exist_ok=True)
        if target.staging.exists():
            shutil.rmtree(target.staging)
        for entry in target.releases.iterdir():
            if previous is None or entry.resolve() != previous:
                _remove_tree(entry)
    except OSError as exc:
        raise _install_error(f"cannot clean up {target.root}: {_os_message(exc)}") from None


def _write_metadata(staging: Path, manifest: Manifest) -> None:
    meta = staging / RESERVED_DIR
    meta.mkdir(mode=0o755)
    _write_file(meta / "manifest.json", manifest.raw)
    _write_file(meta / "manifest.sig", manifest.signature)


def _free_name(target: Target, package_id: str) -> Path:
    candidate, n = target.releases / package_id, 0
    while os.path.lexists(candidate):
        n += 1
        candidate = target.releases / f"{package_id}.{n}"
    return candidate


def _switch(target: Target, release: Path) -> None:
    """Point ``current`` at ``release`` with one rename (the commit point)."""
    link = target.root / f".current.{secrets.token_hex(4)}.tmp"
    os.symlink(os.path.join("releases", release.name), link)
    try:
        os.replace(link, target.current)
    except BaseException:
        link.unlink(missing_ok=True)
        raise
    _fsync_dir(target.root)


def _discard(staging: Path, release: Path | None) -> None:
    """Undo this run's work before the switch (never touches what ``current`` points to)."""
    for path in (staging, release):
        if path is not None:
            with contextlib.suppress(OSError):
                _remove_tree(path)


def _after_switch(target: Target, package: Path, previous: Path | None, release: Path) -> list[str]:
    warnings: list[str] = []
    if previous is not None and previous != release.resolve():
        try:
            _remove_tree(previous)
        except OSError as exc:
            warnings.append(f"could not remove the previous release: {_os_message(exc)}")
    with contextlib.suppress(OSError):
        package.unlink()
        shutil.rmtree(target.staging, ignore_errors=True)
    return warnings
