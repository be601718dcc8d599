"""The get site: the bootloader zipapp (deterministic, robust to stray files, runnable) and the
escaped HTML pages."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from portal.getsite import (
    PYZ_NAME,
    BootloaderUnavailable,
    build_bootloader_pyz,
    render_device_page,
    render_index,
    write_site,
)
from portal.store import DeviceTypeInfo
from tests.support.portal import fake_bootloader
from tests.support.procs import scaled


def _names(pyz: bytes) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(pyz)) as zf:
        return zf.namelist()


def test_the_zipapp_holds_the_bootloader_and_four_shared_files(tmp_path: Path) -> None:
    pkg = fake_bootloader(tmp_path)
    (pkg / "sub").mkdir()
    (pkg / "sub" / "data.json").write_text("{}")
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "cli.cpython-311.pyc").write_bytes(b"junk")
    (pkg / ".hidden").write_text("x")
    (pkg / "cli.py~").write_text("backup")
    os.symlink("/etc/hostname", pkg / "link.py")
    pyz = build_bootloader_pyz(pkg)
    assert pyz.startswith(b"#!/usr/bin/env python3\n")
    assert _names(pyz) == [
        "__main__.py",
        "bootloader/__init__.py",
        "bootloader/cli.py",
        "bootloader/sub/data.json",
        "shared/__init__.py",
        "shared/aliases.py",
        "shared/errors.py",
        "shared/resolve_sig.py",
    ]
    assert build_bootloader_pyz(pkg) == pyz  # deterministic


def test_the_zipapp_runs_main_with_only_its_own_files(tmp_path: Path) -> None:
    pyz = tmp_path / PYZ_NAME
    pyz.write_bytes(build_bootloader_pyz(fake_bootloader(tmp_path / "src", "hello from pyz")))
    result = subprocess.run(
        [sys.executable, "-I", str(pyz)],  # -I: no repo, no site-packages paths from cwd/env
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=scaled(30),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hello from pyz acme@example.com"


def test_the_real_bootloader_builds_and_runs(tmp_path: Path) -> None:
    pyz = tmp_path / PYZ_NAME
    pyz.write_bytes(build_bootloader_pyz())
    assert "bootloader/cli.py" in _names(pyz.read_bytes())
    result = subprocess.run(
        [sys.executable, str(pyz), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=scaled(30),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "csc-bootloader" in result.stdout


def test_without_cli_py_the_bootloader_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "bootloader").mkdir()
    (tmp_path / "bootloader" / "__init__.py").write_text("")
    with pytest.raises(BootloaderUnavailable, match=r"cli\.py not found"):
        build_bootloader_pyz(tmp_path / "bootloader")


def test_pages_escape_everything() -> None:
    evil = DeviceTypeInfo("win-x64", '<script>alert("x")</script>')
    index = render_index("Acme & <Sons>", "3f2a9c4177d012be", [evil])
    assert "<script>" not in index and "&lt;script&gt;" in index
    assert "Acme &amp; &lt;Sons&gt;" in index
    assert '<a href="win-x64/">win-x64</a>' in index
    page = render_device_page('"Acme"', "3f2a9c4177d012be", evil)
    assert "<script>" not in page and "&quot;Acme&quot;" in page
    assert f'href="../{PYZ_NAME}"' in page and "--device-type win-x64" in page
    assert "3f2a9c4177d012be" in page
    assert "No device types" in render_index("Acme", "f", [])


def test_static_site(tmp_path: Path) -> None:
    types = [DeviceTypeInfo("android-arm64", ""), DeviceTypeInfo("win-x64", "Windows")]
    written = write_site(tmp_path / "site", "Acme", "ff", types, b"PYZ")
    rel = sorted(p.relative_to(tmp_path / "site").as_posix() for p in written)
    assert rel == ["android-arm64/index.html", PYZ_NAME, "index.html", "win-x64/index.html"]
    assert (tmp_path / "site" / PYZ_NAME).stat().st_mode & 0o777 == 0o755
    assert "Windows" in (tmp_path / "site" / "win-x64" / "index.html").read_text()
