"""Atomic installation: fresh, replace, reinstall, and failures that must leave the old client
byte-identical (tree hash before and after)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bootloader import install as install_module
from bootloader.errors import BootError, Stage
from bootloader.install import Target, install
from tests.support.packages import (
    AppFiles,
    build_package,
    iter_files,
    package_id,
    public_raw,
    tree_hash,
)

KEY = Ed25519PrivateKey.generate()
V1 = build_package(KEY, [AppFiles("client", "1.0", {"bin/run": b"one\n"}, {"bin/run": 0o755})])
V2 = build_package(
    KEY,
    [AppFiles("client", "2.0", {"bin/run": b"two\n", "lib/x.so": b"\x7fELF" * 64})],
    policies={"sync-interval": "5m", "wipe": True},
)


def _install(target: Target, tmp_path: Path, data: bytes) -> install_module.Installed:
    target.prepare()
    package = tmp_path / f"{package_id(data)}.zip"
    package.write_bytes(data)
    return install(target, package, public_raw(KEY), package_id(data), device_type="linux-x64")


def _client_hash(target: Target) -> str:
    """The client as a device sees it: the link and every release."""
    return f"{os.readlink(target.current)}|{tree_hash(target.releases)}"


def test_fresh_install(tmp_path: Path) -> None:
    target = Target(tmp_path / "dir")
    done = _install(target, tmp_path, V1)
    assert os.readlink(target.current) == f"releases/{package_id(V1)}"
    assert (target.current / "bin/run").read_bytes() == b"one\n"
    assert sorted(iter_files(target.current)) == [
        ".csc/manifest.json",
        ".csc/manifest.sig",
        "bin/run",
    ]
    assert done.previous is None and done.warnings == []
    assert target.installed_fingerprint() is not None
    assert not (tmp_path / f"{package_id(V1)}.zip").exists()  # the download is consumed


def test_replace_removes_the_old_release_after_the_switch(tmp_path: Path) -> None:
    target = Target(tmp_path / "dir")
    _install(target, tmp_path, V1)
    done = _install(target, tmp_path, V2)
    assert (target.current / "bin/run").read_bytes() == b"two\n"
    assert done.previous is not None and done.previous.name == package_id(V1)
    assert [p.name for p in target.releases.iterdir()] == [package_id(V2)]
    assert done.manifest.policies == {"sync-interval": "5m", "wipe": True}


def test_reinstalling_the_current_package_uses_a_fresh_directory(tmp_path: Path) -> None:
    target = Target(tmp_path / "dir")
    _install(target, tmp_path, V1)
    _install(target, tmp_path, V1)
    assert os.readlink(target.current) == f"releases/{package_id(V1)}.1"
    _install(target, tmp_path, V1)
    assert os.readlink(target.current) == f"releases/{package_id(V1)}"
    assert len(list(target.releases.iterdir())) == 1


def test_tampered_package_leaves_the_old_client_byte_identical(tmp_path: Path) -> None:
    target = Target(tmp_path / "dir")
    _install(target, tmp_path, V1)
    before = _client_hash(target)

    def edit(entries: dict[str, bytes]) -> None:
        entries["files/lib/x.so"] = b"\x00ELF" * 64  # the second file: the first is unpacked

    bad = build_package(
        KEY,
        [AppFiles("client", "2.0", {"bin/run": b"two\n", "lib/x.so": b"\x7fELF" * 64})],
        edit_entries=edit,
    )
    with pytest.raises(BootError) as info:
        _install(target, tmp_path, bad)
    assert info.value.stage is Stage.VERIFY
    assert _client_hash(target) == before
    assert not target.staging.exists() or not any(target.staging.iterdir())


def test_failure_at_the_switch_leaves_the_old_client_byte_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = Target(tmp_path / "dir")
    _install(target, tmp_path, V1)
    before = _client_hash(target)

    def broken_switch(target: Target, release: Path) -> None:
        assert release.is_dir()  # everything is unpacked and verified by now
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(install_module, "_switch", broken_switch)
    with pytest.raises(BootError) as info:
        _install(target, tmp_path, V2)
    assert info.value.stage is Stage.INSTALL
    assert "No space left on device" in info.value.message
    assert "untouched" in info.value.message
    assert _client_hash(target) == before
    assert [p.name for p in target.releases.iterdir()] == [package_id(V1)]


def test_interrupt_while_unpacking_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = Target(tmp_path / "dir")
    _install(target, tmp_path, V1)
    before = _client_hash(target)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(install_module, "_write_metadata", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _install(target, tmp_path, V2)
    assert _client_hash(target) == before
    assert not any(target.staging.iterdir())


def test_leftovers_of_an_interrupted_run_are_removed(tmp_path: Path) -> None:
    target = Target(tmp_path / "dir")
    _install(target, tmp_path, V1)
    (target.releases / ("0" * 64)).mkdir()
    (target.staging / "abandoned" / "x").mkdir(parents=True)
    _install(target, tmp_path, V2)
    assert [p.name for p in target.releases.iterdir()] == [package_id(V2)]
    assert not target.staging.exists() or not any(target.staging.iterdir())


def test_current_that_is_not_a_symlink_is_left_alone(tmp_path: Path) -> None:
    target = Target(tmp_path / "dir")
    (target.current / "old-client").mkdir(parents=True)
    target.prepare()
    package = tmp_path / "p.zip"
    package.write_bytes(V1)
    before = tree_hash(target.root)
    with pytest.raises(BootError, match="is not a symlink"):
        install(target, package, public_raw(KEY), package_id(V1))
    assert tree_hash(target.root) == before


def test_wrong_device_type_is_refused(tmp_path: Path) -> None:
    target = Target(tmp_path / "dir")
    target.prepare()
    package = tmp_path / "p.zip"
    package.write_bytes(V1)
    with pytest.raises(BootError, match="not for win-x64"):
        install(target, package, public_raw(KEY), package_id(V1), device_type="win-x64")
    assert not os.path.lexists(target.current)


def test_device_id_is_created_once_and_kept(tmp_path: Path) -> None:
    target = Target(tmp_path / "dir")
    target.prepare()
    first = target.device_id()
    assert len(first) == 32 and Target(tmp_path / "dir").device_id() == first
    (target.state / "device-id").write_text("\x00bad\n")
    assert target.device_id() != first


def test_one_bootloader_at_a_time(tmp_path: Path) -> None:
    target = Target(tmp_path / "dir")
    target.prepare()
    with target.lock(), pytest.raises(BootError, match="another csc-bootloader"), target.lock():
        pass
    with target.lock():  # released
        pass
