"""helm/csc-agent, the tenant agent's chart, rendered and linted by the real Helm engine."""

from __future__ import annotations

import copy
from typing import Any

import helm_python as helm
import pytest

from tests.deploy.tools import AGENT_CHART, AGENT_VALUES, by_kind, objects, render


def values(**extra: Any) -> dict[str, Any]:
    v = copy.deepcopy(AGENT_VALUES)
    v.update(extra)
    return v


def pod(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (dep,) = by_kind(objs, "Deployment")
    spec: dict[str, Any] = dep["spec"]["template"]["spec"]
    return spec


def env(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = pod(objs)["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def test_lint_is_clean_in_strict_mode() -> None:
    report = helm.lint(AGENT_CHART, values(), strict=True, kube_version="v1.29.0")
    assert report["errors"] == [] and report["messages"] == [], report


def test_token_comes_from_a_secret_file() -> None:
    objs = objects(render(AGENT_CHART, values(), name="acme"))
    (secret,) = by_kind(objs, "Secret")
    assert list(secret["data"]) == ["token"]
    e = env(objs)
    assert e["CSC_AGENT_TOKEN_FILE"] == "/etc/csc-agent/token/token"
    assert "CSC_AGENT_TOKEN" not in e
    assert AGENT_VALUES["token"]["value"] not in str(pod(objs))
    volumes = {v["name"]: v for v in pod(objs)["volumes"]}
    assert volumes["token"]["secret"]["secretName"] == secret["metadata"]["name"]


def test_an_existing_token_secret_is_used_by_name() -> None:
    objs = objects(render(AGENT_CHART, values(token={"existingSecret": "acme-agent-token"})))
    assert by_kind(objs, "Secret") == []
    volumes = {v["name"]: v for v in pod(objs)["volumes"]}
    assert volumes["token"]["secret"]["secretName"] == "acme-agent-token"


def test_agent_pod_settings() -> None:
    objs = objects(render(AGENT_CHART, values(aliases=["acme@example.com", "*@acme.example"])))
    e = env(objs)
    assert e["CSC_AGENT_CSC"] == "wss://csc.example.com"
    assert e["CSC_AGENT_UPSTREAM"] == "http://portal.acme.svc:8000"
    assert e["CSC_AGENT_ALIASES"] == "acme@example.com,*@acme.example"
    p = pod(objs)
    assert p["enableServiceLinks"] is False
    assert p["terminationGracePeriodSeconds"] > 30
    (c,) = p["containers"]
    assert c["args"] == ["csc-agent"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert p["securityContext"]["runAsNonRoot"] is True
    assert by_kind(objs, "Service") == []  # the agent only dials out


@pytest.mark.parametrize(
    "bad",
    [
        {"csc": "ftp://csc.example.com"},
        {"sessions": 17},
        {"token": {"value": "not a jwt"}},
        {"extraEnv": {"TOKEN": "x"}},
    ],
)
def test_schema_rejects_wrong_values(bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render(AGENT_CHART, values(**bad))


def test_csc_and_upstream_are_required() -> None:
    with pytest.raises(helm.HelmRenderError, match="csc"):
        render(AGENT_CHART, {"upstream": "http://p:8000", "token": {"value": "a.b.c"}})
