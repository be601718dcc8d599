"""Before and after on a noisy machine: two builds of the data path, fresh starts alternated.

``python bench/ab.py BASE [NEW] [--rounds 4] [--duration 6] [--concurrency 32 1] [--cluster]
[--close]``

``BASE`` and ``NEW`` are git revisions; ``NEW`` defaults to this checkout as it is (uncommitted
changes included). Each revision is checked out in a worktree of its own (removed at the end)
and its data path compiled in place, as ``make compile`` does; then, round after round, the
rig of that side is started from its own checkout (bench/run.py's: upstream, ``csc serve``, an
agent with 2 sessions; with ``--cluster`` bench/cluster.py's, timed through B so that every
request is forwarded to A), warmed up, and ``/t/{alias}/small`` is timed with wrk at each
concurrency (with ``--close``, a new connection per request). The sides take turns (BASE first in odd rounds, NEW first in even ones), so a
change in the machine's load reaches both. A side whose processes did not load its own compiled
library is an error, not a result.

Why the divided figures: on a shared VM the CPU a process spends per request moves by half
from one run to the next, for every process alike. The upstream's code is the same on both
sides, so each relay's CPU per request divided by the upstream's in the same run takes most of
that swing out (bench/RESULTS.md, 2026-12-05 17:20: 35% run to run raw, 5% divided). The table
gives the medians over the rounds, the divided ones with their range, and NEW ÷ BASE of each.

A measurement, never a timed test. Needs ``wrk`` (``make bench`` installs it) and, with
``--cluster``, what the cluster tests need (redis-server, PostgreSQL).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # `python bench/ab.py` puts bench/, not the root, first
    sys.path.insert(0, str(_REPO_ROOT))

from bench.datapath import require_own_build  # noqa: E402  (this checkout's, for every side)

#: the process every relay's CPU is divided by: the same code on both sides
REFERENCE = "upstream"
PATH = "/small"


def log(message: str) -> None:
    print(f"[ab] {message}", file=sys.stderr, flush=True)


# --- the sides: a checkout and a build each ---------------------------------------------------


@dataclass(frozen=True)
class Side:
    label: str
    revision: str
    tree: Path


def _git(*args: str, cwd: Path = _REPO_ROOT) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"ab: git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def _build(tree: Path) -> None:
    """Compile ``tree``'s data path in place unless its build is current (``make compile``)."""
    current = subprocess.run(
        [sys.executable, "-c", "import sys, shared.compiled as c; sys.exit(not c.up_to_date())"],
        cwd=tree,
    )
    if current.returncode == 0:
        return
    log(f"compiling the data path in {tree}")
    subprocess.run(
        [sys.executable, "setup.py", "--quiet", "build_ext", "--inplace"],
        cwd=tree,
        check=True,
        stdout=subprocess.DEVNULL,
    )


@contextlib.contextmanager
def checked_out(base: str, new: str | None, workdir: Path) -> Iterator[list[Side]]:
    """The two sides, built; worktrees for revisions, this checkout for ``new`` None."""
    added: list[Path] = []
    try:
        sides = []
        for label, revision in (("base", base), ("new", new)):
            if revision is None:
                sides.append(Side(label, "this checkout", _REPO_ROOT))
                continue
            commit = _git("rev-parse", "--verify", f"{revision}^{{commit}}")
            tree = workdir / f"{label}-{commit[:12]}"
            _git("worktree", "add", "--detach", str(tree), commit)
            added.append(tree)
            sides.append(Side(label, f"{revision} ({commit[:12]})", tree))
        for side in sides:
            _build(side.tree)
        yield sides
    finally:
        for tree in added:
            _git("worktree", "remove", "--force", str(tree))


# --- one start of one side (a child process rooted in that side's checkout) -------------------


def measure_once(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start ``tree``'s rig, time PATH at each concurrency; CPU µs per request per process."""
    sys.path.insert(0, str(tree))  # its harness and bench: its processes run from it
    from bench.refs import cpu_seconds
    from bench.run import parse_args as rig_args
    from bench.run import run_wrk

    options = rig_args(["--no-refs", "--no-cluster", "--alias", args.alias])
    with contextlib.ExitStack() as stack:
        if args.cluster:
            from bench.cluster import cluster_rig

            c = stack.enter_context(cluster_rig(options, log, {}))
            procs = {"a": c.a, "b": c.b, "agent": c.agent, REFERENCE: c.upstream}
            url = c.forwarded(PATH)
        else:
            from bench.run import rig

            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="csc-ab-")))
            s = stack.enter_context(rig(options, workdir))
            assert s.csc is not None and s.agent is not None
            procs = {"csc": s.csc, "agent": s.agent, REFERENCE: s.upstream}
            url = s.tunnel(PATH)
        for name, proc in procs.items():
            if name != REFERENCE:
                require_own_build(name, proc.pid, tree)
        run_wrk(url, max(args.concurrency), 1, close=args.close)  # warm up
        runs: dict[str, Any] = {}
        for concurrency in args.concurrency:
            before = {name: cpu_seconds(proc) for name, proc in procs.items()}
            result = run_wrk(url, concurrency, args.duration, close=args.close)
            after = {name: cpu_seconds(proc) for name, proc in procs.items()}
            if result.errors or result.non_2xx or not result.requests:
                raise RuntimeError(f"c={concurrency}: {result}")
            runs[str(concurrency)] = {
                "rate": result.requests_per_s,
                "p50_ms": result.p50_ms,
                "cpu_us": {
                    name: (after[name] - before[name]) * 1e6 / result.requests for name in procs
                },
            }
        return runs


# --- the report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """One side at one concurrency, over its rounds."""

    runs: int
    rate: float
    p50_ms: float
    #: median CPU µs per request of each process
    cpu_us: dict[str, float]
    #: each relay's CPU per request ÷ the reference's, per round (median, lowest, highest)
    divided: dict[str, tuple[float, float, float]]


def summarize(rounds: Sequence[Mapping[str, Any]]) -> Summary:
    """Medians over ``rounds`` (each as ``measure_once`` reports one concurrency)."""
    names = list(rounds[0]["cpu_us"])
    divided = {}
    for name in names:
        if name == REFERENCE:
            continue
        values = [r["cpu_us"][name] / r["cpu_us"][REFERENCE] for r in rounds]
        divided[name] = (statistics.median(values), min(values), max(values))
    return Summary(
        runs=len(rounds),
        rate=statistics.median(r["rate"] for r in rounds),
        p50_ms=statistics.median(r["p50_ms"] for r in rounds),
        cpu_us={n: statistics.median(r["cpu_us"][n] for r in rounds) for n in names},
        divided=divided,
    )


def render(sides: Sequence[Side], results: Mapping[str, Mapping[str, Sequence[Any]]]) -> str:
    """A Markdown table per concurrency: each side's medians, then NEW ÷ BASE."""
    base, new = sides
    out = [f"- base: {base.revision}", f"- new: {new.revision}", ""]
    for concurrency in results[base.label]:
        one = summarize(results[base.label][concurrency])
        two = summarize(results[new.label][concurrency])
        relays = list(one.divided)
        head = ["c=" + concurrency, "runs", "req/s", "p50 ms"]
        head += [f"{n} µs" for n in one.cpu_us] + [f"{n} ÷ {REFERENCE}" for n in relays]
        out += ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
        for side, s in ((base, one), (new, two)):
            cells = [side.label, str(s.runs), f"{s.rate:,.0f}", f"{s.p50_ms:.2f}"]
            cells += [f"{s.cpu_us[n]:.1f}" for n in one.cpu_us]
            cells += [
                f"{s.divided[n][0]:.3f} ({s.divided[n][1]:.3f}-{s.divided[n][2]:.3f})"
                for n in relays
            ]
            out.append("| " + " | ".join(cells) + " |")
        ratio = ["new ÷ base", "", f"{two.rate / one.rate:.3f}", f"{two.p50_ms / one.p50_ms:.3f}"]
        ratio += [f"{two.cpu_us[n] / one.cpu_us[n]:.3f}" for n in one.cpu_us]
        ratio += [f"{two.divided[n][0] / one.divided[n][0]:.3f}" for n in relays]
        out += ["| " + " | ".join(ratio) + " |", ""]
    return "\n".join(out)


# --- command line -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/ab.py", description=__doc__.split("\n")[0])
    parser.add_argument("base", help="git revision of the build to compare against")
    parser.add_argument("new", nargs="?", help="git revision (default: this checkout as it is)")
    parser.add_argument("--rounds", type=int, default=4, help="starts per side (4)")
    parser.add_argument("--duration", type=int, default=6, help="seconds per wrk run (6)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 1])
    parser.add_argument("--cluster", action="store_true", help="forwarded B→A instead")
    parser.add_argument(
        "--close", action="store_true", help="a new connection per request (Connection: close)"
    )
    parser.add_argument("--alias", default="bench@example.com")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # one start, in this tree
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration < 1 or min(args.concurrency) < 1:
        parser.error("--rounds, --duration and --concurrency must be at least 1")
    return args


def _start(side: Side, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    argv = [sys.executable, __file__, args.base, "--child", str(side.tree), "--json", str(out)]
    argv += ["--duration", str(args.duration), "--alias", args.alias, "--concurrency"]
    argv += [str(c) for c in args.concurrency] + (["--cluster"] if args.cluster else [])
    argv += ["--close"] if args.close else []
    subprocess.run(argv, check=True)
    runs: dict[str, Any] = json.loads(out.read_text())
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        args.json.write_text(json.dumps(measure_once(args.child, args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="csc-ab-") as tmp:
        workdir = Path(tmp)
        with checked_out(args.base, args.new, workdir) as sides:
            results: dict[str, dict[str, list[Any]]] = {s.label: {} for s in sides}
            for round_ in range(args.rounds):
                for side in sides if round_ % 2 == 0 else sides[::-1]:
                    log(f"round {round_ + 1} of {args.rounds}: {side.label} ({side.revision})")
                    runs = _start(side, args, workdir / "run.json")
                    for concurrency, run in runs.items():
                        results[side.label].setdefault(concurrency, []).append(run)
            print(render(sides, results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
