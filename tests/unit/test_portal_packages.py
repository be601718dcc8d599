"""Packages: deterministic, signed zips exactly as docs/provisioning.md describes, and the safe
collection of an app's files from disk."""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from portal import store
from portal.blobs import BlobStore, check_package_path, collect_files
from portal.catalog import FileEntry, PackagePlan, ResolvedApp
from portal.keys import PortalKey, fingerprint, load_or_create_key
from portal.packages import (
    FIXED_TIME,
    PackageError,
    build_package_file,
    manifest_bytes,
    write_package,
)


def _blob(blobs: BlobStore, tmp: Path, content: bytes) -> tuple[str, int]:
    source = tmp / hashlib.sha256(content).hexdigest()[:12]
    source.write_bytes(content)
    return blobs.put_file(source)


def _plan(blobs: BlobStore, tmp: Path, files: dict[str, bytes], **policies: str) -> PackagePlan:
    entries = []
    for path, content in sorted(files.items()):
        sha256, size = _blob(blobs, tmp, content)
        entries.append(FileEntry(path, sha256, size, 0o755 if path.endswith("run") else 0o644))
    app = ResolvedApp("client", "5.1.0", tuple(entries))
    return PackagePlan("alice", "android-arm64", (app,), dict(sorted(policies.items())))


@pytest.fixture
def key(tmp_path: Path) -> PortalKey:
    return load_or_create_key(tmp_path / "keys")[0]


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


FILES = {"client/bin/run": b"#!/bin/sh\necho hi\n", "client/README": b"read me\n"}


def _zip(plan: PackagePlan, key: PortalKey, blobs: BlobStore, name: str = "Acme Ltd") -> bytes:
    manifest = manifest_bytes(plan, name, key.fingerprint)
    out = io.BytesIO()
    write_package(out, plan, manifest, key.sign(manifest), blobs)
    return out.getvalue()


def test_building_twice_gives_identical_bytes(
    tmp_path: Path, key: PortalKey, blobs: BlobStore
) -> None:
    plan = _plan(blobs, tmp_path, FILES, **{"sync-interval": "15m"})
    first = build_package_file(
        tmp_path / "a", plan, manifest_bytes(plan, "Acme", key.fingerprint), key, blobs
    )
    again = build_package_file(
        tmp_path / "b", plan, manifest_bytes(plan, "Acme", key.fingerprint), key, blobs
    )
    assert first.path.read_bytes() == again.path.read_bytes()
    assert first.id == again.id == hashlib.sha256(first.path.read_bytes()).hexdigest()
    assert first.path.name == f"{first.id}.zip"
    assert first.size == first.path.stat().st_size
    assert first.etag == f'"{first.id}"' and first.url == f"v1/package/{first.id}"
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "change",
    ["file content", "policy value", "portal name", "version", "mode"],
)
def test_any_change_of_input_changes_the_bytes(
    tmp_path: Path, key: PortalKey, blobs: BlobStore, change: str
) -> None:
    plan = _plan(blobs, tmp_path, FILES, colour="blue")
    base = _zip(plan, key, blobs)
    name = "Acme Ltd"
    if change == "file content":
        plan = _plan(blobs, tmp_path, {**FILES, "client/README": b"read me!\n"}, colour="blue")
    elif change == "policy value":
        plan = _plan(blobs, tmp_path, FILES, colour="red")
    elif change == "portal name":
        name = "Acme Limited"
    elif change == "version":
        app = plan.apps[0]
        plan = PackagePlan(
            plan.user, plan.device_type, (ResolvedApp(app.name, "5.1.1", app.files),), plan.policies
        )
    else:
        app = plan.apps[0]
        files = tuple(FileEntry(f.path, f.sha256, f.size, 0o644) for f in app.files)
        plan = PackagePlan(
            plan.user, plan.device_type, (ResolvedApp(app.name, app.version, files),), plan.policies
        )
    assert _zip(plan, key, blobs, name) != base


def test_zip_layout_manifest_and_signature(
    tmp_path: Path, key: PortalKey, blobs: BlobStore
) -> None:
    plan = _plan(blobs, tmp_path, FILES, **{"sync-interval": "15m"})
    data = _zip(plan, key, blobs)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        assert (
            names
            == sorted(names)
            == [
                "files/client/README",
                "files/client/bin/run",
                "manifest.json",
                "manifest.sig",
            ]
        )
        for info in infos:
            assert info.compress_type == zipfile.ZIP_STORED
            assert info.date_time == FIXED_TIME
        modes = {i.filename: (i.external_attr >> 16) & 0o7777 for i in infos}
        assert modes["files/client/bin/run"] == 0o755
        assert modes["files/client/README"] == modes["manifest.json"] == 0o644
        manifest_raw = zf.read("manifest.json")
        signature = zf.read("manifest.sig")
        assert zf.read("files/client/bin/run") == FILES["client/bin/run"]
    manifest = json.loads(manifest_raw)
    assert manifest_raw == json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    assert manifest["format"] == 1
    assert manifest["portal"] == {"name": "Acme Ltd", "fingerprint": key.fingerprint}
    assert (manifest["user"], manifest["device_type"]) == ("alice", "android-arm64")
    assert manifest["policies"] == {"sync-interval": "15m"}
    [app] = manifest["apps"]
    assert (app["name"], app["version"]) == ("client", "5.1.0")
    run = next(f for f in app["files"] if f["path"] == "client/bin/run")
    assert run == {
        "path": "client/bin/run",
        "sha256": hashlib.sha256(FILES["client/bin/run"]).hexdigest(),
        "size": len(FILES["client/bin/run"]),
        "mode": 493,
    }
    assert len(signature) == 64
    Ed25519PublicKey.from_public_bytes(key.raw_public).verify(signature, manifest_raw)


def test_a_corrupt_or_missing_blob_fails_the_build(
    tmp_path: Path, key: PortalKey, blobs: BlobStore
) -> None:
    plan = _plan(blobs, tmp_path, FILES)
    victim = plan.apps[0].files[0]
    blobs.path(victim.sha256).write_bytes(b"tampered")
    with pytest.raises(PackageError, match="corrupt"):
        _zip(plan, key, blobs)
    blobs.path(victim.sha256).unlink()
    with pytest.raises(PackageError, match="missing"):
        _zip(plan, key, blobs)


def test_key_file_and_fingerprint(tmp_path: Path) -> None:
    key, created = load_or_create_key(tmp_path / "s")
    assert created
    assert (tmp_path / "s" / "portal-key.pem").stat().st_mode & 0o777 == 0o600
    again, created_again = load_or_create_key(tmp_path / "s")
    assert not created_again and again.raw_public == key.raw_public
    assert key.fingerprint == hashlib.sha256(key.raw_public).hexdigest()[:16]
    assert fingerprint(bytes(32)) == hashlib.sha256(bytes(32)).digest()[:8].hex()


# --- collecting an app's files -------------------------------------------------------------


def test_collect_directory_contents_and_files(tmp_path: Path) -> None:
    (tmp_path / "dist" / "bin").mkdir(parents=True)
    (tmp_path / "dist" / "bin" / "run").write_text("x")
    os.chmod(tmp_path / "dist" / "bin" / "run", 0o700)
    (tmp_path / "dist" / "lib.txt").write_text("y")
    (tmp_path / "dist" / "__pycache__").mkdir()
    (tmp_path / "notes.txt").write_text("z")
    os.symlink("lib.txt", tmp_path / "dist" / "alias.txt")  # inside: followed
    files = collect_files("client", [tmp_path / "dist", tmp_path / "notes.txt"])
    assert [(f.package_path, f.mode) for f in files] == [
        ("client/alias.txt", 0o644),
        ("client/bin/run", 0o755),
        ("client/lib.txt", 0o644),
        ("client/notes.txt", 0o644),
    ]


def test_collect_refuses_a_symlink_escaping(tmp_path: Path) -> None:
    (tmp_path / "dist").mkdir()
    (tmp_path / "secret").write_text("s")
    os.symlink(tmp_path / "secret", tmp_path / "dist" / "leak")
    with pytest.raises(store.InvalidValue, match="outside"):
        collect_files("client", [tmp_path / "dist"])
    (tmp_path / "dist" / "leak").unlink()
    os.symlink("../..", tmp_path / "dist" / "up")
    with pytest.raises(store.InvalidValue, match="outside"):
        collect_files("client", [tmp_path / "dist"])


def test_collect_refuses_duplicates_loops_and_nothing(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("1")
    (tmp_path / "b" / "x").write_text("2")
    with pytest.raises(store.InvalidValue, match="given twice"):
        collect_files("client", [tmp_path / "a", tmp_path / "b"])
    os.symlink(".", tmp_path / "a" / "loop")
    with pytest.raises(store.InvalidValue, match="loop"):
        collect_files("client", [tmp_path / "a"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(store.InvalidValue, match="no files"):
        collect_files("client", [tmp_path / "empty"])
    with pytest.raises(store.InvalidValue, match="No such file"):
        collect_files("client", [tmp_path / "missing"])


@pytest.mark.parametrize(
    "path", ["", "/etc/passwd", "a/../b", "a//b", "./a", "a/.", "a\\b", "a/\x01", "x" * 1025]
)
def test_unsafe_package_paths(path: str) -> None:
    with pytest.raises(store.InvalidValue):
        check_package_path(path)


def test_blobs_are_content_addressed_and_shared(tmp_path: Path, blobs: BlobStore) -> None:
    first = _blob(blobs, tmp_path, b"same")
    (tmp_path / "other").write_bytes(b"same")
    assert blobs.put_file(tmp_path / "other") == first == (hashlib.sha256(b"same").hexdigest(), 4)
    assert sorted(p.name for p in blobs.root.iterdir()) == [first[0]]
    with pytest.raises(ValueError):
        blobs.path("../etc/passwd")
