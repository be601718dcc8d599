"""PortalConfig: defaults, the CSC_PORTAL_* environment, a TOML file and cross-field checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from portal.config import PortalConfig, default_state_dir, load_portal_config
from shared.config import ConfigError


def _problems(env: dict[str, str], file: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_portal_config(file=file, env=env)
    return exc.value.problems


def test_defaults_are_secure() -> None:
    cfg = load_portal_config(file=None, env={"HOME": "/home/u"})
    assert cfg.state_dir == Path("/home/u/.local/state/csc-portal")
    assert cfg.listen_address == ("127.0.0.1", 8000)
    assert cfg.password_hash_cost == "standard"
    assert cfg.session_ttl == 900
    assert (cfg.throttle_failures, cfg.throttle_window, cfg.throttle_lockout) == (5, 300, 60)
    assert cfg.trusted_proxies == ["127.0.0.0/8", "::1/128"]
    assert cfg.get_url is None and cfg.sms_alias is None and cfg.sms_host is None
    assert cfg.validate() == []


def test_default_state_dir() -> None:
    assert default_state_dir({"XDG_STATE_HOME": "/s"}) == Path("/s/csc-portal")
    assert default_state_dir({"XDG_STATE_HOME": "rel", "HOME": "/h"}) == Path(
        "/h/.local/state/csc-portal"
    )


def test_environment_and_file(tmp_path: Path) -> None:
    file = tmp_path / "portal.toml"
    file.write_text('name = "Acme Ltd"\nsession_ttl = "5m"\ntrusted_proxies = ["10.1.2.3"]\n')
    env = {
        "CSC_PORTAL_SMS_ALIAS": "ACME@Example.com",
        "CSC_PORTAL_GET_URL": "https://portal.example/get/",
        "CSC_PORTAL_PASSWORD_HASH_COST": "test",
        "CSC_PORTAL_SESSION_TTL": "10m",
        "CSC_AGENT_TOKEN": "belongs to another program",
    }
    cfg = load_portal_config(file=file, env=env, overrides={"listen": "127.0.0.1:0"})
    assert cfg.name == "Acme Ltd"
    assert cfg.sms_alias == "acme@example.com"
    assert cfg.session_ttl == 600  # the environment beats the file
    assert cfg.trusted_proxies == ["10.1.2.3/32"]
    assert cfg.listen_address == ("127.0.0.1", 0)


def test_every_problem_at_once() -> None:
    problems = _problems(
        {
            "CSC_PORTAL_SMS_ALIAS": "not an alias",
            "CSC_PORTAL_TRUSTED_PROXIES": "10.0.0.0/8, banana",
            "CSC_PORTAL_PASSWORD_HASH_COST": "cheap",
            "CSC_PORTAL_GET_URL": "ftp://x/",
            "CSC_PORTAL_LISTN": ":80",
        }
    )
    text = "\n".join(problems)
    assert len(problems) == 5, text
    assert "CSC_PORTAL_SMS_ALIAS" in text and "not a valid alias" in text
    assert "'banana' is not an IP address" in text
    assert "'cheap' is not one of standard, test" in text
    assert "CSC_PORTAL_GET_URL" in text
    assert "did you mean 'CSC_PORTAL_LISTEN'" in text


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"CSC_PORTAL_SMS_HOST": "dmz.example.com"}, "set together"),
        ({"CSC_PORTAL_SMS_PORT": "8443"}, "set together"),
        (
            {
                "CSC_PORTAL_SMS_ALIAS": "acme@example.com",
                "CSC_PORTAL_SMS_HOST": "h",
                "CSC_PORTAL_SMS_PORT": "1",
            },
            "not both",
        ),
        ({"CSC_PORTAL_SMS_HOST": "bad host!", "CSC_PORTAL_SMS_PORT": "1"}, "not a host"),
        ({"CSC_PORTAL_THROTTLE_LOCKOUT": "2h"}, "must not exceed"),
        ({"CSC_PORTAL_NAME": "  "}, "name must not be empty"),
    ],
)
def test_cross_field_checks(env: dict[str, str], problem: str) -> None:
    assert any(problem in p for p in _problems(env)), _problems(env)


def test_direct_construction_has_the_same_defaults() -> None:
    assert PortalConfig().password_hash_cost == "standard"
