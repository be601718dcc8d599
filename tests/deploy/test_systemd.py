"""deploy/systemd: ``systemd-analyze verify`` accepts each unit (and the cluster drop-in) without
a single warning, and each unit has the hardening and stop behaviour docs/deploy.md promises."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from csc.config import CSCConfig
from tests.deploy.tools import DEPLOY, run, tool

SYSTEMD = DEPLOY / "systemd"
UNITS = ["csc.service", "csc-agent.service", "csc-portal.service"]
DRAIN_TIMEOUT = CSCConfig().drain_timeout


def install(unit: str, root: Path) -> Path:
    """The unit as an operator installs it, but with ExecStart pointing at this checkout's
    console scripts (verify checks that the program exists)."""
    bin_dir = str(Path(sys.executable).parent)
    path = root / unit
    path.write_text((SYSTEMD / unit).read_text().replace("/opt/csc/bin", bin_dir))
    if unit == "csc.service":
        (root / "csc.service.d").mkdir()
        (root / "csc.service.d" / "cluster.conf").write_text(
            (SYSTEMD / "csc-cluster.conf").read_text()
        )
    return path


def settings(unit: str) -> dict[str, list[str]]:
    """Every ``Key=value`` line of ``unit``, values of a repeated key in order."""
    out: dict[str, list[str]] = {}
    for line in (SYSTEMD / unit).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    path = install(unit, tmp_path)
    done = run([tool("systemd-analyze"), "verify", "--man=no", str(path)], cwd=tmp_path)
    assert done.returncode == 0 and done.stderr.strip() == "", done.explain()


@pytest.mark.parametrize("unit", UNITS)
def test_unit_is_hardened_and_outlasts_the_drain(unit: str) -> None:
    s = settings(unit)
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
    }.items():
        assert s[key] == [value], key
    assert s["User"] == [unit.removesuffix(".service")]
    assert s["StateDirectory"] == [unit.removesuffix(".service")]
    assert s["CapabilityBoundingSet"] == [""]
    assert int(s["TimeoutStopSec"][0]) > DRAIN_TIMEOUT


def test_agent_token_is_a_credential() -> None:
    s = settings("csc-agent.service")
    assert s["LoadCredential"] == ["token:/etc/csc-agent/token"]
    assert "CSC_AGENT_TOKEN_FILE=%d/token" in s["Environment"]
    assert not any(e.startswith("CSC_AGENT_TOKEN=") for e in s["Environment"])
