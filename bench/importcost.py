"""What the CSC and the agent hold at rest, piece by piece: memory per import, and threads.

Starts the test upstream, ``csc serve`` and ``csc-agent`` (2 sessions) as bench/run.py does
(same listeners: public, TCP, admin and metrics on loopback), each under a small recorder, waits
until the alias is online and ``--settle`` seconds more, then asks each process (SIGUSR1) what
it loaded. The recorder replaces the import system's ``_load_unlocked`` so it sees every module
that is executed, and charges the memory that grew since the previous import event to the
group being imported at that moment:

* a module of the project (``csc``, ``shared``, ``tenant_agent``) is its own group by its first
  two name parts (``csc.admin``, ``shared.protocol``), charged only for its own code;
* anything else is grouped by its top-level name (``aiohttp``, ``ssl``); what it imports in turn
  (yarl, multidict, ...) is charged to it, so a row is what that import costs in all.

Memory is read twice, in two runs: RSS (``/proc/self/statm``; includes shared libraries'
touched pages, what the operator pays) and Python's own allocations (``tracemalloc``, which
costs memory itself, hence a separate run). What grew after the last import (listeners,
sessions, buffers, threads' stacks and malloc arenas) is shown as "after imports". Threads are
listed from ``/proc/<pid>/task`` (native names) next to Python's ``threading.enumerate()``.

Usage: ``python bench/importcost.py [--settle 2] [--min-mib 0.05] [--json PATH]``.
A measurement, not a test: figures move by a few hundred KiB from run to run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import runpy
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # `python bench/importcost.py` puts bench/ first
    sys.path.insert(0, str(_REPO_ROOT))

MiB = 1024 * 1024
PROJECT = ("csc", "shared", "tenant_agent")
ALIAS = "bench@example.com"
_PAGE = os.sysconf("SC_PAGE_SIZE")


# --- the recorder, inside the measured process ------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE


def group_of(name: str) -> str:
    """The row a module is charged to (see the module docstring)."""
    parts = name.split(".")
    if parts[0] in PROJECT:
        return ".".join(parts[:2])
    return parts[0]


class Recorder:
    """Charges memory growth to the import group in progress (exclusive for project groups,
    inclusive for everything else)."""

    def __init__(self, measure: Callable[[], int]) -> None:
        self.measure = measure
        self.baseline = measure()
        self.last = self.baseline
        self.stack: list[str] = []
        self.cost: dict[str, int] = {}
        self.modules: dict[str, int] = {}

    def _charge(self, group: str) -> None:
        now = self.measure()
        self.cost[group] = self.cost.get(group, 0) + now - self.last
        self.last = now

    def wrap(self, load: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def recorded_load(spec: Any) -> Any:
            group = group_of(spec.name)
            top = self.stack[-1] if self.stack else None
            if top is not None and (top == group or top.split(".")[0] not in PROJECT):
                self.modules[top] = self.modules.get(top, 0) + 1
                return load(spec)
            self._charge(top or "(the program itself, between imports)")
            self.stack.append(group)
            self.cost.setdefault(group, 0)
            self.modules[group] = self.modules.get(group, 0) + 1
            try:
                return load(spec)
            finally:
                self._charge(group)
                self.stack.pop()

        return recorded_load

    def report(self) -> dict[str, Any]:
        tasks = sorted(os.listdir("/proc/self/task"), key=int)
        native = [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in tasks]
        python = [
            f"{t.name} ({getattr(t, '_target', None).__qualname__})"  # type: ignore[union-attr]
            if getattr(t, "_target", None) is not None
            else t.name
            for t in threading.enumerate()
        ]
        return {
            "baseline": self.baseline,
            "groups": list(self.cost.items()),
            "modules": self.modules,
            "imports_end": self.last,
            "now": self.measure(),
            "rss": _rss(),
            "native_threads": native,
            "python_threads": python,
            "aiohttp_loaded": "aiohttp" in sys.modules,
            "module_count": len(sys.modules),
        }


def run_child(out: str, mode: str, module: str, argv: list[str]) -> None:
    """Run ``python -m module argv...`` under a :class:`Recorder`; SIGUSR1 writes ``out``."""
    import tracemalloc

    if mode == "trace":
        tracemalloc.start()
        recorder = Recorder(lambda: tracemalloc.get_traced_memory()[0])
    else:
        recorder = Recorder(_rss)
    import _frozen_importlib

    bootstrap: Any = _frozen_importlib
    bootstrap._load_unlocked = recorder.wrap(bootstrap._load_unlocked)

    def dump(signum: int, frame: object) -> None:
        Path(out + ".tmp").write_text(json.dumps(recorder.report()))
        os.replace(out + ".tmp", out)

    signal.signal(signal.SIGUSR1, dump)
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


# --- the driver -----------------------------------------------------------------------------


@contextlib.contextmanager
def _rig(workdir: Path, mode: str) -> Iterator[dict[str, Any]]:
    """Upstream, CSC and agent as bench/run.py starts them, the two under the recorder."""
    from bench.datapath import require_own_build
    from harness.procs import CscProc, Proc, flag_args, issue_token, start_upstream
    from harness.waiting import wait_alias_online

    me = [sys.executable, "-m", "bench.importcost", "--child"]
    started: list[Any] = []
    try:
        upstream = start_upstream(workdir, tcp_echo=False)
        started.append(upstream)
        state = workdir / "csc-state"
        state.mkdir(mode=0o700)
        ready = workdir / "csc.ready.json"
        flags: dict[str, str | Path] = {"listen": "127.0.0.1:0", "tcp_listen": "127.0.0.1:0"}
        flags |= {"admin_listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"}
        flags["state_dir"] = state
        argv = [*me, str(workdir / "csc.json"), mode, "csc", "serve", *flag_args(flags)]
        csc = CscProc.spawn(
            "csc", [*argv, "--ready-file", str(ready)], log_dir=workdir, ready_file=ready
        )
        csc.state_dir = state
        started.append(csc)
        token = issue_token(state, "bench", [ALIAS])
        agent_flags = {"csc": csc.http_url, "token": token, "upstream": upstream.http_url}
        argv = [*me, str(workdir / "agent.json"), mode, "tenant_agent"]
        agent = Proc.spawn(
            "agent", [*argv, *flag_args({**agent_flags, "sessions": 2})], log_dir=workdir
        )
        started.append(agent)
        wait_alias_online(csc.http_url, ALIAS)
        require_own_build("csc serve", csc.pid, _REPO_ROOT)
        require_own_build("the agent", agent.pid, _REPO_ROOT)
        yield {"csc": csc, "agent": agent}
    finally:
        for proc in reversed(started):
            proc.stop()


def measure(mode: str, settle: float) -> dict[str, dict[str, Any]]:
    from harness.procs import scaled

    with tempfile.TemporaryDirectory(prefix="importcost-") as tmp, _rig(Path(tmp), mode) as procs:
        time.sleep(settle)  # a measurement, not a test: let allocators settle first
        reports: dict[str, dict[str, Any]] = {}
        for name, proc in procs.items():
            out = Path(tmp) / f"{name}.json"
            proc.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + scaled(10)
            while not out.exists():
                if time.monotonic() > deadline:
                    raise SystemExit(f"importcost: {name} wrote no report\n{proc.describe()}")
                time.sleep(0.05)
            reports[name] = json.loads(out.read_text()) | {"psutil_rss": proc.rss()}
        return reports


def render(name: str, rss: dict[str, Any], traced: dict[str, Any], min_mib: float) -> str:
    traced_cost = dict(traced["groups"])
    lines = [
        f"### {name}: {rss['psutil_rss'] / MiB:.1f} MiB RSS at rest, "
        f"{rss['module_count']} modules, aiohttp {'loaded' if rss['aiohttp_loaded'] else 'not loaded'}",
        "",
        "| import group (in import order) | modules | RSS MiB | tracemalloc MiB |",
        "|---|---:|---:|---:|",
        f"| (interpreter and recorder) | | {rss['baseline'] / MiB:.2f} | |",
    ]
    small = [0, 0.0, 0.0]
    for group, cost in rss["groups"]:
        traced_mib = traced_cost.get(group, 0) / MiB
        if cost / MiB < min_mib and traced_mib < min_mib:
            small[0] += 1
            small[1] += cost / MiB
            small[2] += traced_mib
            continue
        count = rss["modules"].get(group, "")
        lines.append(f"| {group} | {count} | {cost / MiB:.2f} | {traced_mib:.2f} |")
    lines.append(f"| {small[0]} smaller groups | | {small[1]:.2f} | {small[2]:.2f} |")
    after = (rss["now"] - rss["imports_end"]) / MiB
    traced_after = (traced["now"] - traced["imports_end"]) / MiB
    lines.append(
        f"| after imports: start-up, listeners, 2 sessions | | {after:.2f} | {traced_after:.2f} |"
    )
    lines += ["", f"threads: {', '.join(rss['native_threads'])}"]
    lines.append(f"Python threads: {', '.join(rss['python_threads'])}")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        out, mode, module, *rest = sys.argv[2:]
        run_child(out, mode, module, rest)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settle", type=float, default=2.0, help="seconds at rest before sampling")
    parser.add_argument("--min-mib", type=float, default=0.05, help="smaller rows are summed")
    parser.add_argument("--json", type=Path, help="also write the raw figures there")
    args = parser.parse_args()
    rss = measure("rss", args.settle)
    traced = measure("trace", args.settle)
    for name in ("csc", "agent"):
        print(render(name, rss[name], traced[name], args.min_mib), end="\n\n")
    total = sum(r["psutil_rss"] for r in rss.values()) / MiB
    print(f"CSC + agent at rest: {total:.1f} MiB RSS")
    if args.json is not None:
        args.json.write_text(json.dumps({"rss": rss, "trace": traced}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
