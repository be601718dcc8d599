"""Static security scan: checkov over both charts (rendered offline) and the Dockerfile, and
hadolint over the Dockerfile. Every failed check must be explained and suppressed in place
(a ``checkov.io/skipN`` annotation or a ``# checkov:skip=`` comment with a reason)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.tools import (
    AGENT_CHART,
    AGENT_VALUES,
    CHART,
    DEPLOY,
    SECRETS,
    render,
    run,
    tool,
)

# checkov must not call home: --skip-download keeps it offline (no guidelines, no policies)
OFFLINE = ["--skip-download", "--output", "json"]


def checkov(args: list[str]) -> list[dict[str, Any]]:
    done = run([tool("checkov"), *args, *OFFLINE], timeout=120)
    assert done.returncode in (0, 1), done.explain()
    report = json.loads(done.stdout)
    return report if isinstance(report, list) else [report]


def failed(reports: list[dict[str, Any]]) -> list[str]:
    return [
        f"{c['check_id']} {c['check_name']} ({c['file_path']} {c['resource']})"
        for r in reports
        for c in r["results"]["failed_checks"]
    ]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both charts with everything switched on, one file per template."""
    out = tmp_path_factory.mktemp("rendered")
    csc = {"secrets": SECRETS, "serviceMonitor": {"enabled": True}}
    for chart, values in ((CHART, csc), (AGENT_CHART, AGENT_VALUES)):
        for path, text in render(chart, values).items():
            if path.endswith(".yaml") and text.strip():
                (out / path.replace("/", "__")).write_text(text, encoding="utf-8")
    return out


def test_checkov_passes_the_charts(rendered: Path) -> None:
    reports = checkov(["--directory", str(rendered), "--framework", "kubernetes"])
    assert failed(reports) == []
    summary = reports[0]["summary"]
    assert summary["parsing_errors"] == 0
    assert summary["resource_count"] >= 10
    assert summary["passed"] > 100


def test_every_suppressed_chart_check_says_why(rendered: Path) -> None:
    reports = checkov(["--directory", str(rendered), "--framework", "kubernetes"])
    skipped = [c for r in reports for c in r["results"]["skipped_checks"]]
    assert skipped, "expected the documented suppressions"
    for text in (p.read_text() for p in rendered.iterdir()):
        for line in text.splitlines():
            if "checkov.io/skip" in line:
                check, _, reason = line.split(":", 1)[1].strip().partition("=")
                assert check.startswith("CKV") and len(reason.split()) >= 5, line


def test_checkov_passes_the_dockerfile() -> None:
    reports = checkov(["--file", str(DEPLOY / "Dockerfile"), "--framework", "dockerfile"])
    assert failed(reports) == []
    assert reports[0]["summary"]["passed"] > 10


def test_hadolint_is_clean() -> None:
    done = run([tool("hadolint"), "--failure-threshold", "style", str(DEPLOY / "Dockerfile")])
    assert done.returncode == 0 and done.stdout == "", done.explain()
