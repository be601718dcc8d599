"""The cluster rows of the benchmark: a request forwarded B→A next to the same request local
on A, in one run (``bench/run.py`` calls :func:`measure_cluster`; see bench/README.md).

Starts a ``redis-server`` and a PostgreSQL with the helpers the tests use
(:mod:`harness.redis`, :mod:`harness.postgres`), two ``csc serve`` nodes A and B of
one cluster (:class:`harness.cluster.ClusterProcs`), the test upstream and an agent with
one session on A. *Local* is ``/t/{alias}/small`` through A (A → agent), *forwarded* the same
through B (B → peer link → A → agent). Both paths are checked to serve ``/small`` byte for byte
before anything is timed, and B is checked to hold no session of its own (so its requests are
forwarded). Every process is stopped by PID when the block ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.datapath import require_own_build
from harness.cluster import ClusterProcs
from harness.factory import ProcFactory
from harness.postgres import running_postgres
from harness.procs import CscProc, Proc, UpstreamProc, start_upstream
from harness.redis import running
from harness.upstream import SMALL_BODY
from harness.waiting import http_request, tunnel_url, wait_alias_online

_REPO_ROOT = Path(__file__).resolve().parents[1]

#: (concurrency, target on the rate ratio, target on the p50 added by the hop, in ms)
CLUSTER_ROWS = ((1, None, 0.3), (32, 0.70, None))


@dataclass
class ClusterRig:
    upstream: UpstreamProc
    a: CscProc
    b: CscProc
    agent: Proc
    alias: str

    def local(self, path: str) -> str:
        return tunnel_url(self.a.http_url, self.alias, path)

    def forwarded(self, path: str) -> str:
        return tunnel_url(self.b.http_url, self.alias, path)


@contextlib.contextmanager
def cluster_rig(
    args: argparse.Namespace, log: Callable[[str], None], env: dict[str, str]
) -> Iterator[ClusterRig]:
    """Redis, PostgreSQL, upstream, nodes A and B, an agent on A; all stopped on exit."""
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="csc-bench-c-")))
        log("starting redis-server and PostgreSQL")
        redis = stack.enter_context(running("single", workdir / "redis"))
        postgres = stack.enter_context(running_postgres())
        factory = ProcFactory(workdir)
        stack.callback(factory.stop_all)
        try:
            upstream = factory.track(start_upstream(workdir, tcp_echo=False))
            cluster = ClusterProcs(factory, redis.url, postgres.url(postgres.create_database()))
            log("starting csc serve nodes A and B")
            a = cluster.start_node("A", env=env)
            b = cluster.start_node("B", env=env)
            token = cluster.token("bench", [args.alias])
            log("starting the agent on A (1 session)")
            agent = factory.agent(
                a.http_url,
                token,
                upstream.http_url,
                sessions=1,
                extra_args=args.agent_arg,
                env=dict(pair.split("=", 1) for pair in args.agent_env),
            )
            wait_alias_online(a.http_url, args.alias)
            wait_alias_online(b.http_url, args.alias)
            for name, proc in (("node A", a), ("node B", b), ("the agent", agent)):
                require_own_build(name, proc.pid, _REPO_ROOT)
            yield ClusterRig(upstream, a, b, agent, args.alias)
        except BaseException:
            factory.dump_logs()
            raise


def _sessions(node: CscProc, admin_token: str) -> int:
    status, _, body = http_request(
        f"{node.admin_url}/v1/admin/node", headers={"Authorization": f"Bearer {admin_token}"}
    )
    if status != 200:
        raise RuntimeError(f"GET /v1/admin/node on {node.name} answered {status}")
    return int(json.loads(body)["sessions"])


def check_paths(rig: ClusterRig) -> None:
    for url in (rig.local("/small"), rig.forwarded("/small")):
        status, _, body = http_request(url)
        if status != 200 or body != SMALL_BODY:
            raise RuntimeError(f"{url} answered {status} with {len(body)} bytes")


def measure_cluster(
    args: argparse.Namespace,
    log: Callable[[str], None],
    env: dict[str, str],
    run_wrk: Callable[..., Any],
    make_rows: Callable[[str, Any, Any], list[Any]],
    target: Callable[..., Any],
) -> tuple[list[Any], list[str]]:
    """The forwarded-vs-local rows (``make_rows(label, local, forwarded)``) and notes."""
    rows: list[Any] = []
    notes: list[str] = []
    with cluster_rig(args, log, env) as rig:
        check_paths(rig)
        admin = next(
            p.read_text().strip()
            for p in (rig.a.state_dir / "admin-token", rig.b.state_dir / "admin-token")
            if p.exists()
        )
        if _sessions(rig.b, admin) != 0 or _sessions(rig.a, admin) != 1:
            raise RuntimeError("the agent's session is not on A alone")
        log("warming up the cluster paths")
        for url in (rig.local("/small"), rig.forwarded("/small")):
            run_wrk(url, 32, 1)
        for concurrency, rate_min, added_max in CLUSTER_ROWS:
            label = f"1 KiB keep-alive, c={concurrency}"
            log(f"cluster: {label} ({args.duration}s per side)")
            local = run_wrk(rig.local("/small"), concurrency, args.duration)
            forwarded = run_wrk(rig.forwarded("/small"), concurrency, args.duration)
            for side, result in (("local", local), ("forwarded", forwarded)):
                if result.errors or result.non_2xx:
                    notes.append(
                        f"cluster {label}, {side}: {result.errors} socket errors, "
                        f"{result.non_2xx} non-2xx of {result.requests}"
                    )
            more = make_rows(label, local, forwarded)
            if rate_min is not None:
                more[0].target = target(f"≥ {rate_min:.2f}", ratio_min=rate_min)
            if added_max is not None:
                more[1].target = target(f"+ ≤ {added_max} ms", added_max=added_max)
            rows += more
    return rows, notes
