"""The ``csc`` and ``csc-agent`` command lines, with the server and agent replaced by fakes."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from csc import cli as csc_cli
from csc.config import CSCConfig
from csc.store import Store
from shared.tokens import PUBLIC_KEY_FILE, SIGNING_KEY_FILE, load_public_keys, verify_token
from tenant_agent import cli as agent_cli
from tenant_agent.config import AgentConfig

REPO = Path(__file__).resolve().parents[2]
PY_CSC = (sys.executable, "-m", "csc")


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch) -> list[tuple[CSCConfig, Path | None]]:
    calls: list[tuple[CSCConfig, Path | None]] = []

    def serve(config: CSCConfig, *, ready_file: Path | None = None) -> int:
        calls.append((config, ready_file))
        return 0

    module = types.ModuleType("csc.server")
    module.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "csc.server", module)
    return calls


@pytest.fixture
def fake_agent(monkeypatch: pytest.MonkeyPatch) -> list[AgentConfig]:
    calls: list[AgentConfig] = []

    def run(config: AgentConfig) -> int:
        calls.append(config)
        return 0

    module = types.ModuleType("tenant_agent.agent")
    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tenant_agent.agent", module)
    return calls


def csc(*argv: str, env: dict[str, str] | None = None) -> int:
    return csc_cli.main(list(argv), env=env or {})


# --- csc serve ---------------------------------------------------------------------------------


def test_serve_builds_config_from_all_sources(
    tmp_path: Path, fake_server: list[tuple[CSCConfig, Path | None]]
) -> None:
    file = tmp_path / "csc.toml"
    file.write_text('listen = "127.0.0.1:1"\nopen_timeout = "5s"\n')
    env = {"CSC_CONFIG": str(file), "CSC_DRAIN_TIMEOUT": "1m", "CSC_AGENT_TOKEN": "not ours"}
    ready = tmp_path / "ready.json"
    argv = ["serve", "--listen", "127.0.0.1:0", "--tcp-listen", "off", "--ready-file", str(ready)]
    argv += ["--state-dir", str(tmp_path / "s"), "--log-level", "debug"]
    assert csc(*argv, env=env) == 0
    [(config, ready_file)] = fake_server
    assert config.listen == "127.0.0.1:0"
    assert config.tcp_listen is None
    assert config.open_timeout == 5.0
    assert config.drain_timeout == 60.0
    assert config.state_dir == tmp_path / "s"
    assert config.log_level == "debug"
    assert ready_file == ready
    assert logging.getLogger().level == logging.DEBUG


def test_serve_reports_every_config_problem(
    capsys: pytest.CaptureFixture[str], fake_server: list[Any]
) -> None:
    env = {"CSC_BOGUS": "1", "CSC_MAX_FRAME": "1"}
    assert csc("serve", "--listen", "nope", env=env) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "csc: configuration error:"
    assert len(err) == 4 and all(line.startswith("  ") for line in err[1:])
    assert any("option --listen" in line for line in err)
    assert not fake_server


def test_serve_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert csc("serve", "--config", str(tmp_path / "none.toml")) == 2
    assert "configuration file not found" in capsys.readouterr().err


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert csc() == 2
    assert csc("token") == 2
    assert csc("bogus") == 2
    assert csc("token", "issue", "--tenant", "acme") == 2  # --alias is required
    assert csc("--help") == 0
    assert "serve" in capsys.readouterr().out


# --- csc token ---------------------------------------------------------------------------------


def test_token_issue_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    argv = ["token", "issue", "--tenant", "acme", "--alias", "Acme@Example.com"]
    argv += ["--alias", "*@acme.org", "--ttl", "1h", "--state-dir", str(state), "--assign"]
    assert csc(*argv) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert out == token + "\n" and token.count(".") == 2
    assert f"created a new signing key in {state}" in err
    assert (state / SIGNING_KEY_FILE).exists() and (state / PUBLIC_KEY_FILE).exists()
    claims = verify_token(token, load_public_keys(state), audience="csc-agent", issuer="csc")
    assert claims.tenant == "acme"
    assert claims.aliases == ("acme@example.com", "*@acme.org")
    store = Store(state)
    try:
        assert store.catalog().assigned == {"acme@example.com": "acme", "*@acme.org": "acme"}
        [record] = store.tokens("acme")
        assert record.jti == claims.jti and record.aliases == claims.aliases
        assert record.issued_by.startswith("local:")
    finally:
        store.close()

    assert csc("token", "verify", token, "--state-dir", str(state)) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["tenant"] == "acme" and shown["aliases"] == ["acme@example.com", "*@acme.org"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", shown["expires_at"])  # not epoch

    # a second token reuses the key and says nothing about creating one; b@acme.org is the
    # tenant's through its pattern, so no --assign is needed
    assert (
        csc(
            "token", "issue", "--tenant", "acme", "--alias", "b@acme.org", "--state-dir", str(state)
        )
        == 0
    )
    assert "created" not in capsys.readouterr().err


def test_token_issue_refuses_aliases_not_assigned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["token", "issue", "--state-dir", str(tmp_path), "--tenant", "acme"]
    assert csc(*base, "--alias", "a@example.com") == 2
    assert "no tenant 'acme'" in capsys.readouterr().err
    assert csc(*base, "--alias", "a@example.com", "--assign") == 0
    capsys.readouterr()
    assert csc(*base, "--alias", "a@example.com", "--alias", "b@example.com") == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "'b@example.com' is not assigned to tenant 'acme'" in err
    assert "a@example.com'" not in err.split("cannot issue the token:")[1]


def test_token_issue_uses_env_state_dir_and_audience(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"CSC_STATE_DIR": str(tmp_path), "CSC_TOKEN_AUDIENCE": "other"}
    argv = ["token", "issue", "--tenant", "t1", "--alias", "a@example.com", "--assign"]
    assert csc(*argv, env=env) == 0
    token = capsys.readouterr().out.strip()
    claims = verify_token(token, load_public_keys(tmp_path), audience="other", issuer="csc")
    assert claims.tenant == "t1"
    assert csc("token", "verify", token, "--state-dir", str(tmp_path)) == 1
    assert "token rejected: wrong audience" in capsys.readouterr().err


def test_token_issue_alias_taken(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["token", "issue", "--state-dir", str(tmp_path), "--alias", "acme@example.com"]
    base.append("--assign")
    assert csc(*base, "--tenant", "acme") == 0
    capsys.readouterr()
    assert csc(*base, "--tenant", "evil") == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "cannot issue the token: 'acme@example.com' belongs to tenant 'acme'" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tenant", "Bad Tenant", "--alias", "a@example.com"], "--tenant:"),
        (["--tenant", "acme", "--alias", "bad alias"], "--alias:"),
        (["--tenant", "acme", "--alias", "a@example.com", "--ttl", "0"], "--ttl:"),
        (["--tenant", "acme", "--alias", "a@example.com", "--ttl", "soon"], "--ttl:"),
    ],
)
def test_token_issue_bad_args(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert csc("token", "issue", "--state-dir", str(tmp_path), *args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"csc: {message}")
    assert not (tmp_path / SIGNING_KEY_FILE).exists()


def test_token_verify_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert csc("token", "verify", "x.y.z", "--state-dir", str(tmp_path / "empty")) == 1
    assert "no public key" in capsys.readouterr().err
    assert (
        csc(
            "token",
            "issue",
            "--tenant",
            "a",
            "--alias",
            "a@x.org",
            "--assign",
            "--state-dir",
            str(tmp_path),
        )
        == 0
    )
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(read=lambda: "garbage\n"))
    assert csc("token", "verify", "-", "--state-dir", str(tmp_path)) == 1
    assert "csc: token rejected: malformed token" in capsys.readouterr().err


def test_python_dash_m_csc(tmp_path: Path) -> None:
    result = subprocess.run(
        [*PY_CSC, "token", "issue", "--assign", "--tenant", "acme", "--alias", "a@b.org"],
        cwd=REPO,
        env={"CSC_STATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(".") == 2


# --- csc-agent ---------------------------------------------------------------------------------


def agent(*argv: str, env: dict[str, str] | None = None) -> int:
    return agent_cli.main(list(argv), env=env or {})


def test_agent_flags(tmp_path: Path, fake_agent: list[AgentConfig]) -> None:
    tf = tmp_path / "token"
    tf.write_text("tok.en.value\n")
    argv = ["--csc", "ws://127.0.0.1:8080", "--token-file", str(tf), "--upstream", "http://p:1"]
    argv += ["--tcp-upstream", "p:2", "--sessions", "3", "--alias", "A@example.com"]
    argv += ["--alias", "*@ex.org", "--log-level", "warning"]
    assert agent(*argv, env={"CSC_LISTEN": "ignored", "CSC_AGENT_UPSTREAM_TIMEOUT": "2m"}) == 0
    [config] = fake_agent
    assert config.token.reveal() == "tok.en.value"
    assert config.sessions == 3
    assert config.aliases == ["a@example.com", "*@ex.org"]
    assert config.tcp_upstream == "p:2"
    assert config.upstream_timeout == 120.0
    assert config.log_level == "warning"


def test_agent_env_and_config_file(tmp_path: Path, fake_agent: list[AgentConfig]) -> None:
    file = tmp_path / "agent.toml"
    file.write_text('csc = "wss://csc.example.com"\nupstream = "https://portal"\n')
    env = {"CSC_AGENT_CONFIG": str(file), "CSC_AGENT_TOKEN": "t"}
    assert agent(env=env) == 0
    assert fake_agent[0].csc == "wss://csc.example.com"


def test_agent_config_errors(capsys: pytest.CaptureFixture[str], fake_agent: list[Any]) -> None:
    assert agent("--sessions", "99", "--csc", "ftp://x") == 2
    err = capsys.readouterr().err
    assert err.startswith("csc-agent: configuration error:\n")
    assert "option --sessions: 99 is above the maximum 16" in err
    assert "option --csc:" in err
    assert "missing required setting 'upstream'" in err
    assert "missing required setting 'token'" in err
    assert not fake_agent


def test_agent_token_and_token_file_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    assert agent("--token", "a", "--token-file", "b") == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_agent_token_never_printed(
    capsys: pytest.CaptureFixture[str], fake_agent: list[Any]
) -> None:
    assert agent("--token", "very-secret-token", "--csc", "x") == 2
    out, err = capsys.readouterr()
    assert "very-secret-token" not in out + err


def test_operator_list_on_a_missing_state_dir_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Listings name the path looked in instead of creating a store."""
    missing = tmp_path / "nowhere"
    for argv in (["operator", "list"], ["operator", "remove", "bob"]):
        assert csc_cli.main([*argv, "--state-dir", str(missing)], env={}) == 1
        err = capsys.readouterr().err
        assert f"no CSC state in {missing} (csc.db is missing)" in err
        assert "--state-dir" in err and "CSC_STATE_DIR" in err
        assert not missing.exists()


# --- --version ---------------------------------------------------------------------------------


def test_version_is_looked_up_only_when_asked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Building a parser leaves the installed package's metadata alone (the lookup imports
    importlib.metadata and scans site-packages at every start); ``--version`` prints it."""
    from portal import cli as portal_cli
    from shared import cli_support

    looked_up: list[str] = []

    def version() -> str:
        looked_up.append("yes")
        return "9.9.9"

    monkeypatch.setattr(cli_support, "version", version)
    for module, prog in ((csc_cli, "csc"), (agent_cli, "csc-agent"), (portal_cli, "csc-portal")):
        parser = module.build_parser()
        assert not looked_up, prog
        with pytest.raises(SystemExit) as exited:
            parser.parse_args(["--version"])
        assert exited.value.code == 0
        assert capsys.readouterr().out == f"{prog} 9.9.9\n"
        looked_up.clear()
