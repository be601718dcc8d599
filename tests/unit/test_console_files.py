"""The web console's files (csc/admin/static/): packaged, self-contained, and safe under its CSP."""

from __future__ import annotations

import fnmatch
import importlib.resources
import re
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from csc.admin.console import ASSETS, ConsoleAssetsMissing, is_console_path, load_assets

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "csc" / "admin" / "static"


class _Page(HTMLParser):
    """Collects what matters for the CSP: references, inline code and inline styles."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.refs.append(value)
            if name == "style" or name.startswith("on"):
                self.inline.append(f"{tag} {name}={value!r}")
        if tag == "style":
            self.inline.append("<style>")
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append(f"<script>{data.strip()[:40]}")


def test_every_static_file_is_served_and_packaged() -> None:
    on_disk = {p.name for p in STATIC.iterdir() if p.is_file()}
    assert on_disk == set(ASSETS)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["csc.admin"]
    for name in on_disk:
        assert any(fnmatch.fnmatch(f"static/{name}", p) for p in patterns), name
    assert load_assets() == {name: (STATIC / name).read_bytes() for name in ASSETS}


def test_page_loads_only_its_own_files_and_has_no_inline_code() -> None:
    page = _Page()
    page.feed((STATIC / "index.html").read_text(encoding="utf-8"))
    assert sorted(page.refs) == ["console.css", "console.js", "favicon.svg"]
    assert page.inline == []


def test_no_external_url_and_no_markup_from_data() -> None:
    texts = {name: (STATIC / name).read_text(encoding="utf-8") for name in ASSETS}
    for name, text in texts.items():
        urls = set(re.findall(r"https?://[^\s\"')]+", text)) - {"http://www.w3.org/2000/svg"}
        assert not urls, (name, urls)
    assert not re.search(r"url\(|@import", texts["console.css"])
    script = texts["console.js"]
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    assert "new Function" not in script and "textContent" in script


def test_console_paths() -> None:
    assert is_console_path("/console") and is_console_path("/console/")
    assert is_console_path("/console/console.js")
    for other in ("/consolex", "/v1/admin/console/", "/", "/console.js"):
        assert not is_console_path(other), other


def test_missing_files_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "index.html").write_text("<!doctype html>")
    monkeypatch.setattr(importlib.resources, "files", lambda package: tmp_path)
    with pytest.raises(ConsoleAssetsMissing) as caught:
        load_assets()
    assert "console.js, console.css, favicon.svg" in str(caught.value)
