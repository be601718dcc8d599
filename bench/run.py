"""Benchmark the relay against a direct connection to the same upstream, in one run.

Starts the test upstream, ``csc serve`` and a tenant agent as processes on loopback, then
measures each scenario through the tunnel (``/t/{alias}/...``) and directly against the
upstream, back to back, so both see the same machine:

* single-stream download of a large body (``curl``; median of ``--repeat`` runs),
* 1 KiB ``/small`` requests with keep-alive at concurrency 1, 32 and 128 (``wrk --latency``:
  requests/s, p50, p99),
* the same with a new connection per request (``Connection: close``) at concurrency 32,
* idle RSS of the CSC and the agent before and after the load, and their peak RSS,
* then (bench/cluster.py) two nodes of a cluster: the keep-alive rows through B, forwarded to
  the agent's node A, next to the same through A (``--no-cluster`` skips them).

It prints a Markdown table (tunnel, direct, ratio, target) and, with ``--record``, appends it
with machine information to ``bench/RESULTS.md``. ``--direct-only`` measures the upstream alone
(useful to check the harness, or the machine). This is a benchmark, never a timed test: it
reports targets as met or missed but exits 0 either way, unless a measurement itself fails.

Usage: ``python bench/run.py [--quick] [--duration 10] [--direct-only] [--record]``
(needs ``wrk`` and ``curl``: ``apt-get install -y wrk curl``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # `python bench/run.py` puts bench/, not the root, first
    sys.path.insert(0, str(_REPO_ROOT))

from bench import refs  # noqa: E402
from bench.datapath import require_own_build  # noqa: E402
from bench.report import (  # noqa: E402
    Memory,
    Row,
    Target,
    machine_info,
    render_memory,
    render_other_targets,
    render_table,
)
from harness.procs import (  # noqa: E402
    CscProc,
    Proc,
    UpstreamProc,
    issue_token,
    start_agent,
    start_csc,
    start_upstream,
)
from harness.upstream import SMALL_BODY, expected_sha256  # noqa: E402
from harness.waiting import http_request, tunnel_url, wait_alias_online  # noqa: E402

MiB = 1024 * 1024
RESULTS_FILE = _REPO_ROOT / "bench" / "RESULTS.md"
INSTALL_HINT = "install them with `apt-get install -y wrk curl` (or run `make bench`, which does)"
KEEPALIVE_CONCURRENCY = (1, 32, 128)
CLOSE_CONCURRENCY = 32
SANITY_DOWNLOAD = 16 * MiB


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- tools: wrk and curl -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    non_2xx: int


_LATENCY_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _latency_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise ValueError(f"unrecognised wrk latency {text!r}")
    return float(match.group(1)) * _LATENCY_UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    """Requests/s, p50/p99 (ms), request and error counts from ``wrk --latency`` output."""
    rate = re.search(r"^Requests/sec:\s*([\d.]+)", output, re.M)
    p50 = re.search(r"^\s*50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s*99%\s+(\S+)", output, re.M)
    total = re.search(r"^\s*(\d+) requests in", output, re.M)
    if not (rate and p50 and p99 and total):
        raise ValueError(f"cannot parse wrk output:\n{output}")
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", output)
    return WrkResult(
        requests_per_s=float(rate.group(1)),
        p50_ms=_latency_ms(p50.group(1)),
        p99_ms=_latency_ms(p99.group(1)),
        requests=int(total.group(1)),
        errors=sum(int(n) for n in errors.groups()) if errors else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


def run_wrk(url: str, connections: int, duration: int, *, close: bool = False) -> WrkResult:
    threads = 1 if connections < 4 else min(2, os.cpu_count() or 1)
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "10s"]
    argv += ["--latency", *(["-H", "Connection: close"] if close else []), url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


def curl_download(url: str, size: int) -> float:
    """Download ``url`` to /dev/null; returns MB/s (10^6 bytes per second)."""
    argv = ["curl", "-s", "--noproxy", "*", "-o", "/dev/null", "--max-time", "600"]
    argv += ["-w", "%{http_code} %{size_download} %{speed_download}", url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=660)
    fields = done.stdout.split()
    if done.returncode != 0 or len(fields) != 3 or fields[:2] != ["200", str(size)]:
        raise RuntimeError(f"download of {url} failed: curl exit {done.returncode}, {fields}")
    return float(fields[2]) / 1e6


def check_tools() -> None:
    missing = [tool for tool in ("wrk", "curl") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"bench: {' and '.join(missing)} not found; {INSTALL_HINT}")


# --- the processes -------------------------------------------------------------------------


@dataclasses.dataclass
class Rig:
    """The processes under test; ``csc`` and ``agent`` are absent in direct-only mode."""

    upstream: UpstreamProc
    csc: CscProc | None = None
    agent: Proc | None = None
    alias: str = "bench@example.com"
    #: reference relays in front of the same upstream (bench/refs.py): name -> (process, URL)
    refs: dict[str, tuple[Proc, str]] = dataclasses.field(default_factory=dict)

    @property
    def procs(self) -> list[Proc]:
        return [p for p in (self.agent, self.csc, self.upstream) if p is not None]

    def sides(self, path: str, *, download: bool = False) -> list[tuple[str, str]]:
        """(side, URL of ``path``) for direct, the tunnel (if running) and each reference (for
        a ``download``, those that stream a body: not floor, which holds a whole answer)."""
        sides = [("direct", self.direct(path))]
        if self.csc is not None:
            sides.append(("tunnel", self.tunnel(path)))
        sides += [
            (name, f"{url}/{path.lstrip('/')}")
            for name, (_, url) in self.refs.items()
            if not (download and name in refs.SMALL_ONLY)
        ]
        return sides

    def relay_procs(self, side: str) -> list[Proc]:
        """The processes that relay for ``side`` (direct: the upstream itself)."""
        if side == "direct":
            return [self.upstream]
        if side == "tunnel":
            return [p for p in (self.csc, self.agent) if p is not None]
        return [self.refs[side][0]]

    def direct(self, path: str) -> str:
        return f"{self.upstream.http_url}/{path.lstrip('/')}"

    def tunnel(self, path: str) -> str:
        assert self.csc is not None
        return tunnel_url(self.csc.http_url, self.alias, path)


def env_pairs(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"bench: expected KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


@contextlib.contextmanager
def rig(args: argparse.Namespace, workdir: Path) -> Iterator[Rig]:
    """Start the upstream (and unless direct-only, CSC and agent); stop them all on exit."""
    started: list[Proc] = []
    try:
        log("starting the upstream")
        setup = Rig(start_upstream(workdir, tcp_echo=False), alias=args.alias)
        started.append(setup.upstream)
        if not args.direct_only:
            log("starting csc serve")
            setup.csc = start_csc(workdir, env=env_pairs(args.csc_env))
            started.append(setup.csc)
            token = issue_token(setup.csc.state_dir, "bench", [args.alias])
            log(f"starting the agent ({args.sessions} sessions)")
            setup.agent = start_agent(
                setup.csc.http_url,
                token,
                setup.upstream.http_url,
                sessions=args.sessions,
                extra_args=args.agent_arg,
                log_dir=workdir / "logs",
                env=env_pairs(args.agent_env),
            )
            started.append(setup.agent)
            wait_alias_online(setup.csc.http_url, args.alias)
            log(f"alias {args.alias} is online")
            require_own_build("csc serve", setup.csc.pid, _REPO_ROOT)
            require_own_build("the agent", setup.agent.pid, _REPO_ROOT)
        if not args.no_refs:
            upstream_port = int(setup.upstream.http_url.rsplit(":", 1)[1])
            for name, start in (
                ("nginx", refs.start_nginx),
                ("pproxy", refs.start_pproxy),
                ("floor", refs.start_floor),
            ):
                log(f"starting {name} in front of the upstream")
                proc, url = start(workdir, upstream_port)
                started.append(proc)
                setup.refs[name] = (proc, url)
        yield setup
    except BaseException:
        for proc in started:
            proc.dump_logs(sys.stderr)
        raise
    finally:
        for proc in reversed(started):
            proc.stop()


def sanity_check(url_for: Any) -> None:
    """Before timing anything, make sure the path serves the right bytes."""
    status, _, body = http_request(url_for("/small"))
    if status != 200 or body != SMALL_BODY:
        raise RuntimeError(f"{url_for('/small')} answered {status} with {len(body)} bytes")
    status, _, body = http_request(url_for(f"/bytes/{SANITY_DOWNLOAD}"), timeout=60)
    if status != 200 or hashlib.sha256(body).hexdigest() != expected_sha256(SANITY_DOWNLOAD):
        raise RuntimeError(f"{url_for('/bytes')} answered {status}, wrong content")


# --- measurements --------------------------------------------------------------------------


def measure_download(rig: Rig, args: argparse.Namespace) -> Row:
    size = args.download_mib * MiB
    path = f"/bytes/{size}"
    row = Row(f"download {args.download_mib} MiB, one stream", "MB/s", 0.0)
    row.target = Target("≥ 0.60", ratio_min=0.60)
    speeds: dict[str, list[float]] = {}
    for attempt in range(args.repeat):
        log(f"download {args.download_mib} MiB, run {attempt + 1}/{args.repeat}")
        for side, url in rig.sides(path, download=True):
            speeds.setdefault(side, []).append(curl_download(url, size))
    medians = {side: statistics.median(runs) for side, runs in speeds.items()}
    row.direct = medians.pop("direct")
    row.tunnel = medians.pop("tunnel", None)
    row.refs = medians
    return row


def _wrk_rows(
    label: str,
    direct: WrkResult,
    tunnel: WrkResult | None,
    others: dict[str, WrkResult] | None = None,
) -> list[Row]:
    others = others or {}
    return [
        Row(
            f"{label}: rate",
            "req/s",
            direct.requests_per_s,
            tunnel.requests_per_s if tunnel else None,
            refs={name: r.requests_per_s for name, r in others.items()},
        ),
        Row(
            f"{label}: p50",
            "ms",
            direct.p50_ms,
            tunnel.p50_ms if tunnel else None,
            refs={name: r.p50_ms for name, r in others.items()},
        ),
        Row(
            f"{label}: p99",
            "ms",
            direct.p99_ms,
            tunnel.p99_ms if tunnel else None,
            refs={name: r.p99_ms for name, r in others.items()},
        ),
    ]


def measure_small(
    rig: Rig, args: argparse.Namespace, concurrency: int, close: bool
) -> tuple[list[Row], list[str]]:
    mode = "new connection each" if close else "keep-alive"
    label = f"1 KiB {mode}, c={concurrency}"
    log(f"{label} ({args.duration}s per side)")
    results: dict[str, WrkResult] = {}
    cpu: dict[str, float] = {}
    upstream_cpu: dict[str, float] = {}  # the upstream's own CPU per request, on each side
    for side, url in rig.sides("/small"):
        procs = [*rig.relay_procs(side), rig.upstream]
        before = [refs.cpu_seconds(p) for p in procs]
        results[side] = run_wrk(url, concurrency, args.duration, close=close)
        after = [refs.cpu_seconds(p) for p in procs]
        per_request = [
            (end - start) * 1e6 / max(1, results[side].requests)
            for start, end in zip(before, after, strict=True)
        ]
        upstream_cpu[side] = per_request.pop()
        for proc, value in zip(rig.relay_procs(side), per_request, strict=True):
            cpu[proc.name.rsplit("-", 1)[0]] = value
    notes = [
        f"{label}, {side}: {r.errors} socket errors, {r.non_2xx} non-2xx of {r.requests}"
        for side, r in results.items()
        if r.errors or r.non_2xx
    ]
    others = {k: v for k, v in results.items() if k not in ("direct", "tunnel")}
    rows = _wrk_rows(label, results.pop("direct"), results.pop("tunnel", None), others)
    if not close and concurrency in (1, 32):
        rows.append(cpu_row(label, cpu))
        rows.append(upstream_row(label, upstream_cpu))
    if concurrency == 32 and not close:
        rows[0].target = Target("≥ 0.50", ratio_min=0.50)
    if concurrency == 32 and close:
        rows[0].target = Target("≥ 0.50", ratio_min=0.50)
    if concurrency == 1 and not close:
        rows[0].target = Target("≥ 0.35", ratio_min=0.35)
        rows[1].target = Target("≤ 2.0", ratio_max=2.0)
    return rows, notes


def cpu_row(label: str, cpu: dict[str, float]) -> Row:
    """CPU µs per request of the relaying processes (direct: the upstream serving it)."""
    names = [n for n in ("csc", "agent") if n in cpu]
    tunnel = sum(cpu[n] for n in names) if names else None
    split = f" ({' + '.join(f'{n} {cpu[n]:.0f}' for n in names)})" if names else ""
    refs_cpu: dict[str, float] = {n: cpu[n] for n in ("nginx", "pproxy", "floor") if n in cpu}
    return Row(
        f"{label}: relay CPU per request{split}",
        "µs",
        cpu["upstream"],
        tunnel,
        refs=refs_cpu,
        parts={n: cpu[n] for n in names},
    )


def upstream_row(label: str, upstream_cpu: dict[str, float]) -> Row:
    """The upstream's CPU µs per request while each side is measured: the same work (one
    ``/small`` answer) on every side, so a side where it costs more shows what sleeping and
    waking the processes of a longer chain costs the machine, not any relay's own code."""
    others = {n: v for n, v in upstream_cpu.items() if n not in ("direct", "tunnel")}
    return Row(
        f"{label}: upstream's own CPU per request",
        "µs",
        upstream_cpu["direct"],
        upstream_cpu.get("tunnel"),
        refs=others,
    )


def warm_up(rig: Rig) -> None:
    log("warming up")
    for _, url in rig.sides("/small"):
        run_wrk(url, 32, 1)


def idle_rss(rig: Rig, settle: float) -> dict[str, int]:
    time.sleep(settle)  # a benchmark, not a test: let allocators settle before sampling
    return {proc.name.rsplit("-", 1)[0]: proc.rss() for proc in rig.procs}


# --- report --------------------------------------------------------------------------------


def render_report(
    args: argparse.Namespace,
    rows: Sequence[Row],
    memory: Sequence[Memory],
    notes: Sequence[str],
    cluster_rows: Sequence[Row] = (),
) -> str:
    info = machine_info()
    mode = "direct only" if args.direct_only else "tunnel vs direct"
    if cluster_rows:
        mode = "forwarded B→A vs local" if not rows else f"{mode}; forwarded B→A vs local"
    settings = f"{args.duration} s per wrk row, download median of {args.repeat}"
    if not args.direct_only:
        settings += f", agent sessions {args.sessions}"
    if args.quick:
        settings += ", quick"
    if args.cpus:
        settings += f", every process on CPU {cpu_list(args.cpus)} only (`--cpus`)"
    parts = [
        f"## {info['date']}: {mode}",
        "",
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['os']}",
        f"- software: {info['python']}, commit {info['commit']}",
        f"- settings: {settings}",
    ]
    if rows:
        parts += ["", render_table(rows), "", render_memory(memory, ("csc", "agent"))]
        others = render_other_targets(rows)
        if others:
            parts += ["", others]
    if cluster_rows:
        parts += [
            "",
            "Two nodes (Redis, PostgreSQL), agent with one session on A; forwarded = through B:",
            "",
            render_table(cluster_rows, ("forwarded", "local")),
        ]
    if notes:
        parts += ["", *[f"- note: {note}" for note in notes]]
    return "\n".join(parts) + "\n"


def record(report: str) -> None:
    if not RESULTS_FILE.exists():
        RESULTS_FILE.write_text(
            "# Benchmark results\n\nAppended by `python bench/run.py --record`, newest last. "
            "See bench/README.md for what is measured.\n",
            encoding="utf-8",
        )
    with RESULTS_FILE.open("a", encoding="utf-8") as out:
        out.write("\n" + report)
    log(f"appended to {RESULTS_FILE}")


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk row (10)")
    parser.add_argument("--quick", action="store_true", help="2 s rows, 64 MiB download, 1 run")
    parser.add_argument("--direct-only", action="store_true", help="measure the upstream alone")
    parser.add_argument("--record", action="store_true", help=f"append to {RESULTS_FILE.name}")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    parser.add_argument("--download-mib", type=int, default=256, help="download size (256)")
    parser.add_argument("--repeat", type=int, default=3, help="download runs, median (3)")
    parser.add_argument(
        "--settle",
        type=float,
        default=7.0,
        help="seconds before idle RSS (the relays give memory back every 5 s)",
    )
    parser.add_argument("--sessions", type=int, default=2, help="agent sessions (2)")
    parser.add_argument("--alias", default="bench@example.com")
    parser.add_argument("--csc-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--agent-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--agent-arg", action="append", default=[], metavar="ARG")
    parser.add_argument("--no-cluster", action="store_true", help="skip the B→A rows")
    parser.add_argument(
        "--no-refs", action="store_true", help="skip the nginx, pproxy and floor rows"
    )
    parser.add_argument("--cluster-only", action="store_true", help="only the B→A rows")
    parser.add_argument(
        "--cpus",
        type=parse_cpus,
        metavar="LIST",
        help="run everything the bench starts (and wrk, curl) on these CPUs, e.g. 0 or 0-1: "
        "with one CPU no request is handed between CPUs (see README)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.download_mib, args.repeat = 2, 64, 1
    if args.duration < 1 or args.repeat < 1 or args.download_mib < 1:
        parser.error("--duration, --repeat and --download-mib must be at least 1")
    return args


def parse_cpus(text: str) -> frozenset[int]:
    """``0``, ``0,2`` or ``0-3`` as a set of CPU numbers this process may run on."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            first, sep, last = part.strip().partition("-")
            low, high = int(first), int(last if sep else first)
            if high < low:
                raise ValueError(part)
            cpus.update(range(low, high + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a CPU list: {text!r}") from None
    allowed = os.sched_getaffinity(0)
    if not cpus or not cpus <= allowed:
        raise argparse.ArgumentTypeError(
            f"{text!r}: CPUs must be among {cpu_list(allowed)} (this process's affinity)"
        )
    return frozenset(cpus)


def cpu_list(cpus: Iterable[int]) -> str:
    return ",".join(str(cpu) for cpu in sorted(cpus))


def run(args: argparse.Namespace, setup: Rig) -> tuple[list[Row], list[Memory], list[str]]:
    before = idle_rss(setup, args.settle)  # at rest: the agent connected, no traffic yet
    sanity_check(setup.direct)
    if setup.csc is not None:
        sanity_check(setup.tunnel)
    for proc in setup.procs:
        proc.reset_peak_rss()
    rows = [measure_download(setup, args)]
    notes: list[str] = []
    warm_up(setup)
    for concurrency, close in [(c, False) for c in KEEPALIVE_CONCURRENCY] + [
        (CLOSE_CONCURRENCY, True)
    ]:
        more_rows, more_notes = measure_small(setup, args, concurrency, close)
        rows += more_rows
        notes += more_notes
    peaks = {proc.name.rsplit("-", 1)[0]: proc.peak_rss() for proc in setup.procs}
    after = idle_rss(setup, args.settle)
    memory = [Memory(name, before[name], after[name], peaks[name]) for name in before]
    return rows, memory, notes


def run_cluster(args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    """Local (through A) and forwarded (through B) rows: see bench/cluster.py."""
    from bench.cluster import measure_cluster

    return measure_cluster(
        args,
        log,
        env_pairs(args.csc_env),
        run_wrk,
        _wrk_rows,
        Target,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_tools()
    if args.cpus:  # inherited by every process started from here on
        os.sched_setaffinity(0, args.cpus)
    rows: list[Row] = []
    memory: list[Memory] = []
    notes: list[str] = []
    if not args.cluster_only:
        with tempfile.TemporaryDirectory(prefix="csc-bench-") as tmp, rig(args, Path(tmp)) as setup:
            rows, memory, notes = run(args, setup)
    cluster_rows: list[Row] = []
    if not (args.direct_only or args.no_cluster):
        cluster_rows, more_notes = run_cluster(args)
        notes += more_notes
    report = render_report(args, rows, memory, notes, cluster_rows)
    print(report)
    if args.record:
        record(report)
    if args.json:
        payload: dict[str, Any] = {
            "machine": machine_info(),
            "rows": [dataclasses.asdict(row) | {"ratio": row.ratio} for row in rows],
            "cluster_rows": [
                dataclasses.asdict(row) | {"ratio": row.ratio} for row in cluster_rows
            ],
            "memory": [dataclasses.asdict(m) for m in memory],
            "notes": notes,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
