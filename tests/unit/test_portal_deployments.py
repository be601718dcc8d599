"""Deployment resolution (which app versions and settings a user's device gets), version order,
and the store's errors for unknown, duplicate and in-use names."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portal import catalog, store
from portal.catalog import merge_policies, newest, pick_version, plan_package, version_key
from portal.db import Database
from tests.support.portal import add_app

ANDROID, WINDOWS = "android-arm64", "win-x64"


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(tmp_path / "state")
    database.open()
    with database.connect() as conn:
        store.add_device_type(conn, ANDROID)
        store.add_device_type(conn, WINDOWS)
        for group in ("field", "office"):
            store.add_group(conn, group)
        store.add_user(conn, "alice", "x", ["field", "office"])
        store.add_user(conn, "bob", "x", ["field"])
    return database


@pytest.fixture
def conn(db: Database) -> Iterator[sqlite3.Connection]:
    with db.connect() as connection:
        yield connection


def _versions(db: Database, app: str, versions: list[str], dtype: str = ANDROID) -> None:
    for v in versions:
        add_app(db, db.path.parent, app, v, dtype, {"f": v.encode()})


def _plan(conn: sqlite3.Connection, user: str, dtype: str = ANDROID) -> catalog.PackagePlan:
    return plan_package(conn, store.user_id(conn, user), store.device_type_id(conn, dtype))


def _apps(plan: catalog.PackagePlan) -> dict[str, str]:
    return {a.name: a.version for a in plan.apps}


# --- version order -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("older", "newer"),
    [
        ("1.9", "1.10"),
        ("5.1.0-rc1", "5.1.0"),
        ("5.1.0-rc.2", "5.1.0-rc.10"),
        ("5.1", "5.1.1"),
        ("1.0.0-alpha", "1.0.0-beta"),
        ("2.0.0", "10.0.0"),
        ("1.0.a", "1.0.1"),
    ],
)
def test_version_order(older: str, newer: str) -> None:
    assert version_key(older) < version_key(newer)
    assert newest([newer, older]) == newer
    assert newest([older, newer]) == newer


def test_build_metadata_is_ignored_and_ties_go_to_the_last_added() -> None:
    assert version_key("1.0+build5") == version_key("1.0")
    assert newest(["1.0+a", "1.0+b"]) == "1.0+b"
    assert newest([]) is None


@given(st.lists(st.lists(st.integers(0, 10_000), min_size=1, max_size=4), min_size=1))
def test_numeric_versions_order_like_integer_tuples(parts: list[list[int]]) -> None:
    versions = [".".join(map(str, p)) for p in parts]
    best = newest(versions)
    assert best is not None
    assert [int(x) for x in best.split(".")] == max(parts)


def test_pick_version_rules() -> None:
    available = ["1.0", "2.0", "3.0"]
    assert pick_version((None,), ["1.0"], available) == "3.0"  # the user's unpinned wins
    assert pick_version(("1.0",), [None], available) == "1.0"  # the user's pin wins
    assert pick_version(("9.9",), [None], available) is None  # pinned but absent here
    assert pick_version(None, [None, None], available) == "3.0"
    assert pick_version(None, ["1.0", None, "2.0"], available) == "2.0"  # newest of the pins
    assert pick_version(None, ["9.9"], available) is None
    assert pick_version(None, [], available) is None
    assert pick_version((None,), [], []) is None


def test_merge_policies_user_layers_last() -> None:
    merged = merge_policies([{"a": "g1", "b": "g1"}, {"b": "g2"}], [{"a": "u"}])
    assert merged == {"a": "u", "b": "g2"}
    assert list(merge_policies([{"z": "1", "a": "2"}], [])) == ["a", "z"]


# --- plan_package over a real database ----------------------------------------------------


def test_group_deployment_gives_the_newest_version_for_the_device_type(
    db: Database, conn: sqlite3.Connection
) -> None:
    _versions(db, "client", ["5.9.0", "5.10.0", "5.2.0"])
    _versions(db, "client", ["6.0.0"], WINDOWS)
    catalog.deploy(conn, "app", "client", "group", "field")
    assert _apps(_plan(conn, "alice")) == {"client": "5.10.0"}
    assert _apps(_plan(conn, "bob", WINDOWS)) == {"client": "6.0.0"}
    plan = _plan(conn, "bob")
    assert (plan.user, plan.device_type) == ("bob", ANDROID)
    assert [f.path for f in plan.apps[0].files] == ["client/f"]


def test_user_deployment_overrides_group_pins(db: Database, conn: sqlite3.Connection) -> None:
    _versions(db, "client", ["1.0", "2.0", "3.0"])
    catalog.deploy(conn, "app", "client", "group", "field", version="1.0")
    catalog.deploy(conn, "app", "client", "group", "office", version="2.0")
    assert _apps(_plan(conn, "bob")) == {"client": "1.0"}
    assert _apps(_plan(conn, "alice")) == {"client": "2.0"}  # newest of the group pins
    catalog.deploy(conn, "app", "client", "user", "alice")
    assert _apps(_plan(conn, "alice")) == {"client": "3.0"}
    assert catalog.deploy(conn, "app", "client", "user", "alice", version="1.0") == "updated"
    assert _apps(_plan(conn, "alice")) == {"client": "1.0"}


def test_an_app_without_a_version_for_the_device_type_is_left_out(
    db: Database, conn: sqlite3.Connection
) -> None:
    _versions(db, "client", ["1.0"])
    _versions(db, "tool", ["1.0"], WINDOWS)
    catalog.deploy(conn, "app", "client", "user", "bob")
    catalog.deploy(conn, "app", "tool", "user", "bob")
    assert _apps(_plan(conn, "bob")) == {"client": "1.0"}
    assert _apps(_plan(conn, "bob", WINDOWS)) == {"tool": "1.0"}


def test_apps_sorted_and_undeployed_ones_gone(db: Database, conn: sqlite3.Connection) -> None:
    for app in ("zeta", "alpha", "mid"):
        _versions(db, app, ["1"])
        catalog.deploy(conn, "app", app, "group", "field")
    assert [a.name for a in _plan(conn, "bob").apps] == ["alpha", "mid", "zeta"]
    catalog.undeploy(conn, "app", "mid", "group", "field")
    assert [a.name for a in _plan(conn, "bob").apps] == ["alpha", "zeta"]


def test_policy_merge_groups_by_name_then_user(db: Database, conn: sqlite3.Connection) -> None:
    catalog.set_policy(conn, "p-field", {"sync": "15m", "colour": "blue", "only-field": "1"})
    catalog.set_policy(conn, "p-office", {"sync": "5m", "colour": "green"})
    catalog.set_policy(conn, "p-alice", {"colour": "red"})
    catalog.deploy(conn, "policy", "p-office", "group", "office")
    catalog.deploy(conn, "policy", "p-field", "group", "field")
    catalog.deploy(conn, "policy", "p-alice", "user", "alice")
    assert _plan(conn, "alice").policies == {"colour": "red", "only-field": "1", "sync": "5m"}
    assert _plan(conn, "bob").policies == {"colour": "blue", "only-field": "1", "sync": "15m"}
    catalog.set_policy(conn, "p-field", {"sync": "1h"})  # updates one key
    assert _plan(conn, "bob").policies["sync"] == "1h"
    catalog.unset_policy_keys(conn, "p-field", ["only-field"])
    assert "only-field" not in _plan(conn, "bob").policies


# --- errors --------------------------------------------------------------------------------


def test_unknown_names(conn: sqlite3.Connection) -> None:
    with pytest.raises(store.NotFound, match="no user named 'carol'"):
        store.user_id(conn, "carol")
    with pytest.raises(store.NotFound, match="no group"):
        store.add_members(conn, "nobody", ["alice"])
    with pytest.raises(store.NotFound, match="no app named 'ghost'"):
        catalog.deploy(conn, "app", "ghost", "user", "alice")
    with pytest.raises(store.NotFound, match="no policy"):
        catalog.deploy(conn, "policy", "ghost", "group", "field")
    catalog.set_policy(conn, "p", {"k": "v"})
    with pytest.raises(store.NotFound, match="not deployed"):
        catalog.undeploy(conn, "policy", "p", "user", "alice")
    with pytest.raises(store.NotFound, match="not a member"):
        store.remove_members(conn, "office", ["bob"])


def test_duplicates_and_invalid_names(db: Database, conn: sqlite3.Connection) -> None:
    with pytest.raises(store.AlreadyExists, match="alice"):
        store.add_user(conn, "ALICE", "x")
    with pytest.raises(store.AlreadyExists):
        store.add_group(conn, "field")
    with pytest.raises(store.AlreadyExists):
        store.add_device_type(conn, ANDROID)
    _versions(db, "client", ["1.0"])
    with pytest.raises(store.AlreadyExists, match="immutable"):
        _versions(db, "client", ["1.0"])
    for bad in ("", "-x", "a b", "x" * 65, "../x", "é"):
        with pytest.raises(store.InvalidValue):
            store.check_name(bad, "group")
    with pytest.raises(store.InvalidValue):
        catalog.check_version("1.0 beta")
    with pytest.raises(store.InvalidValue):
        catalog.set_policy(conn, "p", {"bad key": "v"})


def test_in_use_refusals(db: Database, conn: sqlite3.Connection) -> None:
    _versions(db, "client", ["1.0", "2.0"])
    with pytest.raises(store.InUse, match=r"client@1\.0"):
        store.remove_device_type(conn, ANDROID)
    catalog.deploy(conn, "app", "client", "user", "alice", version="1.0")
    with pytest.raises(store.InUse, match="pinned"):
        catalog.remove_app(conn, "client", "1.0")
    assert _apps(_plan(conn, "alice")) == {"client": "1.0"}  # nothing changed
    with pytest.raises(store.NotFound, match=r"no version '9\.9'"):
        catalog.deploy(conn, "app", "client", "user", "bob", version="9.9")
    assert catalog.remove_app(conn, "client") == 2  # all versions: the app and deployments go
    assert catalog.list_deployments(conn) == []
    store.remove_device_type(conn, ANDROID)


def test_removing_a_user_removes_its_deployments_and_devices(
    db: Database, conn: sqlite3.Connection
) -> None:
    _versions(db, "client", ["1.0"])
    catalog.deploy(conn, "app", "client", "user", "alice")
    uid, dtid = store.user_id(conn, "alice"), store.device_type_id(conn, ANDROID)
    store.record_device(conn, uid=uid, dtid=dtid, device_id="d1", package_id="p", address="a")
    store.record_device(conn, uid=uid, dtid=dtid, device_id="d1", package_id="q", address="b")
    [device] = store.list_devices(conn)
    assert (device.device_id, device.last_package, device.last_address) == ("d1", "q", "b")
    store.remove_user(conn, "alice")
    assert store.list_devices(conn) == []
    assert catalog.list_deployments(conn) == []
