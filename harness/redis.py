"""Real Redis topologies for tests and the benchmark: a single server, a Sentinel set, a Cluster.

Every process is a real ``redis-server`` / ``redis-sentinel`` on 127.0.0.1 with ports asked from
the OS, its config and data in a temp dir, its log (stdout) in a file, and is signalled only by
its own PID (:class:`harness.procs.Proc`). Waiting is polling until a scaled deadline.

Each topology has ``url`` (a ``redis_url`` that :func:`csc.cluster.redisconn.connect_redis`
takes), ``nodes`` (the data nodes), ``kill_pubsub_clients()``, ``heal()`` (restart what a test
killed and wait until the topology is whole again) and ``stop()``. The Sentinel set has
``failover()``, the Cluster ``kill_master()``.

:func:`running` starts one for a block; the pytest fixtures over it are in
``tests/support/redis.py``.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from harness.procs import Proc, ProcError, scaled
from harness.waiting import wait_until

READY_TIMEOUT = 15.0
TOPOLOGY_TIMEOUT = 40.0
MASTER_NAME = "cscmaster"
CLUSTER_SLOTS = 16384


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisNode:
    """One ``redis-server`` or ``redis-sentinel`` process: its port, config file and log."""

    def __init__(self, name: str, workdir: Path, config: Sequence[str], *, sentinel: bool = False):
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = list(config)
        self.sentinel = sentinel
        self.port = 0
        self.proc: Proc | None = None
        self.procs: list[Proc] = []  # every process this node ran, for the logs

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.running

    def spawn(self, *extra: str) -> None:
        """Start the process (a new port the first time) without waiting; see :meth:`wait_ready`."""
        if self.running:
            raise ProcError(f"{self.name} is already running")
        if not self.port:
            self.port = free_port()
        conf = self.dir / ("sentinel.conf" if self.sentinel else "redis.conf")
        if not conf.exists():  # a restart keeps the file (sentinels rewrite theirs)
            lines = [
                "bind 127.0.0.1",
                f"port {self.port}",
                f"dir {self.dir}",
                'logfile ""',
                "daemonize no",
                *(
                    []
                    if self.sentinel
                    else ['save ""', "appendonly no", "repl-diskless-sync-delay 0"]
                ),
                *self.config,
            ]
            conf.write_text("\n".join(lines) + "\n")
        program = "redis-sentinel" if self.sentinel else "redis-server"
        self.proc = Proc.spawn(self.name, [program, str(conf), *extra], log_dir=self.dir)
        self.procs.append(self.proc)

    def wait_ready(self) -> None:
        def answers() -> bool:
            if self.proc is not None and not self.proc.running:
                raise ProcError(f"{self.name} exited\n{self.proc.describe()}")
            with self.client(timeout=0.5) as client:
                return bool(client.ping())

        wait_until(
            answers, READY_TIMEOUT, message=f"{self.name} answers PING", ignore=(redis.RedisError,)
        )

    def start(self, *extra: str) -> None:
        self.spawn(*extra)
        self.wait_ready()

    def client(self, timeout: float = 2.0) -> redis.Redis:
        """A synchronous client (decoded replies) to this process."""
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            decode_responses=True,
            socket_timeout=scaled(timeout),
            socket_connect_timeout=scaled(timeout),
            retry=Retry(NoBackoff(), 0),  # no retries: a test sees each failure
        )

    def execute(self, *args: str | int) -> object:
        with self.client() as client:
            return client.execute_command(*args)

    def kill(self) -> None:
        """SIGKILL by PID and wait until the process is gone."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(READY_TIMEOUT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.running:
            self.proc.stop()

    def describe(self) -> str:
        return "".join(proc.describe() for proc in self.procs)


FAILED = frozenset({"fail", "fail?", "noaddr", "handshake"})


def _flags(entry: dict[str, Any]) -> set[str]:
    """The ``flags`` of a CLUSTER NODES or SENTINEL entry (a string or a set in redis-py)."""
    flags = entry.get("flags", "")
    return set(flags.split(",")) if isinstance(flags, str) else {str(f) for f in flags}


def _cluster(node: RedisNode, sub: str) -> Any:
    """``CLUSTER <sub>`` on ``node``, parsed by redis-py (INFO and NODES give dicts)."""
    with node.client() as client:
        return client.cluster(sub)


def _start_all(nodes: Sequence[RedisNode], *extra: str) -> None:
    for node in nodes:
        node.spawn(*extra)
    for node in nodes:
        node.wait_ready()


class RedisTopology:
    """What every topology offers; see the module docstring."""

    kind = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.nodes: list[RedisNode] = []  # data nodes
        self.others: list[RedisNode] = []  # sentinels
        self.startup_seconds = 0.0

    @property
    def url(self) -> str:
        raise NotImplementedError

    def live_nodes(self) -> list[RedisNode]:
        return [node for node in self.nodes if node.running]

    def kill_pubsub_clients(self) -> int:
        """``CLIENT KILL TYPE pubsub`` on every live data node; the number of clients killed."""
        return sum(
            int(str(n.execute("CLIENT", "KILL", "TYPE", "pubsub"))) for n in self.live_nodes()
        )

    def client_count(self, name: str) -> int:
        """Connections named ``name`` (``CLIENT SETNAME``) over all live data nodes."""
        total = 0
        for node in self.live_nodes():
            listing = str(node.execute("CLIENT", "LIST"))
            total += sum(1 for line in listing.splitlines() if f" name={name} " in f" {line} ")
        return total

    def heal(self) -> None:
        """Restart whatever was killed and wait until the topology is whole."""

    def stop(self) -> None:
        for node in [*self.others, *self.nodes]:
            node.stop()

    def describe(self) -> str:
        return "".join(node.describe() for node in [*self.nodes, *self.others])


class RedisSingle(RedisTopology):
    """One ``redis-server`` with a TCP port and a unix socket (``unix_url``)."""

    kind = "single"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.socket_path = workdir / "redis.sock"
        self.nodes = [
            RedisNode("redis", workdir, [f"unixsocket {self.socket_path}", "unixsocketperm 700"])
        ]

    def start(self) -> None:
        began = time.monotonic()
        _start_all(self.nodes)
        self.startup_seconds = time.monotonic() - began

    @property
    def url(self) -> str:
        return f"redis://{self.nodes[0].addr}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}"

    def heal(self) -> None:
        if not self.nodes[0].running:
            self.nodes[0].start()


class RedisSentinelSet(RedisTopology):
    """A master, a replica and three sentinels (quorum 2) failing over within seconds."""

    kind = "sentinel"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.nodes = [RedisNode("data-a", workdir, []), RedisNode("data-b", workdir, [])]
        self.others = [RedisNode(f"sentinel-{i}", workdir, [], sentinel=True) for i in (1, 2, 3)]

    def start(self) -> None:
        began = time.monotonic()
        master, replica = self.nodes
        master.start()
        replica.start("--replicaof", "127.0.0.1", str(master.port))
        self._wait_replicated(replica)
        # each sentinel is told the others and the replica, so none waits for hello messages
        ids = {sentinel.name: uuid.uuid4().hex + uuid.uuid4().hex[:8] for sentinel in self.others}
        for sentinel in self.others:
            sentinel.port = free_port()
        for sentinel in self.others:
            sentinel.config = [
                f"sentinel myid {ids[sentinel.name]}",
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master.port} 2",
                f"sentinel known-replica {MASTER_NAME} 127.0.0.1 {replica.port}",
                *(
                    f"sentinel known-sentinel {MASTER_NAME} 127.0.0.1 {other.port} {ids[other.name]}"
                    for other in self.others
                    if other is not sentinel
                ),
                f"sentinel down-after-milliseconds {MASTER_NAME} 1000",
                f"sentinel failover-timeout {MASTER_NAME} 2000",
                f"sentinel parallel-syncs {MASTER_NAME} 1",
            ]
        _start_all(self.others)
        self._wait_sentinels_agree(master)
        self.startup_seconds = time.monotonic() - began

    @property
    def url(self) -> str:
        hosts = ",".join(sentinel.addr for sentinel in self.others)
        return f"redis+sentinel://{hosts}/0?sentinel_master_name={MASTER_NAME}"

    def master(self) -> RedisNode:
        """The data node the sentinels name as master (all of them must agree)."""
        return self._wait_sentinels_agree(None, need_replica=False)

    def failover(self) -> RedisNode:
        """SIGKILL the master by PID; wait until every sentinel names the replica as master
        and it says it is one. Returns the new master."""
        old = self.master()
        old.kill()
        new = next(node for node in self.nodes if node is not old)
        return self._wait_sentinels_agree(new, need_replica=False)

    def heal(self) -> None:
        master = self.master()
        for node in self.nodes:
            if not node.running:
                node.start("--replicaof", "127.0.0.1", str(master.port))
                self._wait_replicated(node)
        self._wait_sentinels_agree(master)

    def _wait_replicated(self, replica: RedisNode) -> None:
        def linked() -> bool:
            info = replica.client().info("replication")
            return info.get("role") == "slave" and info.get("master_link_status") == "up"

        wait_until(
            linked,
            TOPOLOGY_TIMEOUT,
            message=f"{replica.name} replicates",
            ignore=(redis.RedisError,),
        )

    def _wait_sentinels_agree(
        self, expected: RedisNode | None, *, need_replica: bool = True
    ) -> RedisNode:
        """Every sentinel names the same live master (``expected`` if given), knows the other
        two sentinels and a replica that is up; that node reports role master."""

        def agreed() -> RedisNode | None:
            ports = set()
            for sentinel in self.others:
                with sentinel.client() as client:
                    state = client.sentinel_master(MASTER_NAME)
                    replicas = client.sentinel_slaves(MASTER_NAME)
                if _flags(state) != {"master"} or int(state["num-other-sentinels"]) < 2:
                    return None
                if need_replica and not any(
                    _flags(r) == {"slave"} and r.get("master-link-status") == "ok" for r in replicas
                ):
                    return None
                ports.add(int(state["port"]))
            if len(ports) != 1:
                return None
            node = next((n for n in self.nodes if n.port in ports and n.running), None)
            if node is None or (expected is not None and node is not expected):
                return None
            return node if node.client().info("replication").get("role") == "master" else None

        return wait_until(
            agreed,
            TOPOLOGY_TIMEOUT,
            0.1,
            message="sentinels agree on a master",
            ignore=(redis.RedisError,),
        )


class RedisClusterSet(RedisTopology):
    """Six cluster nodes, three masters and three replicas, ``cluster-node-timeout 1000``."""

    kind = "cluster"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.nodes = [RedisNode(f"node-{i}", workdir, []) for i in range(1, 7)]

    def start(self) -> None:
        began = time.monotonic()
        for node in self.nodes:
            node.config = [
                "cluster-enabled yes",
                "cluster-config-file nodes.conf",
                "cluster-node-timeout 1000",
                f"cluster-port {free_port()}",
                "cluster-replica-validity-factor 0",
            ]
        _start_all(self.nodes)
        argv = ["redis-cli", "--cluster", "create", *(n.addr for n in self.nodes)]
        argv += ["--cluster-replicas", "1", "--cluster-yes"]
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=scaled(TOPOLOGY_TIMEOUT), check=False
        )
        (self.workdir / "cluster-create.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise ProcError(f"{' '.join(argv)} failed:\n{result.stdout}\n{result.stderr}")
        self._wait_whole()
        self.startup_seconds = time.monotonic() - began

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(node.addr for node in self.nodes[:3])

    def masters(self) -> list[RedisNode]:
        """The live nodes that serve slots, as the first live node sees it."""
        by_port = {node.port: node for node in self.nodes}
        listing = _cluster(self.live_nodes()[0], "NODES")
        return [
            by_port[int(addr.split("@")[0].rsplit(":", 1)[1])]
            for addr, node in listing.items()
            if "master" in _flags(node) and not _flags(node) & FAILED and node["slots"]
        ]

    def kill_master(self, prefer: str = "") -> RedisNode:
        """SIGKILL a master by PID (the one at ``prefer``, ``host:port``, if that is a master);
        wait until its replica took over and every live node says ``cluster_state:ok``.
        Returns the killed node."""
        masters = self.masters()
        victim = next((node for node in masters if node.addr == prefer), masters[0])
        victim.kill()
        wait_until(
            lambda: len(self.masters()) == 3 and victim not in self.masters() and self._all_ok(),
            TOPOLOGY_TIMEOUT,
            0.1,
            message="a replica took over the killed master's slots",
            ignore=(redis.RedisError,),
        )
        return victim

    def heal(self) -> None:
        killed = [node for node in self.nodes if not node.running]
        _start_all(killed)
        if killed:
            self._wait_whole()

    def _all_ok(self) -> bool:
        for node in self.live_nodes():
            info = _cluster(node, "INFO")
            if info.get("cluster_state") != "ok" or int(info["cluster_slots_ok"]) != CLUSTER_SLOTS:
                return False
        return True

    def _wait_whole(self) -> None:
        """Every node: state ok, all slots ok, six nodes without failure flags, every master
        with a replica whose link is up."""

        def whole() -> bool:
            if not self._all_ok():
                return False
            for node in self.nodes:
                listing = _cluster(node, "NODES")
                if len(listing) != len(self.nodes):
                    return False
                if any(_flags(e) & FAILED or not e["connected"] for e in listing.values()):
                    return False
            for node in self.nodes:
                info = node.client().info("replication")
                if info.get("role") == "slave" and info.get("master_link_status") != "up":
                    return False
            return len(self.masters()) == 3

        wait_until(
            whole, TOPOLOGY_TIMEOUT, 0.1, message="the cluster is whole", ignore=(redis.RedisError,)
        )


# --- starting a topology -----------------------------------------------------------------------

KINDS: dict[str, type[RedisSingle | RedisSentinelSet | RedisClusterSet]] = {
    "single": RedisSingle,
    "sentinel": RedisSentinelSet,
    "cluster": RedisClusterSet,
}


@contextlib.contextmanager
def running(kind: str, workdir: Path | None = None) -> Iterator[RedisTopology]:
    """Start a topology (``"single"``, ``"sentinel"``, ``"cluster"``) and stop it afterwards."""
    base = workdir or Path(tempfile.mkdtemp(prefix=f"csc-redis-{kind}-"))
    topology = KINDS[kind](base)
    try:
        topology.start()
        yield topology
    except BaseException:
        print(topology.describe(), file=sys.stderr)
        raise
    finally:
        topology.stop()
