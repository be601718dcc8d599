"""csc/tenants: the grant -> tenant file written by ``csc token issue``."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import pytest

from csc.tenants import TENANTS_FILE, TenantsFile, TenantsFileError
from shared.errors import AliasTaken, BadAlias


def test_empty_when_missing(tmp_path: Path) -> None:
    tenants = TenantsFile(tmp_path / "state")
    assert tenants.load() == {}
    assert tenants.mtime() is None
    assert tenants.path == tmp_path / "state" / TENANTS_FILE


def test_assign_and_load(tmp_path: Path) -> None:
    tenants = TenantsFile(tmp_path)
    tenants.assign("acme", ["Acme@Example.com", "*@acme.org"])
    assert tenants.load() == {"acme@example.com": "acme", "*@acme.org": "acme"}
    assert json.loads((tmp_path / TENANTS_FILE).read_text()) == tenants.load()
    assert tenants.mtime() is not None
    tenants.assign("acme", ["acme@example.com", "ops@example.com"])  # idempotent, additive
    tenants.assign("beta", ["beta@example.com"])
    assert tenants.load() == {
        "acme@example.com": "acme",
        "*@acme.org": "acme",
        "ops@example.com": "acme",
        "beta@example.com": "beta",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == [TENANTS_FILE, f"{TENANTS_FILE}.lock"]


def test_taken_by_another_tenant(tmp_path: Path) -> None:
    tenants = TenantsFile(tmp_path)
    tenants.assign("acme", ["acme@example.com", "*@acme.org"])
    with pytest.raises(AliasTaken, match=re.escape("'acme@example.com' belongs to tenant 'acme'")):
        tenants.assign("evil", ["new@example.com", "ACME@example.com"])
    with pytest.raises(AliasTaken, match=re.escape("covered by '*@acme.org'")):
        tenants.assign("evil", ["x@acme.org"])
    tenants.assign("other", ["other@example.com"])
    with pytest.raises(AliasTaken, match=re.escape("'other@example.com'")):
        tenants.assign("evil", ["*@example.com"])
    # nothing of a refused assignment is written
    assert "new@example.com" not in tenants.load()


def test_same_tenant_pattern_and_alias_may_overlap(tmp_path: Path) -> None:
    tenants = TenantsFile(tmp_path)
    tenants.assign("acme", ["*@acme.org"])
    tenants.assign("acme", ["boss@acme.org"])
    assert tenants.load()["boss@acme.org"] == "acme"


def test_bad_input(tmp_path: Path) -> None:
    tenants = TenantsFile(tmp_path)
    with pytest.raises(BadAlias):
        tenants.assign("acme", ["not an alias"])
    with pytest.raises(ValueError):
        tenants.assign("Not A Tenant", ["a@example.com"])
    assert tenants.load() == {}


@pytest.mark.parametrize(
    "content", ["not json", "[1, 2]", '{"a@example.com": 5}', '{"bad alias": "acme"}']
)
def test_corrupt_file(tmp_path: Path, content: str) -> None:
    (tmp_path / TENANTS_FILE).write_text(content)
    with pytest.raises(TenantsFileError, match=TENANTS_FILE):
        TenantsFile(tmp_path).load()


def test_mtime_changes_on_write(tmp_path: Path) -> None:
    tenants = TenantsFile(tmp_path)
    tenants.assign("acme", ["a@example.com"])
    first = tenants.mtime()
    os.utime(tenants.path, (0, 0))
    assert tenants.mtime() == 0
    tenants.assign("acme", ["b@example.com"])
    assert tenants.mtime() != 0 and first is not None


def test_concurrent_assigns_lose_nothing(tmp_path: Path) -> None:
    tenants = TenantsFile(tmp_path)
    threads = [
        threading.Thread(target=tenants.assign, args=(f"t{i}", [f"a{i}@example.com"]))
        for i in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(tenants.load()) == 16
