"""CSCConfig and AgentConfig: defaults, environment prefixes and cross-field validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from csc.config import OTHER_PREFIXES, CSCConfig, default_state_dir, load_csc_config
from shared.config import AUTO, ConfigError, Secret
from tenant_agent.config import AgentConfig, load_agent_config

AGENT_ENV = {"CSC_AGENT_CSC": "ws://127.0.0.1:8080", "CSC_AGENT_UPSTREAM": "http://127.0.0.1:9"}


def csc_problems(env: dict[str, str], overrides: dict[str, object] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_csc_config(file=None, env=env, overrides=overrides)
    return exc.value.problems


def agent_problems(env: dict[str, str], overrides: dict[str, object] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_agent_config(file=None, env=env, overrides=overrides)
    return exc.value.problems


# --- CSC ---------------------------------------------------------------------------------------


def test_csc_defaults() -> None:
    cfg = load_csc_config(file=None, env={"HOME": "/home/u"})
    assert cfg.listen == "127.0.0.1:8080"
    assert cfg.listen_address == ("127.0.0.1", 8080)
    assert cfg.tcp_listen_address == ("127.0.0.1", 8081)
    assert cfg.state_dir == Path("/home/u/.local/state/csc")
    assert (cfg.initial_window, cfg.max_window, cfg.session_budget) == (
        262144,
        64 * 1024**2,
        128 * 1024**2,
    )
    assert cfg.max_frame == 262144
    assert cfg.max_body_size is None
    assert not cfg.tls_enabled
    assert cfg.token_audience == "csc-agent"
    assert cfg.validate() == []


def test_default_state_dir() -> None:
    assert default_state_dir({"XDG_STATE_HOME": "/s", "HOME": "/h"}) == Path("/s/csc")
    assert default_state_dir({"XDG_STATE_HOME": "rel", "HOME": "/h"}) == Path("/h/.local/state/csc")
    assert default_state_dir({"HOME": "/h"}) == Path("/h/.local/state/csc")
    assert default_state_dir({}).name == "csc"


def test_csc_env_and_file(tmp_path: Path) -> None:
    file = tmp_path / "csc.toml"
    file.write_text('listen = "0.0.0.0:80"\ntcp_listen = "off"\nmax_body_size = "100MiB"\n')
    env = {
        "CSC_LISTEN": "[::]:8443",
        "CSC_DRAIN_TIMEOUT": "2m",
        "CSC_STATE_DIR": str(tmp_path),
        "CSC_AGENT_TOKEN": "agent's own, not reported",
        "CSC_AGENT_CSC": "x",
        "CSC_PORTAL_DB": "x",
        "CSC_CONFIG": str(file),
    }
    cfg = load_csc_config(file=file, env=env)
    assert cfg.listen == "[::]:8443"
    assert cfg.tcp_listen is None and cfg.tcp_listen_address is None
    assert cfg.max_body_size == 100 * 1024**2
    assert cfg.drain_timeout == 120.0
    assert cfg.state_dir == tmp_path


def test_csc_no_field_collides_with_other_programs_prefixes() -> None:
    for f in dataclasses.fields(CSCConfig):
        assert not any(f"CSC_{f.name.upper()}".startswith(p) for p in OTHER_PREFIXES)
        assert f.name != "config"


def test_csc_unknown_env_var() -> None:
    assert csc_problems({"CSC_LISTN": "x"}) == [
        "environment CSC_LISTN: unknown setting (did you mean 'CSC_LISTEN'?)"
    ]


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"CSC_LISTEN": "127.0.0.1:70000"}, "CSC_LISTEN"),
        ({"CSC_MAX_FRAME": "8KiB"}, "below the minimum 16384"),
        ({"CSC_MAX_FRAME": "32MiB"}, "above the maximum 16777216"),
        ({"CSC_INITIAL_WINDOW": "128MiB"}, "initial_window (134217728) <= max_window"),
        ({"CSC_MAX_WINDOW": "256MiB"}, "<= session_budget"),
        ({"CSC_HEARTBEAT_TIMEOUT": "5s"}, "heartbeat_timeout (5s) must be greater"),
        ({"CSC_HEARTBEAT_INTERVAL": "0"}, "must be greater than 0"),
        ({"CSC_MAX_STREAMS_PER_SESSION": "0"}, "below the minimum 1"),
        ({"CSC_LOG_LEVEL": "chatty"}, "not one of debug, info, warning, error"),
        ({"CSC_TLS_CERT": "/nonexistent/cert.pem"}, "must be set together"),
        ({"CSC_TOKEN_AUDIENCE": " "}, "token_audience must not be empty"),
        ({"CSC_OPEN_TIMEOUT": "-1s"}, "CSC_OPEN_TIMEOUT"),
    ],
)
def test_csc_invalid(env: dict[str, str], fragment: str) -> None:
    problems = csc_problems(env)
    assert any(fragment in p for p in problems), problems


def test_csc_tls_files_must_exist(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    problems = csc_problems({"CSC_TLS_CERT": str(cert), "CSC_TLS_KEY": str(tmp_path / "k.pem")})
    assert problems == [f"tls_key {tmp_path / 'k.pem'}: no such file"]
    (tmp_path / "k.pem").write_text("x")
    cfg = load_csc_config(
        file=None, env={"CSC_TLS_CERT": str(cert), "CSC_TLS_KEY": str(tmp_path / "k.pem")}
    )
    assert cfg.tls_enabled


def test_csc_all_problems_at_once() -> None:
    problems = csc_problems(
        {"CSC_LISTEN": "nope", "CSC_BOGUS": "1", "CSC_LOG_LEVEL": "x"}, {"tcp_listen": "h:99999"}
    )
    assert len(problems) == 4


def test_csc_overrides_win() -> None:
    cfg = load_csc_config(
        file=None,
        env={"CSC_LISTEN": "127.0.0.1:1"},
        overrides={"listen": "127.0.0.1:0", "log_level": "DEBUG", "state_dir": "/x"},
    )
    assert cfg.listen == "127.0.0.1:0"
    assert cfg.log_level == "debug"
    assert cfg.state_dir == Path("/x")


# --- agent -------------------------------------------------------------------------------------


def test_agent_minimal() -> None:
    cfg = load_agent_config(file=None, env={**AGENT_ENV, "CSC_AGENT_TOKEN": "s3cr3t-v"})
    assert cfg.token.reveal() == "s3cr3t-v"
    assert cfg.sessions == 2
    assert cfg.aliases == []
    assert cfg.tcp_upstream is None and cfg.tcp_upstream_address is None
    assert "s3cr3t-v" not in repr(cfg) and "***" in repr(cfg)


@pytest.mark.parametrize("raw", ["auto", " Auto ", "AUTO"])
def test_agent_sessions_auto(raw: str) -> None:
    cfg = load_agent_config(
        file=None, env={**AGENT_ENV, "CSC_AGENT_TOKEN": "t", "CSC_AGENT_SESSIONS": raw}
    )
    assert cfg.sessions == AUTO


def test_agent_sessions_auto_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('sessions = "auto"\n')
    cfg = load_agent_config(file=path, env={**AGENT_ENV, "CSC_AGENT_TOKEN": "t"})
    assert cfg.sessions == AUTO
    path.write_text("sessions = 0\n")
    with pytest.raises(ConfigError) as exc:
        load_agent_config(file=path, env={**AGENT_ENV, "CSC_AGENT_TOKEN": "t"})
    assert any("write auto, or a number from 1" in p for p in exc.value.problems)


def test_agent_required_settings() -> None:
    problems = agent_problems({})
    assert len(problems) == 3
    assert any("'csc'" in p and "CSC_AGENT_CSC" in p for p in problems)
    assert any("'upstream'" in p and "--upstream" in p for p in problems)
    assert (
        "missing required setting 'token' (set it in the file, CSC_AGENT_TOKEN or --token; "
        "or set token_file)"
    ) in problems
    problems = agent_problems(AGENT_ENV)
    assert len(problems) == 1 and "missing required setting 'token'" in problems[0]
    assert agent_problems({**AGENT_ENV, "CSC_AGENT_TOKEN": ""}) == ["token must not be empty"]


def test_agent_token_file(tmp_path: Path) -> None:
    tf = tmp_path / "token"
    tf.write_text("  abc.def.ghi\n")
    cfg = load_agent_config(file=None, env=AGENT_ENV, overrides={"token_file": tf})
    assert cfg.token == Secret("abc.def.ghi")
    tf.write_text("\n")
    assert agent_problems(AGENT_ENV, {"token_file": tf}) == [f"token_file {tf}: the file is empty"]
    missing = tmp_path / "missing"
    problems = agent_problems(AGENT_ENV, {"token_file": missing})
    assert problems == [f"token_file {missing}: cannot read: No such file or directory"]
    problems = agent_problems({**AGENT_ENV, "CSC_AGENT_TOKEN": "x"}, {"token_file": tf})
    assert problems == ["set token or token_file, not both"]


def test_agent_aliases_are_normalised_grants() -> None:
    env = {**AGENT_ENV, "CSC_AGENT_TOKEN": "t", "CSC_AGENT_ALIASES": "ACME@Example.com,*@EX.org"}
    cfg = load_agent_config(file=None, env=env)
    assert cfg.aliases == ["acme@example.com", "*@ex.org"]
    cfg = load_agent_config(file=None, env=env, overrides={"aliases": ["B@example.com"]})
    assert cfg.aliases == ["b@example.com"]
    problems = agent_problems({**env, "CSC_AGENT_ALIASES": "ok@example.com,*@*"})
    assert len(problems) == 1 and problems[0].startswith("environment CSC_AGENT_ALIASES:")


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"CSC_AGENT_CSC": "ftp://h"}, "scheme http/https/ws/wss"),
        ({"CSC_AGENT_CSC": "wss://"}, "has no host"),
        ({"CSC_AGENT_UPSTREAM": "ws://h"}, "scheme http/https"),
        ({"CSC_AGENT_SESSIONS": "17"}, "above the maximum 16"),
        ({"CSC_AGENT_SESSIONS": "0"}, "'0' is not a count: write auto, or a number from 1"),
        ({"CSC_AGENT_SESSIONS": "-1"}, "below the minimum 1"),
        ({"CSC_AGENT_SESSIONS": "many"}, "expected a whole number or auto, got 'many'"),
        ({"CSC_AGENT_TCP_UPSTREAM": "h"}, "not a host:port"),
        ({"CSC_AGENT_BACKOFF_INITIAL": "1m"}, "backoff_initial (60s) must not exceed"),
        ({"CSC_AGENT_HEARTBEAT_INTERVAL": "1m"}, "heartbeat_timeout (30s) must be greater"),
        ({"CSC_AGENT_CA_FILE": "/nonexistent/ca.pem"}, "no such file"),
        ({"CSC_AGENT_MAX_WINDOW": "1KiB"}, "<= max_window"),
        ({"CSC_AGENT_UPSTREAM_TIMEOUT": "0s"}, "must be greater than 0"),
        ({"CSC_LISTEN": "not the agent's"}, None),
    ],
)
def test_agent_invalid(env: dict[str, str], fragment: str | None) -> None:
    full = {**AGENT_ENV, "CSC_AGENT_TOKEN": "t", **env}
    if fragment is None:
        load_agent_config(file=None, env=full)
        return
    problems = agent_problems(full)
    assert any(fragment in p for p in problems), problems


def test_agent_file(tmp_path: Path) -> None:
    file = tmp_path / "agent.toml"
    file.write_text(
        'csc = "wss://csc.example.com"\nupstream = "https://portal.local:8443"\n'
        'token = "t"\naliases = ["a@example.com"]\nsessions = 4\ntcp_upstream = "[::1]:443"\n'
        'upstream_timeout = "2m"\n'
    )
    cfg = load_agent_config(file=file, env={})
    assert cfg == AgentConfig(
        csc="wss://csc.example.com",
        upstream="https://portal.local:8443",
        token=Secret("t"),
        aliases=["a@example.com"],
        sessions=4,
        tcp_upstream="[::1]:443",
        upstream_timeout=120.0,
    )
    assert cfg.tcp_upstream_address == ("::1", 443)
