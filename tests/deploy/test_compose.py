"""deploy/compose.yaml and deploy/haproxy.cfg (no Docker engine here to run them): HAProxy
accepts its configuration (``haproxy -c``), the compose file's nodes form one cluster, and
every CSC_* variable it and the chart set is a real setting."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from csc.config import CSCConfig
from shared.config import config_reference
from shared.tokens import SIGNING_KEY_FILE
from tests.deploy.tools import CHART, DEPLOY, SECRETS, by_kind, objects, render, run, tool

COMPOSE = DEPLOY / "compose.yaml"
HAPROXY = DEPLOY / "haproxy.cfg"
NODES = ["csc1", "csc2", "csc3"]
KNOWN = {d.env for d in config_reference(CSCConfig, "CSC_")}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return doc


def test_haproxy_accepts_its_configuration() -> None:
    done = run([tool("haproxy"), "-c", "-f", str(HAPROXY)])
    assert done.returncode == 0, done.explain()
    # the node names resolve only inside compose's network
    warnings = [line for line in done.stderr.splitlines() if "[WARNING]" in line]
    assert all("could not resolve address 'csc" in w for w in warnings), done.explain()


def test_haproxy_keeps_websockets_and_checks_readiness() -> None:
    cfg = HAPROXY.read_text(encoding="utf-8")
    assert "timeout tunnel 1h" in cfg
    assert cfg.count("option httpchk GET /readyz") == 2
    for node in NODES:
        assert f"server {node} {node}:8080" in cfg
        assert f"server {node} {node}:8081 check port 8080" in cfg


def test_three_nodes_share_redis_postgres_and_keys(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "postgres", "haproxy", "keys", *NODES} <= set(services)
    envs = [services[n]["environment"] for n in NODES]
    for name in (
        "CSC_REDIS_URL",
        "CSC_DATABASE_URL",
        "CSC_SIGNING_KEY_FILE",
        "CSC_CLUSTER_KEY_FILE",
    ):
        assert len({e[name] for e in envs}) == 1, name
    assert [e["CSC_NODE_ID"] for e in envs] == NODES
    assert [e["CSC_PEER_ADVERTISE"] for e in envs] == [f"{n}:8083" for n in NODES]
    for n in NODES:
        node = services[n]
        assert node["read_only"] is True and node["cap_drop"] == ["ALL"]
        assert node["depends_on"]["redis"] == {"condition": "service_healthy"}
        assert node["depends_on"]["keys"] == {"condition": "service_completed_successfully"}
        assert "ports" not in node  # only HAProxy publishes ports
        assert node["environment"]["CSC_METRICS_LISTEN"] == "0.0.0.0:9464"  # not on 8080
    assert all(p.startswith("127.0.0.1:") for p in services["haproxy"]["ports"])


def test_nodes_count_devices_by_the_address_haproxy_names(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """HAProxy names each device in a PROXY v2 header (its health checks send one too); the
    nodes take it from HAProxy's pinned address only, in the compose network's subnet, and
    keep the bounds per client address at their defaults."""
    cfg = HAPROXY.read_text(encoding="utf-8")
    (default_server,) = [line for line in cfg.splitlines() if line.startswith("    default-server")]
    assert {"send-proxy-v2", "check-send-proxy"} <= set(default_server.split())
    services = compose["services"]
    pinned = services["haproxy"]["networks"]["default"]["ipv4_address"]
    (subnet,) = [c["subnet"] for c in compose["networks"]["default"]["ipam"]["config"]]
    assert ipaddress.ip_address(pinned) in ipaddress.ip_network(subnet)
    for n in NODES:
        env = services[n]["environment"]
        assert env["CSC_PROXY_PROTOCOL"] == pinned
        assert "CSC_CLIENT_MAX_CONNECTIONS" not in env and "CSC_CLIENT_STREAM_SHARE" not in env
        config = CSCConfig(state_dir=tmp_path, proxy_protocol=[env["CSC_PROXY_PROTOCOL"]])
        assert config.proxy_protocol == [pinned]


def test_compose_sets_only_known_settings(compose: dict[str, Any]) -> None:
    for n in NODES:
        names = {k for k in compose["services"][n]["environment"] if k.startswith("CSC_")}
        assert names <= KNOWN, names - KNOWN


def test_chart_sets_only_known_settings() -> None:
    values = {"secrets": SECRETS, "extraEnv": {"LOG_LEVEL": "debug"}}
    (dep,) = by_kind(objects(render(CHART, values)), "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    names = {e["name"] for e in c["env"] if e["name"].startswith("CSC_")}
    assert names <= KNOWN, names - KNOWN


def test_nodes_read_the_key_files_the_keys_service_writes(compose: dict[str, Any]) -> None:
    script = compose["services"]["keys"]["command"][-1]
    compile(script, "compose keys", "exec")
    env = compose["services"]["csc1"]["environment"]
    assert env["CSC_SIGNING_KEY_FILE"] == f"/keys/{SIGNING_KEY_FILE}"
    assert env["CSC_CLUSTER_KEY_FILE"] == "/keys/cluster-key"
    assert 'keys / "cluster-key"' in script and "load_or_create_signing_key(keys)" in script
