"""csc/tenants: the managed objects without I/O: input checks, the catalog, legacy tenants.json."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csc.tenants import (
    Catalog,
    InvalidInput,
    Limits,
    Tenant,
    TenantsFileError,
    TokenRecord,
    conflicts,
    iso,
    parse_grants,
    parse_new_tenant,
    parse_tenant_update,
    parse_ttl_value,
    read_legacy_tenants,
)

NOW = 1_700_000_000.0


def test_new_tenant_defaults() -> None:
    tenant = parse_new_tenant({"id": "acme"}, NOW)
    assert tenant == Tenant("acme", "acme", "", "active", Limits(), NOW, NOW)
    full = parse_new_tenant(
        {
            "id": "beta",
            "name": " Beta Corp ",
            "contact": "help@beta.example",
            "state": "suspended",
            "limits": {"max_sessions": 4, "max_request_rate": 2},
        },
        NOW,
    )
    assert full.name == "Beta Corp" and full.suspended
    assert full.limits == Limits(max_sessions=4, max_streams=None, max_request_rate=2.0)
    assert full.to_json()["created_at"] == iso(NOW) == "2023-11-14T22:13:20Z"
    assert full.public() == {"name": "Beta Corp", "contact": "help@beta.example"}
    assert full.who() == "tenant Beta Corp, contact help@beta.example"
    assert tenant.who() == "tenant acme"


def test_new_tenant_reports_every_problem() -> None:
    body = {
        "id": "Not Valid",
        "name": 5,
        "contact": "x" * 101,
        "state": "asleep",
        "limits": {"max_sessions": 0, "max_streams": True, "max_request_rate": -1, "max_cpu": 1},
        "colour": "red",
    }
    with pytest.raises(InvalidInput) as info:
        parse_new_tenant(body, NOW)
    problems = info.value.problems
    expected = [
        "colour: unknown field",
        "id: 'Not Valid' is not a valid tenant id",
        "name: expected a string",
        "contact: longer than 100 characters",
        "state: expected one of active, suspended",
        "limits.max_sessions: expected a whole number >= 1 or null",
        "limits.max_streams: expected a whole number >= 1 or null",
        "limits.max_request_rate: expected a positive number or null",
        "limits.max_cpu: unknown limit",
    ]
    assert len(problems) == len(expected), problems
    for start in expected:
        assert any(p.startswith(start) for p in problems), (start, problems)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ([], "the body must be a JSON object"),
        ({}, "id: required"),
        ({"id": "acme", "name": "bell\x07"}, "name: control characters are not allowed"),
        ({"id": "acme", "limits": [1]}, "limits: expected an object"),
        ({"id": "acme", "limits": {"max_request_rate": float("nan")}}, "max_request_rate"),
    ],
)
def test_new_tenant_single_problems(body: object, problem: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(problem)):
        parse_new_tenant(body, NOW)


def test_update_applies_only_what_is_given() -> None:
    tenant = parse_new_tenant({"id": "acme", "name": "Acme", "limits": {"max_streams": 9}}, NOW)
    update = parse_tenant_update({"contact": "ops@acme.example", "limits": {"max_sessions": 2}})
    after = update.apply(tenant, NOW + 5)
    assert after.name == "Acme" and after.contact == "ops@acme.example"
    assert after.limits == Limits(max_sessions=2, max_streams=9)
    assert after.updated_at == NOW + 5 and after.created_at == NOW
    cleared = parse_tenant_update({"limits": {"max_streams": None}, "name": ""}).apply(after, NOW)
    assert cleared.limits == Limits(max_sessions=2) and cleared.name == "acme"
    assert parse_tenant_update({"state": "suspended"}).apply(tenant, NOW).suspended
    with pytest.raises(InvalidInput) as info:
        parse_tenant_update({"id": "other", "state": 1})
    assert info.value.problems == ["id: unknown field", "state: expected one of active, suspended"]


def test_grants_and_ttl() -> None:
    problems: list[str] = []
    grants = parse_grants(
        ["Acme@Example.com", "*@acme.org", "acme@example.com", "bad alias"], "aliases", problems
    )
    assert grants == ["acme@example.com", "*@acme.org"]
    assert len(problems) == 1 and problems[0].startswith("aliases[3]: ")
    for empty in ([], None, "a@b.org"):
        problems = []
        assert parse_grants(empty, "aliases", problems) == []
        assert problems == ["aliases: expected a non-empty list of aliases"]
    problems = []
    assert parse_ttl_value("1h", problems) == 3600 and parse_ttl_value(90, problems) == 90
    assert parse_ttl_value("soon", problems) is None and parse_ttl_value(True, problems) is None
    assert parse_ttl_value(0, problems) is None
    assert len(problems) == 3 and all(p.startswith("ttl: ") for p in problems)


def test_catalog_owner_and_assignment_checks() -> None:
    catalog = Catalog(assigned={"acme@example.com": "acme", "*@acme.org": "acme", "b@x.org": "b"})
    assert catalog.owner("acme@example.com") == "acme"
    assert catalog.owner("anyone@acme.org") == "acme"
    assert catalog.owner("*@acme.org") == "acme"
    assert catalog.owner("*@x.org") is None  # a pattern is never "covered" by an alias
    assert catalog.owner("nobody@example.com") is None and catalog.owner("bare") is None
    assert catalog.aliases_of("acme") == ["*@acme.org", "acme@example.com"]
    assert catalog.not_assigned("acme", ["x@acme.org", "b@x.org", "new@example.com"]) == [
        "'b@x.org' belongs to tenant 'b', not 'acme'",
        "'new@example.com' is not assigned to tenant 'acme'",
    ]


def test_conflicts_name_each_collision() -> None:
    held = {"acme@example.com": "acme", "*@acme.org": "acme"}
    assert conflicts(held, "acme", ["acme@example.com", "boss@acme.org"]) == []
    assert conflicts(held, "evil", ["acme@example.com", "x@acme.org", "*@example.com"]) == [
        "'acme@example.com' belongs to tenant 'acme'",
        "'x@acme.org' is covered by '*@acme.org' of tenant 'acme'",
        "'*@example.com' would cover 'acme@example.com' of tenant 'acme'",
    ]


def test_token_record_status() -> None:
    record = TokenRecord("j1", "acme", ("a@b.org",), NOW, NOW + 60, "admin")
    assert record.status(NOW) == "active" and record.status(NOW + 60) == "expired"
    revoked = TokenRecord("j1", "acme", ("a@b.org",), NOW, NOW + 60, "admin", NOW + 1, "bob")
    assert revoked.to_json(NOW)["status"] == "revoked"
    assert revoked.to_json(NOW)["revoked_by"] == "bob"


def test_legacy_tenants_file(tmp_path: Path) -> None:
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"Acme@Example.com": "acme", "*@acme.org": "acme"}))
    assert read_legacy_tenants(path) == {"acme@example.com": "acme", "*@acme.org": "acme"}


@pytest.mark.parametrize(
    "content", ["not json", "[1, 2]", '{"a@example.com": 5}', '{"bad alias": "acme"}']
)
def test_legacy_tenants_file_corrupt(tmp_path: Path, content: str) -> None:
    path = tmp_path / "tenants.json"
    path.write_text(content)
    with pytest.raises(TenantsFileError, match=re.escape("tenants.json")):
        read_legacy_tenants(path)


# --- properties --------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
_bodies = st.dictionaries(
    st.sampled_from(["id", "name", "contact", "state", "limits", "x"]), _json, max_size=6
)


@given(_bodies)
def test_tenant_parsers_accept_or_list_problems(body: dict[str, Any]) -> None:
    """Whatever JSON comes in, the parsers give a valid tenant or InvalidInput with problems."""
    try:
        tenant = parse_new_tenant(body, NOW)
    except InvalidInput as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
    else:
        assert tenant.state in ("active", "suspended") and len(tenant.name) <= 100
        assert json.loads(json.dumps(tenant.to_json()))["id"] == tenant.id
    body.pop("id", None)
    try:
        parse_tenant_update(body).apply(Tenant("t", "t"), NOW)
    except InvalidInput as exc:
        assert exc.problems


@given(st.lists(st.text(max_size=30), max_size=6))
def test_grant_parser_never_raises(raw: list[str]) -> None:
    problems: list[str] = []
    grants = parse_grants(raw, "aliases", problems)
    assert len(set(grants)) == len(grants)
    assert bool(problems) or bool(grants)
    if grants:
        assert parse_grants(grants, "aliases", []) == grants
