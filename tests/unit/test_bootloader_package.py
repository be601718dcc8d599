"""Package verification: a good package passes; every kind of tampering is refused (stage verify)."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bootloader.errors import BootError, Stage
from bootloader.package import check_path, verify_package
from tests.support.packages import AppFiles, build_package, public_raw, zip_entries

KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "package.zip"
    path.write_bytes(data)
    return path


def _refused(tmp_path: Path, data: bytes, fragment: str, key: Ed25519PrivateKey = KEY) -> BootError:
    with pytest.raises(BootError) as info:
        verify_package(_write(tmp_path, data), public_raw(key))
    assert info.value.stage is Stage.VERIFY
    assert fragment in info.value.message
    return info.value


def test_good_package_verifies_and_unpacks(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    manifest = verify_package(_write(tmp_path, build_package(KEY)), public_raw(KEY), extract_to=out)
    assert [a.name for a in manifest.apps] == ["client", "tools"]
    assert manifest.policies == {"sync-interval": "15m"}
    assert (out / "client/bin/run").read_bytes() == b"#!/bin/sh\necho client\n"
    assert stat.S_IMODE((out / "client/bin/run").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "tools/readme.txt").stat().st_mode) == 0o644
    assert json.loads(manifest.raw)["user"] == "alice"


def test_empty_file_and_deep_paths(tmp_path: Path) -> None:
    app = AppFiles("x", "1", {"a/b/c/d.txt": b"", "e": b"e"})
    out = tmp_path / "out"
    out.mkdir()
    package = _write(tmp_path, build_package(KEY, [app]))
    manifest = verify_package(package, public_raw(KEY), extract_to=out)
    (only,) = manifest.apps
    assert [(f.path, f.size) for f in only.files] == [("a/b/c/d.txt", 0), ("e", 1)]
    assert (out / "a/b/c/d.txt").read_bytes() == b""  # the parents were created
    assert (out / "e").read_bytes() == b"e"
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["a/b/c/d.txt", "e"]


def test_bad_signature(tmp_path: Path) -> None:
    def flip(entries: dict[str, bytes]) -> None:
        sig = bytearray(entries["manifest.sig"])
        sig[0] ^= 1
        entries["manifest.sig"] = bytes(sig)

    _refused(tmp_path, build_package(KEY, edit_entries=flip), "signature does not match")


def test_signed_by_another_key(tmp_path: Path) -> None:
    _refused(tmp_path, build_package(KEY, sign_with=OTHER), "signature does not match")


def test_checked_against_the_wrong_key(tmp_path: Path) -> None:
    _refused(tmp_path, build_package(KEY), "signature does not match", key=OTHER)


def test_manifest_changed_after_signing(tmp_path: Path) -> None:
    def edit(entries: dict[str, bytes]) -> None:
        entries["manifest.json"] = entries["manifest.json"].replace(b"alice", b"mallo")

    _refused(tmp_path, build_package(KEY, edit_entries=edit), "signature does not match")


def test_tampered_file(tmp_path: Path) -> None:
    def edit(entries: dict[str, bytes]) -> None:
        entries["files/client/etc/app.json"] = b"{]\n"  # same size, other bytes

    _refused(tmp_path, build_package(KEY, edit_entries=edit), "does not match its SHA-256")


def test_unlisted_entry(tmp_path: Path) -> None:
    def edit(entries: dict[str, bytes]) -> None:
        entries["files/client/bin/extra"] = b"surprise"

    _refused(tmp_path, build_package(KEY, edit_entries=edit), "does not list")


def test_entry_outside_files(tmp_path: Path) -> None:
    def edit(entries: dict[str, bytes]) -> None:
        entries["README"] = b"hi"

    _refused(tmp_path, build_package(KEY, edit_entries=edit), "does not list")


def test_missing_entry(tmp_path: Path) -> None:
    def edit(entries: dict[str, bytes]) -> None:
        del entries["files/tools/readme.txt"]

    _refused(tmp_path, build_package(KEY, edit_entries=edit), "lacks tools/readme.txt")


def test_dotdot_path_is_refused_even_when_signed(tmp_path: Path) -> None:
    app = AppFiles("evil", "1", {"../outside": b"x"})
    _refused(tmp_path, build_package(KEY, [app]), "unsafe path")


def test_size_mismatch(tmp_path: Path) -> None:
    def edit(manifest: dict[str, Any]) -> None:
        manifest["apps"][0]["files"][0]["size"] += 1

    _refused(tmp_path, build_package(KEY, edit_manifest=edit), "bytes in the zip but")


def test_manifest_names_another_portal(tmp_path: Path) -> None:
    def edit(manifest: dict[str, Any]) -> None:
        manifest["portal"]["fingerprint"] = "0" * 16

    _refused(tmp_path, build_package(KEY, edit_manifest=edit), "names another portal")


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda m: m.update(format=2), "not format 1"),
        (lambda m: m["apps"][0]["files"][0].update(mode=0o4755), "permission bits"),
        (lambda m: m["apps"][0]["files"][0].update(sha256="xyz"), "no valid sha256"),
        (lambda m: m["apps"][0]["files"][0].update(size=True), "no valid size"),
        (lambda m: m["apps"][0].pop("version"), "lacks its name or version"),
        (lambda m: m.update(policies=[]), "policies are not an object"),
        (lambda m: m["apps"][1]["files"].append(dict(m["apps"][0]["files"][0])), "twice"),
    ],
)
def test_malformed_manifests(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], fragment: str
) -> None:
    _refused(tmp_path, build_package(KEY, edit_manifest=edit), fragment)


def test_not_a_zip_and_duplicate_entries(tmp_path: Path) -> None:
    _refused(tmp_path, b"PK\x03\x04 definitely not a zip", "not a valid zip")
    _refused(tmp_path, zip_entries({"manifest.sig": b"x" * 64}), "has no manifest.json")


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "a/../b",
        "..",
        "a//b",
        "./a",
        "a\\b",
        "C:/x",
        "a/\x00",
        ".csc/manifest.json",
        "",
    ],
)
def test_unsafe_paths(path: str) -> None:
    with pytest.raises(BootError) as info:
        check_path(path)
    assert info.value.stage is Stage.VERIFY


def test_a_file_that_is_also_a_directory(tmp_path: Path) -> None:
    app = AppFiles("x", "1", {"bin": b"1", "bin/run": b"2"})
    _refused(tmp_path, build_package(KEY, [app]), "as a file and a directory")


def test_tampered_file_leaves_partial_output_only_in_the_given_directory(tmp_path: Path) -> None:
    def edit(entries: dict[str, bytes]) -> None:
        entries["files/tools/readme.txt"] = b"TOOLS\n"

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BootError):
        verify_package(
            _write(tmp_path, build_package(KEY, edit_entries=edit)), public_raw(KEY), extract_to=out
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "package.zip"]
