"""Rewrite README.md's configuration tables from the config classes (``make readme``).

Each table is found by its first data row's environment variable prefix; the block of ``|``
lines holding it is replaced by :func:`shared.config.reference_table`. ``tests/unit/
test_readme.py`` fails when the README and the code disagree; this script is the fix.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from shared.config import reference_table

README = Path(__file__).resolve().parents[1] / "README.md"
#: (module, class, environment prefix) of every documented configuration
TABLES = [
    ("csc.config", "CSCConfig", "CSC_"),
    ("tenant_agent.config", "AgentConfig", "CSC_AGENT_"),
    ("tenant_agent.proxy.config", "ProxyConfig", "CSC_AGENT_PROXY_"),
    ("portal.config", "PortalConfig", "CSC_PORTAL_"),
]


def tables() -> list[str]:
    """The expected tables of every configuration class that exists."""
    found = []
    for module, name, prefix in TABLES:
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        found.append(reference_table(cls, prefix))
    return found


def _replace(text: str, table: str) -> str:
    lines = text.split("\n")
    first_key = table.split("\n")[2].split("|")[1].strip()
    env = table.split("\n")[2].split("|")[2].strip()
    for i, line in enumerate(lines):
        cells = line.split("|")
        if len(cells) > 3 and cells[1].strip() == first_key and cells[2].strip() == env:
            start = i - 2
            end = i
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            return "\n".join([*lines[:start], table, *lines[end:]])
    raise SystemExit(f"README.md has no table starting with {first_key} / {env}; add one")


def main() -> int:
    text = README.read_text(encoding="utf-8")
    for table in tables():
        text = _replace(text, table)
    README.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
