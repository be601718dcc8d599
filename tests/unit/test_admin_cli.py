"""``csc admin`` without a server (tables, where the URL and token come from, usage errors), and
docs/openapi.json against the routes the admin API registers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from csc import cli as csc_cli
from csc.admin import cli as admin_cli
from csc.admin.api import PREFIX, ROUTES
from csc.config import CSCConfig
from csc.relay.registry import MemoryRegistry
from csc.state import NodeState
from csc.store import Store

OPENAPI = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def csc(*argv: str, env: dict[str, str] | None = None) -> int:
    return csc_cli.main(list(argv), env=env or {})


def test_table_aligns_columns() -> None:
    text = admin_cli.table(
        ("TENANT", "ALIASES", "CONTACT"),
        [("acme", ["a@x.org", "*@acme.org"], None), ("b", [], "help")],
        "(none)",
    )
    assert text.splitlines() == [
        "TENANT  ALIASES             CONTACT",
        "acme    a@x.org,*@acme.org  -",
        "b       -                   help",
    ]
    assert admin_cli.table(("A",), [], "(no tenants)") == "(no tenants)"


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (5 * 1024**2, "5.0 MiB"),
        (3 * 1024**4, "3072.0 GiB"),
    ],
)
def test_human_bytes(count: int, text: str) -> None:
    assert admin_cli.human_bytes(count) == text


def _client(argv: list[str], env: dict[str, str]) -> admin_cli.AdminClient:
    args = csc_cli.build_parser().parse_args(["admin", "tenants", "list", *argv])
    return admin_cli.client_for(args, env)


def test_url_and_token_sources(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "admin-url").write_text("http://127.0.0.1:9/\n")
    (state / "admin-token").write_text("from-state-dir\n")
    client = _client(["--state-dir", str(state)], {})
    assert (client.url, client.token) == ("http://127.0.0.1:9/", "from-state-dir")
    env = {"CSC_STATE_DIR": str(state), "CSC_ADMIN_TOKEN": "from-env"}
    assert _client([], env).token == "from-env"
    token_file = tmp_path / "tok"
    token_file.write_text("from-file")
    env = {"CSC_ADMIN_URL": "https://admin.example:8443", "CSC_ADMIN_TOKEN_FILE": str(token_file)}
    client = _client([], env)
    assert (client.url, client.token) == ("https://admin.example:8443", "from-file")
    assert client.context is not None  # https: certificates are verified
    argv = ["--url", "http://h:1", "--token-file", str(token_file)]
    assert _client(argv, {"CSC_ADMIN_TOKEN": "ignored"}).token == "from-file"
    # the options work after `admin` too
    args = csc_cli.build_parser().parse_args(["admin", *argv, "tenants", "list", "--json"])
    client = admin_cli.client_for(args, {})
    assert (client.url, client.token, args.json) == ("http://h:1", "from-file", True)
    with pytest.raises(admin_cli.UsageProblem, match="no admin API URL"):
        _client(["--state-dir", str(tmp_path / "none")], {})
    with pytest.raises(admin_cli.UsageProblem, match="no operator token"):
        _client(["--state-dir", str(tmp_path / "none"), "--url", "http://h:1"], {})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(admin_cli.UsageProblem, match="is empty"):
        _client(["--url", "http://h:1", "--token-file", str(tmp_path / "empty")], {})
    with pytest.raises(admin_cli.UsageProblem, match="expected http"):
        _client(["--url", "ftp://h", "--token-file", str(token_file)], {})


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert csc("admin") == 2
    assert csc("admin", "tenants") == 2
    assert csc("admin", "tenants", "create") == 2  # the id is missing
    assert csc("admin", "tenants", "update", "acme", "--max-sessions", "0") == 2
    assert csc("admin", "audit", "--limit", "5000") == 2
    capsys.readouterr()
    assert csc("admin", "tenants", "list", "--state-dir", str(tmp_path)) == 2
    assert "no admin API URL" in capsys.readouterr().err
    argv = ["--url", "http://127.0.0.1:1", "--token-file", str(tmp_path / "missing")]
    assert csc("admin", "drain", *argv) == 2
    assert "cannot read the token file" in capsys.readouterr().err


def test_unreachable_api_is_a_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token = tmp_path / "token"
    token.write_text("t")
    # port 1 on loopback: nothing listens there, the connection is refused at once
    argv = ["--url", "http://127.0.0.1:1", "--token-file", str(token), "--timeout", "5"]
    assert csc("admin", "tenants", "list", *argv) == 1
    assert "cannot reach the admin API at http://127.0.0.1:1" in capsys.readouterr().err


def test_offline_operator_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = ["--state-dir", str(tmp_path)]
    assert csc("operator", "add", "alice", *state) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("csc_op_")
    assert csc("operator", "add", "alice", *state) == 1
    assert "already exists" in capsys.readouterr().err
    assert csc("operator", "add", "Bad Name", *state) == 2
    target = tmp_path / "bob.token"
    assert csc("operator", "add", "bob", "--token-file", str(target), *state) == 0
    assert target.stat().st_mode & 0o777 == 0o600
    assert csc("operator", "add", "carol", "--token-file", str(target), *state) == 1
    capsys.readouterr()
    assert csc("operator", "list", *state) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["OPERATOR", "CREATED"]  # a header, times in ISO 8601 UTC
    assert [row.split()[0] for row in rows] == ["alice", "bob"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row.split()[1]) for row in rows)
    assert csc("operator", "remove", "alice", *state) == 0
    assert csc("operator", "remove", "alice", *state) == 1
    store = Store(tmp_path)
    try:
        assert [name for name, _ in store.operators()] == ["bob"]
        actions = [e.action for e in store.audit()]
        # carol's token file existed: created and removed again, both audited
        assert actions == [
            "operator.remove",
            "operator.remove",
            "operator.create",
            "operator.create",
            "operator.create",
        ]
        assert token not in json.dumps([e.to_json() for e in store.audit()])
    finally:
        store.close()


# --- docs/openapi.json -------------------------------------------------------------------------


def _registered_routes(tmp_path: Path) -> set[tuple[str, str]]:
    from csc.admin.api import create_admin_app

    store = Store(tmp_path)
    try:
        state = NodeState(
            config=CSCConfig(state_dir=tmp_path),
            registry=MemoryRegistry(source=store),
            public_keys=[],
            store=store,
        )
        app = create_admin_app(state)
        return {
            (route.method, route.resource.canonical)
            for route in app.router.routes()
            if route.resource is not None and route.method != "HEAD"
        }
    finally:
        store.close()


def test_openapi_documents_exactly_the_registered_routes(tmp_path: Path) -> None:
    doc = json.loads(OPENAPI.read_text(encoding="utf-8"))
    assert doc["openapi"].startswith("3.")
    documented = {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }
    registered = _registered_routes(tmp_path)
    assert registered == {(m, PREFIX + p) for m, p, _ in ROUTES}
    assert documented == registered


def test_openapi_is_complete_and_consistent() -> None:
    doc = json.loads(OPENAPI.read_text(encoding="utf-8"))
    schemas = doc["components"]["schemas"]
    text = json.dumps(doc)
    for ref in re.findall(r'"#/components/(schemas|responses)/([A-Za-z]+)"', text):
        assert ref[1] in doc["components"][ref[0]], ref
    for path, item in doc["paths"].items():
        declared = {p["name"] for p in item.get("parameters", []) if p["in"] == "path"}
        assert declared == set(re.findall(r"{(\w+)}", path)), path
        for method, operation in item.items():
            if method == "parameters":
                continue
            assert "401" in operation["responses"], (method, path)
            assert operation["summary"] and operation["operationId"]
    codes = set(schemas["Error"]["properties"]["error"]["enum"])
    assert {"bad_request", "auth_failed", "not_found", "alias_taken", "not_assigned"} <= codes
