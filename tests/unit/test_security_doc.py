"""docs/security.md stays true: every setting its limit tables name is a real setting."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from csc.config import CSCConfig
from csc.tenants import LIMIT_NAMES
from portal.config import PortalConfig
from tenant_agent.config import AgentConfig
from tenant_agent.proxy.config import ProxyConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"
#: bootloader flags and the like, named in the tables but not configuration keys
OTHER = {"--timeout"}


def _settings_column() -> list[str]:
    """The backquoted names in the last column of every ``limit | ... | setting`` table."""
    names: list[str] = []
    in_table = False
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|"):
            in_table = False
        elif cells[0] == "limit" and cells[-1] == "setting":
            in_table = True
        elif in_table and not line.startswith("|---"):
            names += re.findall(r"`([^`]+)`", cells[-1])
    return names


def test_every_setting_in_the_limit_tables_exists() -> None:
    known = set(LIMIT_NAMES) | OTHER
    for cls in (CSCConfig, AgentConfig, ProxyConfig, PortalConfig):
        known |= {f.name for f in dataclasses.fields(cls)}
    named = _settings_column()
    assert len(named) > 30
    assert sorted(set(named) - known) == []
