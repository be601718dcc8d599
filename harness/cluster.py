"""Several ``csc serve`` processes acting as one CSC, for end-to-end cluster tests.

:class:`ClusterProcs` starts nodes that share a Redis (any topology of
:mod:`harness.redis`), a PostgreSQL database (:mod:`harness.postgres`), a key prefix
and a cluster secret; each node has its own state directory and listens on free loopback ports
(HTTP, TCP ingress, admin, peer), read back from its ready file. Tokens are issued with
``csc token issue --database-url`` (the signing key lives in the database), and the admin
operator's token is read from the first node's state directory. Processes are tracked by the
test's :class:`~harness.procs.ProcFactory`, so they are stopped by PID at teardown.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.factory import ProcFactory
from harness.procs import CscProc, issue_token, start_csc
from harness.waiting import http_request

CLUSTER_KEY = "cluster-secret-for-tests-" + "x" * 16
_names = itertools.count(1)


@dataclass
class ClusterProcs:
    factory: ProcFactory
    redis_url: str
    database_url: str
    prefix: str = field(default_factory=lambda: "e2e" + os.urandom(4).hex())
    lease: str = "3s"
    nodes: dict[str, CscProc] = field(default_factory=dict)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment every node of this cluster runs with."""
        return {
            "CSC_REDIS_URL": self.redis_url,
            "CSC_DATABASE_URL": self.database_url,
            "CSC_CLUSTER_KEY": CLUSTER_KEY,
            "CSC_REDIS_PREFIX": self.prefix,
            "CSC_ROUTE_LEASE": self.lease,
            **(extra or {}),
        }

    def start_node(
        self, name: str | None = None, *, env: Mapping[str, str] | None = None, **flags: Any
    ) -> CscProc:
        """Start (or start again, same name and state directory) one node."""
        node_id = name or f"n{next(_names)}"
        tmp = self.factory.tmp_path
        proc = start_csc(
            tmp,
            state_dir=tmp / f"state-{node_id}",
            env=self.env(env),
            node_id=node_id,
            peer_listen="127.0.0.1:0",
            **flags,
        )
        self.factory.track(proc)
        self.nodes[node_id] = proc
        return proc

    def token(self, tenant: str, aliases: str | list[str], ttl: str = "1d") -> str:
        """An agent token issued against the shared database (any node accepts it)."""
        first = next(iter(self.nodes.values()))
        return issue_token(
            first.state_dir, tenant, aliases, ttl, env={"CSC_DATABASE_URL": self.database_url}
        )

    @property
    def admin_token(self) -> str:
        """The ``admin`` operator's token (written by whichever node created it)."""
        for proc in self.nodes.values():
            path = proc.state_dir / "admin-token"
            if path.exists():
                return path.read_text().strip()
        raise FileNotFoundError("no node wrote admin-token")

    def node_dir(self, name: str) -> Path:
        return self.nodes[name].state_dir


def admin_sessions(node: CscProc, token: str, tenant: str | None = None) -> list[dict[str, Any]]:
    """The agent sessions of the whole cluster (of ``tenant`` only, when given), as ``node``'s
    ``GET /v1/admin/sessions`` lists them with operator ``token``."""
    query = f"?tenant={tenant}" if tenant is not None else ""
    status, _, body = http_request(
        f"{node.admin_url}/v1/admin/sessions{query}",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert status == 200, body[:300]
    sessions: list[dict[str, Any]] = json.loads(body)["sessions"]
    return sessions
