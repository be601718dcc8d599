"""Kubernetes service-link variables never trip a configuration loader.

Kubernetes injects ``{SERVICE}_SERVICE_HOST``, ``{SERVICE}_PORT_8080_TCP`` and friends for every
Service in the namespace; for a Service named ``csc``, ``csc-agent``, ``csc-portal`` or
``csc-peer`` those names start with the programs' own prefixes. The Helm charts turn them off
(``enableServiceLinks: false``), and the loaders ignore them anyway, but only when both the name
and the value have the service-link shape: a misspelt setting is still an error.
"""

from __future__ import annotations

import pytest

from csc.config import load_csc_config
from portal.config import load_portal_config
from shared.config import ConfigError, is_service_link
from tenant_agent.config import load_agent_config


def links(service: str, ip: str = "10.96.0.12", port: int = 8080) -> dict[str, str]:
    """The variables Kubernetes injects for a Service named ``service`` with one TCP port."""
    p = service.upper().replace("-", "_")
    url = f"tcp://{ip}:{port}"
    return {
        f"{p}_SERVICE_HOST": ip,
        f"{p}_SERVICE_PORT": str(port),
        f"{p}_SERVICE_PORT_HTTP": str(port),
        f"{p}_PORT": url,
        f"{p}_PORT_{port}_TCP": url,
        f"{p}_PORT_{port}_TCP_PROTO": "tcp",
        f"{p}_PORT_{port}_TCP_PORT": str(port),
        f"{p}_PORT_{port}_TCP_ADDR": ip,
    }


SERVICES = ["csc", "csc-peer", "csc-admin", "csc-agent", "csc-portal", "csc-portal-sms-x"]


def all_links() -> dict[str, str]:
    env: dict[str, str] = {}
    for i, name in enumerate(SERVICES):
        env |= links(name, ip=f"10.96.0.{10 + i}", port=8080 + i)
    env |= links("csc-v6", ip="fd00::a", port=8083)
    return env


def test_every_injected_variable_has_the_service_link_shape() -> None:
    assert all(is_service_link(k, v) for k, v in all_links().items())


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("CSC_LISTN", "0.0.0.0:80"),  # a typo, not a link
        ("CSC_ADMIN_PORT", "8082"),  # a guessed setting name
        ("CSC_PORT", "8080"),  # a link URL always has a scheme
        ("CSC_SERVICE_HOST", "csc.example.com"),  # links carry an IP address
        ("CSC_PORT_8080_TCP_PROTO", "http"),
        ("CSC_SERVICE_PORT_HTTP", "http"),
    ],
)
def test_other_variables_are_not_links(var: str, value: str) -> None:
    assert not is_service_link(var, value)


def test_csc_loader_ignores_service_links() -> None:
    env = all_links() | {"CSC_LISTEN": "0.0.0.0:8080", "CSC_STATE_DIR": "/var/lib/csc"}
    cfg = load_csc_config(file=None, env=env)
    assert cfg.listen == "0.0.0.0:8080"


def test_agent_loader_ignores_service_links() -> None:
    env = all_links() | {
        "CSC_AGENT_CSC": "http://127.0.0.1:8080",
        "CSC_AGENT_TOKEN": "t.o.k",
        "CSC_AGENT_UPSTREAM": "http://127.0.0.1:9000",
    }
    assert load_agent_config(file=None, env=env).sessions == 2


def test_portal_loader_ignores_service_links() -> None:
    assert load_portal_config(file=None, env=all_links()).listen == "127.0.0.1:8000"


def test_a_misspelt_setting_is_still_refused_beside_links() -> None:
    env = all_links() | {"CSC_LISTN": "0.0.0.0:8080"}
    with pytest.raises(ConfigError) as err:
        load_csc_config(file=None, env=env)
    assert err.value.problems == [
        "environment CSC_LISTN: unknown setting (did you mean 'CSC_LISTEN'?)"
    ]
