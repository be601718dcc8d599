"""What TLS on peer links costs a forwarded request: CPU per request on each node and latency,
with ``peer_tls`` on and off, in one run.

``python bench/peer_tls.py [--duration 5] [--rounds 2] [--concurrency 1 16]`` starts the rig of
bench/cluster.py (Redis, PostgreSQL, nodes A and B, an agent with one session on A) once per
setting and round, alternating the settings so that a change in the machine's load hits both,
and times ``/t/{alias}/small`` through B (B → peer link → A → agent) with wrk. CPU is user +
system seconds of each node process over the wrk run, divided by the requests served. Prints a
Markdown table of the medians over the rounds. A benchmark, never a timed test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # `python bench/peer_tls.py` puts bench/, not the root, first
    sys.path.insert(0, str(_REPO_ROOT))

from bench.cluster import check_paths, cluster_rig  # noqa: E402
from bench.refs import cpu_seconds  # noqa: E402
from bench.run import log, run_wrk  # noqa: E402
from harness.procs import CscProc  # noqa: E402

SETTINGS = {"on": "true", "off": "false"}


def measure(args: argparse.Namespace) -> dict[tuple[str, int], list[tuple[float, ...]]]:
    """(setting, concurrency) → per round: req/s, p50 ms, p99 ms, CPU µs/request on A, on B."""
    results: dict[tuple[str, int], list[tuple[float, ...]]] = {}
    for round_ in range(args.rounds):
        order = list(SETTINGS) if round_ % 2 == 0 else list(reversed(SETTINGS))
        for setting in order:
            env = {"CSC_PEER_TLS": SETTINGS[setting]}
            with cluster_rig(args, log, env) as rig:
                check_paths(rig)
                _check_transport(rig.b, "TLSv1.3" if setting == "on" else "plain TCP")
                url = rig.forwarded("/small")
                run_wrk(url, max(args.concurrency), 1)  # warm up
                for concurrency in args.concurrency:
                    log(f"peer_tls {setting}, c={concurrency}, round {round_ + 1}")
                    before = (cpu_seconds(rig.a), cpu_seconds(rig.b))
                    result = run_wrk(url, concurrency, args.duration)
                    after = (cpu_seconds(rig.a), cpu_seconds(rig.b))
                    if result.errors or result.non_2xx:
                        raise RuntimeError(f"peer_tls {setting}: errors in {result}")
                    per = [
                        (y - x) * 1e6 / max(1, result.requests)
                        for x, y in zip(before, after, strict=True)
                    ]
                    results.setdefault((setting, concurrency), []).append(
                        (result.requests_per_s, result.p50_ms, result.p99_ms, *per)
                    )
    return results


def _check_transport(node: CscProc, want: str) -> None:
    """The setting reached the node: its link to A came up over ``want``."""
    if f"up ({want})" not in node.stderr_path.read_text() + node.stdout_path.read_text():
        raise RuntimeError(f"node {node.name}: no peer link up over {want} in its log")


def table(results: dict[tuple[str, int], list[tuple[float, ...]]]) -> str:
    lines = [
        "| forwarded B→A, 1 KiB | peer_tls | req/s | p50 ms | p99 ms | CPU µs/req A | "
        "CPU µs/req B | CPU µs/req A+B |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (setting, concurrency), rounds in sorted(results.items(), key=lambda kv: kv[0][1]):
        rate, p50, p99, cpu_a, cpu_b = (statistics.median(col) for col in zip(*rounds, strict=True))
        lines.append(
            f"| keep-alive, c={concurrency} | {setting} | {rate:,.0f} | {p50:.2f} | {p99:.2f} | "
            f"{cpu_a:.0f} | {cpu_b:.0f} | {cpu_a + cpu_b:.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (5)")
    parser.add_argument("--rounds", type=int, default=2, help="rigs per setting (2)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--alias", default="bench@example.com")
    parser.add_argument("--agent-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--agent-arg", action="append", default=[], metavar="ARG")
    args = parser.parse_args(argv)
    print(table(measure(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
