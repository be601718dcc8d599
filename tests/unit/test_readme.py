"""README.md's configuration tables are generated from the config classes and must stay true."""

from __future__ import annotations

from pathlib import Path

from csc.config import CSCConfig
from portal.config import PortalConfig
from shared.config import reference_table
from tenant_agent.config import AgentConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_starts_with_the_two_commands() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    commands = [line.split("#")[0].strip() for line in lines[:6] if line.startswith("make ")]
    assert commands == ["make demo", "make test"]


def test_readme_config_tables_match_the_code() -> None:
    """If this fails, paste the printed table into README.md."""
    text = README.read_text(encoding="utf-8")
    for cls, prefix in (
        (CSCConfig, "CSC_"),
        (AgentConfig, "CSC_AGENT_"),
        (PortalConfig, "CSC_PORTAL_"),
    ):
        table = reference_table(cls, prefix)
        assert table in text, f"README.md is out of date; expected:\n{table}"
