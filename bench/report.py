"""The figures of bench/run.py and how they are shown: rows (tunnel, direct and the reference
relays), targets, memory, the machine. Pure data and text; nothing here measures."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path

MiB = 1024 * 1024
IDLE_RSS_TARGET_MIB = 80
#: the targets read against a reference relay or per process rather than against direct
NGINX_DOWNLOAD_MIN = 0.6  # the tunnel's download at least this share of nginx's
CPU_PER_REQUEST_MAX = 40.0  # µs of CPU per small request at c=32, for the CSC and the agent
_REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Target:
    text: str
    ratio_min: float | None = None
    ratio_max: float | None = None
    added_max: float | None = None  # at most this much above the reference (same unit)

    def met(self, ratio: float, added: float = 0.0) -> bool:
        if self.ratio_min is not None and ratio < self.ratio_min:
            return False
        if self.added_max is not None and added > self.added_max:
            return False
        return self.ratio_max is None or ratio <= self.ratio_max


@dataclasses.dataclass
class Row:
    metric: str
    unit: str
    direct: float
    tunnel: float | None = None
    target: Target | None = None
    #: the same through each reference relay (bench/refs.py)
    refs: dict[str, float] = dataclasses.field(default_factory=dict)
    #: the tunnel's figure by process, when it is their sum (relay CPU: csc, agent)
    parts: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.tunnel is None or not self.direct:
            return None
        return self.tunnel / self.direct


@dataclasses.dataclass
class Memory:
    name: str
    idle_before: int
    idle_after: int = 0
    peak: int = 0


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "ms":
        return f"{value:.2f}"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or not b else f"{a / b:.2f}"


def render_table(rows: Sequence[Row], sides: tuple[str, str] = ("tunnel", "direct")) -> str:
    """One line per row: the tunnel and direct, then each reference relay, as ratios to direct
    (and the tunnel as a ratio to each reference)."""
    names = sorted({name for row in rows for name in row.refs})
    head = f"| metric | unit | {sides[0]} | {sides[1]} | " + "".join(f"{n} | " for n in names)
    head += f"{sides[0]}/{sides[1]} | " + "".join(f"{n}/{sides[1]} | " for n in names)
    head += "".join(f"{sides[0]}/{n} | " for n in names) + "target | |"
    lines = [head, "|---|---|" + "---:|" * (2 + 3 * len(names) + 1) + "---|---|"]
    for row in rows:
        ratio = row.ratio
        verdict = ""
        if row.target is not None and ratio is not None and row.tunnel is not None:
            met = row.target.met(ratio, row.tunnel - row.direct)
            verdict = "met" if met else "**missed**"
        ref_values = [row.refs.get(n) for n in names]
        cells = [_fmt(row.tunnel, row.unit), _fmt(row.direct, row.unit)]
        cells += [_fmt(v, row.unit) for v in ref_values]
        cells += [_ratio(row.tunnel, row.direct)] + [_ratio(v, row.direct) for v in ref_values]
        cells += [_ratio(row.tunnel, v) for v in ref_values]
        lines.append(
            f"| {row.metric} | {row.unit} | {' | '.join(cells)} | "
            f"{row.target.text if row.target else ''} | {verdict} |"
        )
    return "\n".join(lines)


def render_other_targets(rows: Sequence[Row]) -> str:
    """The targets that are not a ratio to direct, each met or missed: the download against
    nginx's, the keep-alive rate at c=32 against pproxy's, and each relay's CPU per small
    request at c=32. Empty when the rows to read them from are not there."""
    by_metric = {row.metric: row for row in rows}
    lines: list[str] = []

    def verdict(met: bool) -> str:
        return "met" if met else "**missed**"

    download = next((r for r in rows if r.metric.startswith("download")), None)
    if download is not None and download.tunnel and download.refs.get("nginx"):
        share = download.tunnel / download.refs["nginx"]
        lines.append(
            f"- download: {share:.2f} of nginx's (target ≥ {NGINX_DOWNLOAD_MIN}: "
            f"{verdict(share >= NGINX_DOWNLOAD_MIN)})"
        )
    rate = by_metric.get("1 KiB keep-alive, c=32: rate")
    if rate is not None and rate.tunnel and rate.refs.get("pproxy"):
        share = rate.tunnel / rate.refs["pproxy"]
        lines.append(
            f"- keep-alive c=32 rate: {share:.2f} of pproxy's (target: ahead of it, > 1: "
            f"{verdict(share > 1)})"
        )
    cpu = next((r for r in rows if r.metric.startswith("1 KiB keep-alive, c=32: relay CPU")), None)
    if cpu is not None and cpu.parts:
        each = ", ".join(
            f"{name} {value:.0f} µs ({verdict(value <= CPU_PER_REQUEST_MAX)})"
            for name, value in cpu.parts.items()
        )
        lines.append(
            f"- relay CPU per request at c=32 (target ≤ {CPU_PER_REQUEST_MAX:.0f} µs each): {each}"
        )
    return (
        "\n".join(["Targets against the references and per process:", "", *lines]) if lines else ""
    )


def render_memory(memory: Sequence[Memory], relay_names: Sequence[str]) -> str:
    mib = 1.0 / MiB
    lines = [
        "| process | idle RSS before load (MiB) | idle RSS after load (MiB) | peak RSS (MiB) |",
        "|---|---:|---:|---:|",
    ]
    for m in memory:
        lines.append(
            f"| {m.name} | {m.idle_before * mib:.1f} | {m.idle_after * mib:.1f} | "
            f"{m.peak * mib:.1f} |"
        )
    relay = [m for m in memory if m.name in relay_names]
    if relay:
        idle = sum(m.idle_before for m in relay) * mib
        after = sum(m.idle_after for m in relay) * mib
        peak = sum(m.peak for m in relay) * mib
        verdict = "met" if idle <= IDLE_RSS_TARGET_MIB else "**missed**"
        lines.append(f"| {' + '.join(relay_names)} | {idle:.1f} | {after:.1f} | {peak:.1f} |")
        lines += [
            "",
            f"Idle RSS of {' + '.join(relay_names)}: {idle:.1f} MiB "
            f"(target ≤ {IDLE_RSS_TARGET_MIB} MiB: {verdict}).",
        ]
    return "\n".join(lines)


def machine_info() -> dict[str, str]:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        loop = f"uvloop {importlib.metadata.version('uvloop')}"
    except importlib.metadata.PackageNotFoundError:
        loop = "no uvloop"
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=_REPO_ROOT, capture_output=True, text=True
    )
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": f"{platform.python_implementation()} {platform.python_version()} ({loop})",
        "os": f"{platform.system()} {platform.release()}",
        "commit": git.stdout.strip() if git.returncode == 0 else "no commit",
    }
