"""helm/csc rendered and linted by the real Helm engine (helm-python-sdk, offline), and the
rendered objects checked against what a CSC cluster needs (docs/deploy.md)."""

from __future__ import annotations

import copy
from typing import Any

import helm_python as helm
import pytest

from tests.deploy.tools import CHART, SECRETS, by_kind, objects, render

DEFAULTS: dict[str, Any] = {"secrets": SECRETS}


def values(**extra: Any) -> dict[str, Any]:
    v = copy.deepcopy(DEFAULTS)
    v.update(extra)
    return v


@pytest.fixture(scope="module")
def objs() -> list[dict[str, Any]]:
    return objects(render(CHART, values()))


def deployment(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (dep,) = by_kind(objs, "Deployment")
    return dep


def container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = deployment(objs)["spec"]["template"]["spec"]["containers"]
    spec: dict[str, Any] = c
    return spec


def env(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(objs)["env"]}


def test_lint_is_clean_in_strict_mode() -> None:
    report = helm.lint(CHART, values(), strict=True, kube_version="v1.29.0")
    assert report["errors"] == [] and report["messages"] == [], report


def test_the_objects_a_cluster_needs(objs: list[dict[str, Any]]) -> None:
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == [
        "Deployment",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "Service",
        "ServiceAccount",
    ]
    assert all(o["metadata"]["namespace"] == "csc" for o in objs)


def test_deployment_rolls_one_node_at_a_time_without_losing_capacity(
    objs: list[dict[str, Any]],
) -> None:
    spec = deployment(objs)["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }


def test_probes_use_readyz_and_healthz(objs: list[dict[str, Any]]) -> None:
    c = container(objs)
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_probes_are_tunable() -> None:
    v = values(probes={"readiness": {"periodSeconds": 1, "failureThreshold": 7}})
    c = container(objects(render(CHART, v)))
    assert c["readinessProbe"]["periodSeconds"] == 1
    assert c["readinessProbe"]["failureThreshold"] == 7


@pytest.mark.parametrize(("drain", "pre_stop"), [(30, 5), (120, 10), (5, 0)])
def test_grace_period_outlasts_prestop_plus_drain(drain: int, pre_stop: int) -> None:
    objs = objects(render(CHART, values(drainTimeoutSeconds=drain, preStopSeconds=pre_stop)))
    pod = deployment(objs)["spec"]["template"]["spec"]
    c = container(objs)
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(pre_stop)]
    assert env(objs)["CSC_DRAIN_TIMEOUT"] == f"{drain}s"
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain


def test_a_grace_period_too_short_for_the_drain_is_refused() -> None:
    with pytest.raises(helm.HelmRenderError, match="must exceed"):
        render(CHART, values(drainTimeoutSeconds=60, terminationGracePeriodSeconds=60))


def test_pdb_keeps_all_but_one_node(objs: list[dict[str, Any]]) -> None:
    (pdb,) = by_kind(objs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == deployment(objs)["spec"]["selector"]


def test_peer_service_is_headless_and_lists_unready_pods(objs: list[dict[str, Any]]) -> None:
    (peer,) = [s for s in by_kind(objs, "Service") if s["metadata"]["name"] == "csc-peer"]
    assert peer["spec"]["clusterIP"] == "None"
    assert peer["spec"]["publishNotReadyAddresses"] is True
    assert {p["name"]: p["targetPort"] for p in peer["spec"]["ports"]}["peer"] == "peer"


def test_nodes_advertise_their_pod_ip_and_name(objs: list[dict[str, Any]]) -> None:
    e = env(objs)
    assert e["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert e["CSC_PEER_ADVERTISE"] == "$(POD_IP):8083"
    assert e["CSC_PEER_LISTEN"] == "0.0.0.0:8083"
    assert e["CSC_NODE_ID"] == "$(POD_NAME)"
    assert e["CSC_LISTEN"] == "0.0.0.0:8080"
    # env references only work to variables defined before them
    names = [x["name"] for x in container(objs)["env"]]
    assert names.index("POD_IP") < names.index("CSC_PEER_ADVERTISE")


def test_peer_links_use_tls_unless_turned_off(objs: list[dict[str, Any]]) -> None:
    assert env(objs)["CSC_PEER_TLS"] == "true"
    assert env(objects(render(CHART, values(peerTls=False))))["CSC_PEER_TLS"] == "false"


def test_bounds_per_client_address_are_off_behind_a_proxy(objs: list[dict[str, Any]]) -> None:
    e = env(objs)
    assert (e["CSC_CLIENT_MAX_CONNECTIONS"], e["CSC_CLIENT_STREAM_SHARE"]) == ("off", "1")
    direct = env(objects(render(CHART, values(clientAddresses="direct"))))
    assert "CSC_CLIENT_MAX_CONNECTIONS" not in direct
    assert "CSC_CLIENT_STREAM_SHARE" not in direct
    assert "CSC_PROXY_PROTOCOL" not in e | direct


def test_behind_a_proxy_protocol_balancer_the_pods_read_the_devices_address() -> None:
    chosen = values(clientAddresses="proxy-protocol", proxyProtocolFrom=["10.0.0.0/16", "fd00::/8"])
    e = env(objects(render(CHART, chosen)))
    assert e["CSC_PROXY_PROTOCOL"] == "10.0.0.0/16,fd00::/8"
    assert "CSC_CLIENT_MAX_CONNECTIONS" not in e
    assert "CSC_CLIENT_STREAM_SHARE" not in e


def test_public_service_has_http_and_tcp_only(objs: list[dict[str, Any]]) -> None:
    (svc,) = [s for s in by_kind(objs, "Service") if s["metadata"]["name"] == "csc"]
    assert [(p["name"], p["targetPort"]) for p in svc["spec"]["ports"]] == [
        ("http", "http"),
        ("tcp", "tcp"),
    ]


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"adminBind": "0.0.0.0", "service": {"type": "LoadBalancer"}},
        {"serviceMonitor": {"enabled": True}, "tcpIngress": False},
    ],
)
def test_no_service_exposes_the_admin_listener(extra: dict[str, Any]) -> None:
    objs = objects(render(CHART, values(**extra)))
    c = container(objs)
    assert env(objs)["CSC_ADMIN_LISTEN"].endswith(":8082")
    assert "admin" not in {p["name"] for p in c["ports"]}
    for svc in by_kind(objs, "Service"):
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] not in ("admin", 8082), svc["metadata"]["name"]


def test_admin_listener_is_loopback_by_default(objs: list[dict[str, Any]]) -> None:
    assert env(objs)["CSC_ADMIN_LISTEN"] == "127.0.0.1:8082"


def test_metrics_have_their_own_listener_and_no_public_service_port(
    objs: list[dict[str, Any]],
) -> None:
    assert env(objs)["CSC_METRICS_LISTEN"] == "0.0.0.0:9464"
    ports = {p["name"]: p["containerPort"] for p in container(objs)["ports"]}
    assert ports["metrics"] == 9464
    (public,) = [s for s in by_kind(objs, "Service") if s["metadata"]["name"] == "csc"]
    assert {p["targetPort"] for p in public["spec"]["ports"]} <= {"http", "tcp"}
    (peer,) = [s for s in by_kind(objs, "Service") if s["metadata"]["name"] == "csc-peer"]
    assert {"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP"} in peer[
        "spec"
    ]["ports"]
    inside = objects(render(CHART, values(metrics={"bind": "127.0.0.1"})))
    assert env(inside)["CSC_METRICS_LISTEN"] == "127.0.0.1:9464"


def test_network_policy_lets_only_csc_pods_reach_the_peer_port(objs: list[dict[str, Any]]) -> None:
    (pol,) = by_kind(objs, "NetworkPolicy")
    selector = deployment(objs)["spec"]["selector"]["matchLabels"]
    assert pol["spec"]["podSelector"]["matchLabels"] == selector
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    rules = pol["spec"]["ingress"]
    peer_rules = [r for r in rules if any(p["port"] == "peer" for p in r["ports"])]
    assert peer_rules == [
        {
            "ports": [{"port": "peer", "protocol": "TCP"}],
            "from": [{"podSelector": {"matchLabels": selector}}],
        }
    ]
    opened = {p["port"] for r in rules for p in r["ports"]}
    assert opened == {"http", "tcp", "metrics", "peer"}  # nothing for the admin port
    scrapers = [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]
    policy = {"enabled": True, "ingressFrom": [], "metricsFrom": scrapers}
    limited = objects(render(CHART, values(networkPolicy=policy)))
    (pol,) = by_kind(limited, "NetworkPolicy")
    (rule,) = [r for r in pol["spec"]["ingress"] if r["ports"][0]["port"] == "metrics"]
    assert rule["from"] == scrapers


def test_pod_runs_as_non_root_on_a_read_only_root(objs: list[dict[str, Any]]) -> None:
    pod = deployment(objs)["spec"]["template"]["spec"]
    c = container(objs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] >= 10000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/var/lib/csc", "/tmp"} <= mounts


def test_service_links_are_off(objs: list[dict[str, Any]]) -> None:
    assert deployment(objs)["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_secrets_come_from_a_created_secret(objs: list[dict[str, Any]]) -> None:
    (secret,) = by_kind(objs, "Secret")
    assert sorted(secret["data"]) == ["cluster-key", "database-url", "redis-url", "signing-key.pem"]
    e = env(objs)
    assert e["CSC_REDIS_URL"] == {"secretKeyRef": {"name": "csc-secrets", "key": "redis-url"}}
    assert e["CSC_DATABASE_URL"] == {"secretKeyRef": {"name": "csc-secrets", "key": "database-url"}}
    assert e["CSC_CLUSTER_KEY_FILE"] == "/etc/csc/cluster-key/cluster-key"
    assert e["CSC_SIGNING_KEY_FILE"] == "/etc/csc/signing-key/signing-key.pem"
    # no secret value appears in the pod spec itself
    text = str(deployment(objs))
    assert all(s["value"] not in text for s in SECRETS.values())


def test_existing_secrets_are_used_by_name() -> None:
    existing = {
        "signingKey": {"existingSecret": "csc-signing", "key": "key.pem"},
        "clusterKey": {"existingSecret": "csc-cluster"},
        "databaseUrl": {"existingSecret": "pg-app", "key": "uri"},
        "redisUrl": {"existingSecret": "redis-app", "key": "url"},
    }
    objs = objects(render(CHART, values(secrets=existing)))
    assert by_kind(objs, "Secret") == []
    e = env(objs)
    assert e["CSC_DATABASE_URL"] == {"secretKeyRef": {"name": "pg-app", "key": "uri"}}
    assert e["CSC_REDIS_URL"] == {"secretKeyRef": {"name": "redis-app", "key": "url"}}
    assert e["CSC_SIGNING_KEY_FILE"] == "/etc/csc/signing-key/key.pem"
    volumes = {v["name"]: v for v in deployment(objs)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["signing-key"]["secret"]["secretName"] == "csc-signing"
    assert volumes["cluster-key"]["secret"]["secretName"] == "csc-cluster"


def test_a_missing_secret_is_refused_by_name() -> None:
    v = values()
    v["secrets"]["redisUrl"] = {"value": ""}
    with pytest.raises(helm.HelmRenderError, match=r"secrets\.redisUrl"):
        render(CHART, v)


def test_servicemonitor_only_when_enabled(objs: list[dict[str, Any]]) -> None:
    assert by_kind(objs, "ServiceMonitor") == []
    on = objects(render(CHART, values(serviceMonitor={"enabled": True, "job": "csc"})))
    (sm,) = by_kind(on, "ServiceMonitor")
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert {"action": "replace", "targetLabel": "job", "replacement": "csc"} in endpoint[
        "relabelings"
    ]
    (peer,) = [s for s in by_kind(on, "Service") if s["metadata"]["name"] == "csc-peer"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= peer["metadata"]["labels"].items()
    metrics = {p["name"]: p["targetPort"] for p in peer["spec"]["ports"]}["metrics"]
    assert metrics == "metrics"  # the metrics listener (metrics_listen), not the public one


def test_resources_are_tunable() -> None:
    res = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "4", "memory": "4Gi"}}
    assert container(objects(render(CHART, values(resources=res))))["resources"] == res


def test_extra_settings_become_csc_variables() -> None:
    e = env(
        objects(render(CHART, values(extraEnv={"LOG_LEVEL": "debug", "MAX_BODY_SIZE": "2GiB"})))
    )
    assert e["CSC_LOG_LEVEL"] == "debug" and e["CSC_MAX_BODY_SIZE"] == "2GiB"


@pytest.mark.parametrize(
    ("bad", "complaint"),
    [
        ({"replicaCount": 0}, "replicaCount"),
        ({"replicaCount": "three"}, "replicaCount"),
        ({"drainTimeoutSeconds": -1}, "drainTimeoutSeconds"),
        ({"adminBind": "10.0.0.1"}, "adminBind"),
        ({"service": {"type": "ExternalName"}}, "type"),
        ({"ports": {"http": 70000, "tcp": 8081, "peer": 8083, "admin": 8082}}, "http"),
        ({"securityContext": {"readOnlyRootFilesystem": False}}, "readOnlyRootFilesystem"),
        ({"podSecurityContext": {"runAsNonRoot": False}}, "runAsNonRoot"),
        ({"extraEnv": {"LISTEN": "0.0.0.0:80"}}, "propertyName 'LISTEN'"),
        ({"extraEnv": {"log_level": "debug"}}, "propertyName 'log_level'"),
        ({"extraEnv": {"PEER_TLS": "false"}}, "propertyName 'PEER_TLS'"),
        ({"peerTls": "no"}, "peerTls"),
        ({"clientAddresses": "nat"}, "clientAddresses"),
        ({"clientAddresses": "proxy-protocol"}, "proxyProtocolFrom"),
        ({"clientAddresses": "proxy-protocol", "proxyProtocolFrom": []}, "proxyProtocolFrom"),
        ({"proxyProtocolFrom": ["balancer.example"]}, "proxyProtocolFrom"),
        ({"extraEnv": {"PROXY_PROTOCOL": "10.0.0.0/8"}}, "propertyName 'PROXY_PROTOCOL'"),
        ({"image": {"repository": "r", "digest": "latest"}}, "digest"),
        ({"serviceMonitor": {"enabled": "yes"}}, "enabled"),
        ({"replicas": 3}, "replicas"),
        ({"secrets": {**SECRETS, "clusterKey": {"value": "short"}}}, "clusterKey"),
        ({"secrets": {**SECRETS, "databaseUrl": {"value": "mysql://db"}}}, "databaseUrl"),
    ],
)
def test_schema_rejects_wrong_values(bad: dict[str, Any], complaint: str) -> None:
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError, match=complaint):
            chart.validate_schema(values(**bad))
        with pytest.raises(helm.HelmValuesError):
            chart.render(values(**bad), name="csc", namespace="csc")


def test_schema_accepts_the_defaults() -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values())
        assert chart.schema is not None
