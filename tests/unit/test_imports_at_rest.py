"""A lone node loads no cluster or PostgreSQL code: redis-py and psycopg cost about 20 MiB of
resident memory and are imported only when ``redis_url`` / ``database_url`` is set; nor aiohttp
(tests/integration/test_admin_lazy.py checks a running node at rest)."""

from __future__ import annotations

import subprocess
import sys

from tests.support.procs import REPO_ROOT

PROBE = """
import sys
import csc.cli, csc.server, csc.admin.api, csc.relay.routing, csc.admin.db, csc.store
from csc.cluster.attach import cluster_context
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("redis", "psycopg"))
print(",".join(heavy))
"""


def _loaded(probe: str) -> str:
    """What ``probe`` prints, run in a fresh interpreter: the unwanted modules it found."""
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip()


def test_a_lone_node_imports_neither_redis_nor_psycopg() -> None:
    loaded = _loaded(PROBE)
    assert loaded == "", loaded


SERVE_PROBE = """
import sys
import csc.cli, csc.server, csc.relay.gateway, csc.relay.routing, csc.admin.listener, csc.metrics
from csc.cluster.attach import cluster_context
heavy = sorted(
    m for m in sys.modules
    if m.split(".")[0] in ("aiohttp", "yarl", "multidict") or m in ("csc.admin.api", "csc.admin.console")
)
print(",".join(heavy))
"""


def test_serving_code_imports_neither_aiohttp_nor_the_admin_api() -> None:
    """aiohttp and the admin application (about 11 MiB) load at the admin listener's first
    connection (csc/admin/listener.py); the metrics listener does without them
    (shared/metrics_http.py)."""
    loaded = _loaded(SERVE_PROBE)
    assert loaded == "", loaded
