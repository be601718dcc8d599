"""deploy/prometheus and deploy/grafana: promtool checks and unit-tests the alert rules, every
alert has a unit test and a runbook in docs/operations.md, every PromQL expression parses, and
every metric they read is documented in docs/metrics.md."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.errors import ERRORS
from tests.deploy.tools import (
    DEPLOY,
    OPERATIONS_DOC,
    documented_metrics,
    promql_metrics,
    run,
    tool,
)

RULES = DEPLOY / "prometheus" / "csc-alerts.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "csc-alerts.test.yaml"
DASHBOARD = DEPLOY / "grafana" / "csc-overview.json"

#: 5xx outcomes left to their own alert (portal_offline), set on purpose (tenant_suspended), or
#: never a request's outcome (cluster_unavailable refuses agent sessions; the Redis alert covers it).
#: node_full is never a request's outcome: its connection is refused before any request is read
#: (csc_connections_refused_total, CSCConnectionsRefused)
NOT_5XX_ALERTS = {"portal_offline", "tenant_suspended", "cluster_unavailable", "node_full"}


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for g in groups for rule in g["rules"]]


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def test_promtool_checks_the_rules() -> None:
    done = run([tool("promtool"), "check", "rules", str(RULES)])
    assert done.returncode == 0, done.explain()
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout


def test_promtool_unit_tests_pass() -> None:
    done = run([tool("promtool"), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent)
    assert done.returncode == 0, done.explain()
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
    seen: dict[str, list[bool]] = {}
    for case in cases:
        for check in case["alert_rule_test"]:
            seen.setdefault(check["alertname"], []).append(bool(check["exp_alerts"]))
    for rule in alerts():
        assert sorted(set(seen.get(rule["alert"], []))) == [False, True], rule["alert"]


def test_the_alerts_the_issue_asks_for() -> None:
    assert [r["alert"] for r in alerts()] == [
        "CSCNodeDown",
        "CSCAgentsFlapping",
        "CSCPortalOffline",
        "CSCAgentTokenExpiring",
        "CSCHigh5xxRate",
        "CSCRedisErrors",
        "CSCDrainStuck",
        "CSCRevocationBacklog",
        "CSCConnectionsNearMax",
        "CSCConnectionsRefused",
        "CSCWindowGrowthNearMax",
        "CSCClientsShed",
    ]


def test_every_alert_has_a_runbook_in_operations_md() -> None:
    headings = re.findall(r"^#+ (.+)$", OPERATIONS_DOC.read_text(encoding="utf-8"), flags=re.M)
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}
    for rule in alerts():
        path, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert path == "docs/operations.md"
        assert anchor in anchors, f"{rule['alert']}: no heading for #{anchor} in operations.md"


def test_5xx_alert_counts_every_5xx_outcome() -> None:
    (rule,) = [r for r in alerts() if r["alert"] == "CSCHigh5xxRate"]
    (pattern,) = re.findall(r'outcome=~"([^"]+)"', rule["expr"])
    five_xx = {code for code, spec in ERRORS.items() if spec.http_status >= 500}
    assert set(pattern.split("|")) == five_xx - NOT_5XX_ALERTS


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses each dashboard query (Grafana's interval variable made concrete)."""
    rules = [
        {"record": f"dashboard:query{i}", "expr": e.replace("$__rate_interval", "5m")}
        for i, e in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = run([tool("promtool"), "check", "rules", str(path)])
    assert done.returncode == 0, done.explain()


def test_dashboard_is_well_formed() -> None:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert board["uid"] and board["title"]
    for p in board["panels"]:
        assert set(p["gridPos"]) == {"x", "y", "w", "h"}
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert p["targets"]


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (tenant) (rate(csc_requests_total{outcome!="ok"}[5m]))', {"csc_requests_total"}),
        ("histogram_quantile(0.99, sum by (le) (rate(a_bucket[$__rate_interval])))", {"a_bucket"}),
        ('up{job="csc"} == 0 and on (instance) b > 1e3', {"up", "b"}),
    ],
)
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert promql_metrics(expr) == names


def test_every_metric_used_is_documented() -> None:
    documented = documented_metrics()
    exprs = [r["expr"] for r in alerts()] + dashboard_exprs()
    used = set().union(*(promql_metrics(e) for e in exprs))
    assert used, "no metric found: the extractor is broken"
    missing = used - documented
    assert missing == set(), f"used but not in docs/metrics.md: {sorted(missing)}"
