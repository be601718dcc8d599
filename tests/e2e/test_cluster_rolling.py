"""A rolling restart of a three-node cluster behind HAProxy loses nothing.

Nodes A, B and C (real ``csc serve`` processes sharing one Redis and one PostgreSQL) sit behind
a real HAProxy (round robin, health checks on ``/readyz``); two agents (two sessions each)
dial the CSC through HAProxy; four loops send small requests through HAProxy on keep-alive
connections, and one long, paced download runs through HAProxy. Each node in turn gets
SIGTERM, must exit 0, is started again under the same name (new ports: HAProxy's slot is
re-pointed through its runtime API), and the next one follows once HAProxy sees it UP and the
agents hold sessions on two distinct live nodes again.

Where the download runs, and why the restart order is chosen: the download's bytes pass
through the node its client connection reached and, if that node has no session of the agent,
through the node whose agent session carries the stream. A draining node waits for its streams
only up to ``drain_timeout``, so a download can only survive the drain of a node it runs
through if that timeout covers what is left of it. The test therefore pins the download to
one node N holding a session of the agent (the other HAProxy servers are set to ``drain``
state while the request is dispatched, so N is the only choice; the stream is then local to N,
no second node involved), restarts the other two nodes first while the download runs, and
SIGTERMs N last. The download's client sets its pace: it reads :data:`SLOW_PACE` bytes per
second (flow control holds the rest back, end to end) until N is draining, so the download is
still in flight then however long the first two restarts took on a busy machine; then it reads
the rest at full speed, which N's ``drain_timeout`` (:data:`FIRST_DRAIN`) covers many times
over, and N must let the stream finish before it exits. Restarted nodes run with a short drain
timeout.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.support.cluster import ClusterProcs, admin_sessions
from tests.support.haproxy import HTTP_BACKEND, HaproxyProc
from tests.support.procs import (
    CscProc,
    ProcFactory,
    UpstreamProc,
    http_request,
    resolve_url,
    scaled,
    tunnel_url,
    wait_alias_online,
    wait_until,
)
from tests.support.redis import RedisTopology
from tests.support.upstream import expected_sha256

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
TENANTS = {"acme": "acme@example.com", "beta": "beta@example.com"}
DOWNLOAD_TENANT = "acme"
DOWNLOAD_BYTES = 160 * MiB
#: the client's pace until N drains (bytes per second): 320 s for the whole download, several
#: times what the first two restarts may take; at full speed the rest takes about a second
SLOW_PACE = MiB // 2
PIECE = 64 * 1024
FIRST_DRAIN = scaled(12)  # the first nodes' drain_timeout: covers the download's full-speed rest
RESTARTED_DRAIN = "4s"
SMALL_LOOPS = 4
NODES = ("A", "B", "C")


@dataclass
class Failure:
    at: float
    what: str


@dataclass
class SmallLoad:
    """Loops of ``GET /t/{alias}/small`` through HAProxy on keep-alive connections."""

    address: tuple[str, int]
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ok: int = 0
    failures: list[Failure] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, loops: int) -> None:
        aliases = list(TENANTS.values())
        for i in range(loops):
            path = tunnel_url("", aliases[i % len(aliases)], "/small")
            thread = threading.Thread(target=self._loop, args=(path,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(*self.address, timeout=scaled(20))

    def _loop(self, path: str) -> None:
        conn = self._connect()
        while not self.stop.is_set():
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                self._fail(f"{path}: {exc!r}")
                conn.close()
                conn = self._connect()
                continue
            if resp.status == 200 and len(body) == 1024:
                with self.lock:
                    self.ok += 1
            else:
                self._fail(f"{path}: HTTP {resp.status} {body[:300]!r}")
            if resp.will_close:
                conn.close()
                conn = self._connect()
        conn.close()

    def _fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(Failure(time.monotonic(), what))

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(scaled(30))


@dataclass
class Download:
    """One download through HAProxy, hashed as it arrives, read at :data:`SLOW_PACE` until
    ``released``, then as fast as it comes."""

    address: tuple[str, int]
    path: str
    status: int | None = None
    received: int = 0
    digest: str = ""
    error: str = ""
    headers_seen: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        digest = hashlib.sha256()
        try:
            conn = http.client.HTTPConnection(*self.address, timeout=scaled(30))
            conn.request("GET", self.path)
            resp = conn.getresponse()
            self.status = resp.status
            self.headers_seen.set()
            started = time.monotonic()
            while True:
                if not self.released.is_set():
                    due = started + self.received / SLOW_PACE - time.monotonic()
                    if due > 0:
                        self.released.wait(due)
                chunk = resp.read(MiB if self.released.is_set() else PIECE)
                if not chunk:
                    break
                digest.update(chunk)
                self.received += len(chunk)
            conn.close()
        except (OSError, http.client.HTTPException) as exc:
            self.error = repr(exc)
        finally:
            self.digest = digest.hexdigest()
            self.headers_seen.set()
            self.done.set()


def describe_failures(failures: list[Failure]) -> str:
    """Failures grouped by kind (request ids left out), with the first and last time."""
    kinds: dict[str, list[float]] = {}
    for failure in failures:
        kind = re.sub(r'"request_id": "[0-9a-f]+"', "", failure.what)
        kinds.setdefault(kind, []).append(failure.at)
    return "\n".join(
        f"{len(times)} x [{min(times):.3f} .. {max(times):.3f}] {kind}"
        for kind, times in kinds.items()
    )


def spread_sessions(node: CscProc, token: str, live: set[str]) -> dict[str, list[dict[str, Any]]]:
    """Each tenant's active sessions (as ``node`` sees the cluster) when every tenant has two,
    on two distinct nodes of ``live``; else an empty dict."""
    by_tenant: dict[str, list[dict[str, Any]]] = {t: [] for t in TENANTS}
    for view in admin_sessions(node, token):
        if view.get("state") == "active" and view.get("tenant") in by_tenant:
            by_tenant[view["tenant"]].append(view)
    for views in by_tenant.values():
        nodes = {v["node"] for v in views}
        if len(views) != 2 or len(nodes) != 2 or not nodes <= live:
            return {}
    return by_tenant


def wait_spread(node: CscProc, token: str, live: set[str]) -> dict[str, list[dict[str, Any]]]:
    return wait_until(
        lambda: spread_sessions(node, token, live),
        30,
        0.1,
        message="every agent holds two active sessions on distinct live nodes",
    )


def slot_addresses(cluster: ClusterProcs) -> list[str]:
    return [cluster.nodes[name].ready["http"] for name in NODES]


def restart(
    cluster: ClusterProcs,
    lb: HaproxyProc,
    name: str,
    load: SmallLoad,
    *,
    drain_timeout: float,
    draining: Callable[[], None] = lambda: None,
) -> CscProc:
    """SIGTERM node ``name``, call ``draining`` once HAProxy sees it DOWN (its ``/readyz``
    fails: it drains), check it exits 0, start it again, re-point its HAProxy slot and wait
    until HAProxy sees it UP; at least one small request must succeed meanwhile."""
    old = cluster.nodes[name]
    ok_before = load.ok
    old.terminate()
    lb.wait_backend_state(old.ready["http"], "DOWN", timeout=10)
    draining()
    code = old.wait(drain_timeout + 15)
    assert code == 0, f"node {name} exited with {code}\n{old.describe()}"
    new = cluster.start_node(name, env={"CSC_DRAIN_TIMEOUT": RESTARTED_DRAIN})
    lb.set_backends(slot_addresses(cluster))
    lb.wait_backend_state(new.ready["http"], "UP", timeout=15)
    wait_until(lambda: load.ok > ok_before, 30, message=f"small requests during {name}'s restart")
    return new


def test_rolling_restart_behind_haproxy_loses_no_request(
    procs: ProcFactory,
    upstream_proc: UpstreamProc,
    redis_single: RedisTopology,
    postgres_url: str,
    haproxy: Callable[..., HaproxyProc],
) -> None:
    cluster = ClusterProcs(procs, redis_single.url, postgres_url)
    for name in NODES:
        cluster.start_node(name, env={"CSC_DRAIN_TIMEOUT": f"{FIRST_DRAIN:g}s"})
    lb = haproxy(slot_addresses(cluster))
    for name in NODES:
        lb.wait_backend_state(cluster.nodes[name].ready["http"], "UP")
    admin = cluster.admin_token
    for tenant, alias in TENANTS.items():
        token = cluster.token(tenant, alias)
        procs.agent(
            lb.http_url,
            token,
            upstream_proc.http_url,
            sessions=2,
            env={"CSC_AGENT_BACKOFF_MAX": "1s"},
        )
    for alias in TENANTS.values():  # every node knows the tenants (created after it started)
        for name in NODES:
            wait_alias_online(cluster.nodes[name].http_url, alias)
    first = wait_spread(cluster.nodes["A"], admin, set(NODES))
    initial_ids = {v["id"] for views in first.values() for v in views}

    # Pin the download to a node N with a session of its agent: the stream stays local to N.
    pinned = first[DOWNLOAD_TENANT][0]["node"]
    slots = {name: f"{HTTP_BACKEND}/n{i}" for i, name in enumerate(NODES)}
    for name in NODES:
        if name != pinned:
            lb.command(f"set server {slots[name]} state drain")
    alias = TENANTS[DOWNLOAD_TENANT]
    path = tunnel_url("", alias, f"/bytes/{DOWNLOAD_BYTES}")
    download = Download(lb.http_address, path)
    download.start()
    assert download.headers_seen.wait(scaled(20)), "the download got no response head"
    assert download.status == 200, (download.status, download.error)
    for name in NODES:
        if name != pinned:
            lb.command(f"set server {slots[name]} state ready")
            lb.wait_backend_state(cluster.nodes[name].ready["http"], "UP")

    load = SmallLoad(lb.http_address)
    load.start(SMALL_LOOPS)
    try:
        wait_until(lambda: load.ok >= 20, 30, message="the small load running")
        order = [n for n in NODES if n != pinned] + [pinned]
        live = set(NODES)
        for name in order:
            last = name == pinned
            if last:
                assert not download.done.is_set(), (
                    "the download ended before its node's drain "
                    f"(received {download.received} bytes, error {download.error!r})"
                )
            restart(
                cluster,
                lb,
                name,
                load,
                drain_timeout=FIRST_DRAIN,
                draining=download.released.set if last else lambda: None,
            )
            if last:
                assert download.done.wait(scaled(10)), "node N exited before its download ended"
            wait_spread(cluster.nodes[name], admin, live)
    finally:
        load.finish()

    assert download.done.wait(scaled(60))
    assert not download.error, download.error
    assert download.received == DOWNLOAD_BYTES
    assert download.digest == expected_sha256(DOWNLOAD_BYTES)
    assert not load.failures, (
        f"{len(load.failures)} of {load.ok + len(load.failures)} small requests failed:\n"
        + describe_failures(load.failures)
    )
    # Every agent re-registered: new sessions only, on live nodes; each alias resolves
    # through every node.
    final = wait_spread(cluster.nodes[NODES[0]], admin, set(NODES))
    final_ids = {v["id"] for views in final.values() for v in views}
    assert not final_ids & initial_ids
    for name in NODES:
        for alias in TENANTS.values():
            status, _, body = http_request(resolve_url(cluster.nodes[name].http_url, alias))
            assert status == 200, (name, alias, body[:300])
