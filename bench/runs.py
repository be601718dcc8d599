"""Where one request's time goes at concurrency 1: how long each process runs, per direction.

At c=1 nothing overlaps: a request's latency is the sum of each process's *run* (from the read
that brings it the request or the answer to the write that passes it on) plus the hand-offs
between them (wake-ups, the end of a loop pass). ``wrk``'s p50 is too coarse to see a change of
a few µs in one of them; this tool is not. It drives ``/small`` at c=1 with ``wrk`` and records
every ``read``/``write`` of the machine for a fraction of a second with ``perf``
(``raw_syscalls:sys_exit`` tracepoints, so the processes run as they are, without ptrace), then
cuts the trace into request cycles (one ``wrk`` write to the next) and reports, over the cycles,
the median of each process's runs in chain order and of what is left between them.

Single node: wrk → CSC → agent → upstream → agent → CSC → wrk. With ``--cluster``, two nodes of
a cluster (bench/cluster.py) and both paths: *local* through A, *forwarded* through B
(wrk → B → A → agent → upstream → agent → A → B → wrk).

Runs are told apart by their order within a cycle: a relay runs twice (the request, then the
answer), the upstream and wrk once. A cycle where a process ran another number of times (a
heartbeat, a timer's flush) is left out for that process and from the "between" column.

Needs ``perf`` (Debian's ``linux-perf``) and the right to trace the whole machine (root, or
``kernel.perf_event_paranoid`` ≤ -1), besides what ``bench/run.py`` needs; ``make bench`` does
not run it. Loopback only; every process is stopped by PID when it ends.

Usage: ``python bench/runs.py [--cluster] [--trace-seconds 0.6] [--csc-env K=V] [--record]``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # `python bench/runs.py` puts bench/, not the root, first
    sys.path.insert(0, str(_REPO_ROOT))

from bench import run as bench_run  # noqa: E402
from bench.report import machine_info  # noqa: E402

#: syscalls that move a request's bytes: read, write, writev, sendto, recvfrom, sendmsg, recvmsg
_READS = {0, 45, 47}
_WRITES = {1, 20, 44, 46}
_LINE = re.compile(
    r"^\s*(\S+)\s+(\d+)/(\d+)\s+(?:\[\d+\]\s+)?([\d.]+):\s+\S+:\s+NR (\d+) = (-?\d+)"
)


@dataclass(frozen=True)
class Syscall:
    time: float
    actor: str
    write: bool


@dataclass
class Chain:
    """One path's processes: (label, pid, runs per request) in chain order, wrk first."""

    name: str
    url: str
    actors: list[tuple[str, int, int]]
    runs: dict[str, list[list[float]]] = field(default_factory=dict)
    between: list[float] = field(default_factory=list)
    cycles: list[float] = field(default_factory=list)


def parse_trace(text: str, pids: dict[int, str]) -> list[Syscall]:
    """The successful reads and writes of the traced processes (main threads: the loops) and of
    any ``wrk``, in time order, from ``perf script -F comm,pid,tid,time,event,trace``."""
    calls = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        comm, pid, tid, stamp, nr, ret = match.groups()
        number, result = int(nr), int(ret)
        if result <= 0 or (number not in _READS and number not in _WRITES):
            continue
        actor = "wrk" if comm.startswith("wrk") else pids.get(int(pid)) if pid == tid else None
        if actor is not None:
            calls.append(Syscall(float(stamp), actor, number in _WRITES))
    calls.sort(key=lambda call: call.time)
    return calls


def cut(chain: Chain, calls: Sequence[Syscall]) -> None:
    """Fill ``chain`` with each cycle's runs (read to the next write) per process."""
    starts = [c.time for c in calls if c.actor == "wrk" and c.write]
    runs: dict[str, list[tuple[float, float]]] = {}
    for label, _, _ in chain.actors:
        begun: float | None = None
        for call in (c for c in calls if c.actor == label):
            if not call.write and begun is None:
                begun = call.time
            elif call.write and begun is not None:
                runs.setdefault(label, []).append((begun, call.time))
                begun = None
    for first, end in itertools.pairwise(starts):
        total = 0.0
        whole = True
        for label, _, expected in chain.actors:
            if label == "wrk":  # its run starts at the answer's read, just before ``end``
                mine = [r for r in runs.get(label, []) if first < r[1] <= end]
            else:
                mine = [r for r in runs.get(label, []) if first <= r[0] < end]
            if len(mine) != expected:
                whole = False
                continue
            durations = [(b - a) * 1e6 for a, b in mine]
            chain.runs.setdefault(label, [[] for _ in range(expected)])
            for i, duration in enumerate(durations):
                chain.runs[label][i].append(duration)
            total += sum(durations)
        cycle = (end - first) * 1e6
        chain.cycles.append(cycle)
        if whole:
            chain.between.append(cycle - total)


def trace(chains: Sequence[Chain], seconds: float, workdir: Path) -> None:
    """Drive each chain's URL at c=1 and trace its middle ``seconds``."""
    for chain in chains:
        bench_run.log(f"tracing {chain.name} for {seconds:g} s at c=1")
        bench_run.run_wrk(chain.url, 1, 1)  # warm
        load = subprocess.Popen(
            ["wrk", "-t1", "-c1", f"-d{int(seconds) + 4}s", chain.url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.5)
            # system-wide (per-CPU buffers): tracing only these processes (``-p``) makes perf
            # switch its events at every context switch, which moves the runs' edges
            data = workdir / f"{chain.name}.perf"
            subprocess.run(
                [
                    *("perf", "record", "-q", "-e", "raw_syscalls:sys_exit", "-a", "-o", str(data)),
                    *("--", "sleep", f"{seconds:g}"),
                ],
                check=True,
                capture_output=True,
            )
        finally:
            load.wait()
        text = subprocess.run(
            ["perf", "script", "-i", str(data), "-F", "comm,pid,tid,time,event,trace"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        pids = {pid: label for label, pid, _ in chain.actors if label != "wrk"}
        cut(chain, parse_trace(text, pids))
        if not chain.between:
            raise RuntimeError(f"{chain.name}: no whole request cycle in the trace")


def _median(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.0f}" if values else "—"


def render(chains: Sequence[Chain], args: argparse.Namespace) -> str:
    info = machine_info()
    columns = _columns(chains)
    settings = f"c=1, {args.trace_seconds:g} s traced per path"
    if args.csc_env:
        settings += ", " + ", ".join(args.csc_env)
    parts = [
        f"## {info['date']}: runs per process at c=1 (bench/runs.py)",
        "",
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['os']}",
        f"- software: {info['python']}, commit {info['commit']}",
        f"- settings: {settings}",
        "",
        "Medians over the request cycles, µs; a relay's two runs are the request's and the "
        "answer's; *between* is the cycle less every run (wake-ups, loop pass ends).",
        "",
        "| path | cycles | cycle | "
        + " | ".join(title for title, _, _ in columns)
        + " | between |",
        "|---|---:|---:|" + "---:|" * (len(columns) + 1),
    ]
    for chain in chains:
        cells = []
        for _, label, index in columns:
            runs = chain.runs.get(label)
            cells.append(_median(runs[index]) if runs else "—")
        parts.append(
            f"| {chain.name} | {len(chain.cycles)} | {_median(chain.cycles)} | "
            + " | ".join(cells)
            + f" | {_median(chain.between)} |"
        )
    return "\n".join(parts) + "\n"


def _columns(chains: Sequence[Chain]) -> list[tuple[str, str, int]]:
    """(title, label, run index) per column: ``label (req)`` and ``label (ans)`` for a relay,
    ``label`` for the others; each label once, in the order of the longest chain first."""
    runs_of: dict[str, int] = {}
    for chain in sorted(chains, key=lambda c: -len(c.actors)):
        for label, _, runs in chain.actors:
            runs_of.setdefault(label, runs)
    columns: list[tuple[str, str, int]] = []
    for label, runs in runs_of.items():
        if runs == 2:
            columns += [(f"{label} (req)", label, 0), (f"{label} (ans)", label, 1)]
        else:
            columns.append((label, label, 0))
    return columns


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/runs.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--cluster", action="store_true", help="two nodes: local and forwarded")
    parser.add_argument("--trace-seconds", type=float, default=0.6, help="per path (0.6)")
    parser.add_argument("--csc-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = parser.parse_args(argv)
    if not 0.1 <= args.trace_seconds <= 5:
        parser.error("--trace-seconds must be between 0.1 and 5")
    return args


def _rig_args(args: argparse.Namespace) -> argparse.Namespace:
    rig_args = bench_run.parse_args(["--no-refs", "--sessions", "1"])
    rig_args.csc_env = list(args.csc_env)
    return rig_args


@contextlib.contextmanager
def started(args: argparse.Namespace, workdir: Path) -> Iterator[list[Chain]]:
    """The processes (bench/run.py's rig, or bench/cluster.py's) and their chains."""
    rig_args = _rig_args(args)
    if not args.cluster:
        with bench_run.rig(rig_args, workdir) as rig:
            assert rig.csc is not None and rig.agent is not None
            bench_run.sanity_check(rig.tunnel)
            yield [
                Chain(
                    "single node",
                    rig.tunnel("/small"),
                    [
                        ("wrk", 0, 1),
                        ("csc", rig.csc.pid, 2),
                        ("agent", rig.agent.pid, 2),
                        ("upstream", rig.upstream.pid, 1),
                    ],
                )
            ]
        return
    from bench.cluster import check_paths, cluster_rig

    with cluster_rig(rig_args, bench_run.log, bench_run.env_pairs(args.csc_env)) as rig:
        check_paths(rig)
        tail = [("agent", rig.agent.pid, 2), ("upstream", rig.upstream.pid, 1)]
        yield [
            Chain("local (A)", rig.local("/small"), [("wrk", 0, 1), ("A", rig.a.pid, 2), *tail]),
            Chain(
                "forwarded (B→A)",
                rig.forwarded("/small"),
                [("wrk", 0, 1), ("B", rig.b.pid, 2), ("A", rig.a.pid, 2), *tail],
            ),
        ]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bench_run.check_tools()
    if shutil.which("perf") is None:
        raise SystemExit("bench: perf is missing: apt-get install -y linux-perf")
    with (
        tempfile.TemporaryDirectory(prefix="csc-runs-") as tmp,
        started(args, Path(tmp)) as chains,
    ):
        trace(chains, args.trace_seconds, Path(tmp))
    report = render(chains, args)
    print(report)
    if args.record:
        bench_run.record(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
