"""bench/runs.py reads ``perf script`` lines into runs per process and request cycle: a run is a
read to the next write; a relay runs twice per cycle (request, answer), the upstream and wrk
once; a cycle where a process ran another number of times is left out for it and from the
"between" figure; other processes, threads and failed calls are ignored."""

from __future__ import annotations

import pytest

from bench.runs import Chain, cut, parse_trace

CSC, AGENT, UPSTREAM = 101, 202, 303
PIDS = {CSC: "csc", AGENT: "agent", UPSTREAM: "upstream"}


def _line(comm: str, pid: int, tid: int, at_us: float, nr: int, ret: int) -> str:
    return f"  {comm} {pid}/{tid} [001] {1000 + at_us / 1e6:.6f}: raw_syscalls:sys_exit: NR {nr} = {ret}"


def _cycle(start: float, *, extra_agent_run: bool = False) -> list[str]:
    """One request at c=1: wrk writes at ``start``; each run lasts a known time."""
    read, write = 0, 1
    lines = [
        _line("wrk", 9, 10, start, write, 66),
        _line("python", CSC, CSC, start + 5, read, 66),  # csc request run: 40
        _line("python", CSC, CSC, start + 45, write, 343),
        _line("python", AGENT, AGENT, start + 50, read, 343),  # agent request run: 30
        _line("python", AGENT, AGENT, start + 80, write, 289),
        _line("python", UPSTREAM, UPSTREAM, start + 90, read, 289),  # upstream: 20
        _line("python", UPSTREAM, UPSTREAM, start + 110, 20, 1178),  # writev
        _line("python", AGENT, AGENT, start + 115, read, 1178),  # agent answer run: 25
        _line("python", AGENT, AGENT, start + 140, write, 1204),
        _line("python", CSC, CSC, start + 150, read, 1204),  # csc answer run: 35
        _line("python", CSC, CSC, start + 185, write, 1226),
        _line("wrk", 9, 10, start + 190, read, 1226),  # wrk: 8 (to the next write)
        _line("python", CSC, 999, start + 60, read, 10),  # another thread: ignored
        _line("python", 777, 777, start + 61, read, 10),  # another process: ignored
        _line("python", CSC, CSC, start + 62, read, -11),  # EAGAIN: ignored
    ]
    if extra_agent_run:  # a heartbeat in the middle of the cycle
        lines += [
            _line("python", AGENT, AGENT, start + 160, read, 20),
            _line("python", AGENT, AGENT, start + 162, write, 20),
        ]
    return lines


def _chain() -> Chain:
    actors = [("wrk", 0, 1), ("csc", CSC, 2), ("agent", AGENT, 2), ("upstream", UPSTREAM, 1)]
    return Chain("single node", "http://127.0.0.1:1/t/a/small", actors)


def test_runs_per_process_and_direction() -> None:
    lines = _cycle(0) + _cycle(198) + _cycle(396) + [_line("wrk", 9, 10, 594, 1, 66)]
    chain = _chain()
    cut(chain, parse_trace("\n".join(lines), PIDS))
    assert chain.cycles == pytest.approx([198, 198, 198], abs=0.01)
    assert chain.runs["csc"][0] == pytest.approx([40] * 3, abs=0.01)
    assert chain.runs["csc"][1] == pytest.approx([35] * 3, abs=0.01)
    assert chain.runs["agent"][0] == pytest.approx([30] * 3, abs=0.01)
    assert chain.runs["agent"][1] == pytest.approx([25] * 3, abs=0.01)
    assert chain.runs["upstream"][0] == pytest.approx([20] * 3, abs=0.01)
    assert chain.runs["wrk"][0] == pytest.approx([8] * 3, abs=0.01)
    assert chain.between == pytest.approx([198 - 158] * 3, abs=0.01)


def test_a_cycle_with_another_run_count_is_left_out_for_that_process() -> None:
    lines = _cycle(0) + _cycle(198, extra_agent_run=True) + [_line("wrk", 9, 10, 396, 1, 66)]
    chain = _chain()
    cut(chain, parse_trace("\n".join(lines), PIDS))
    assert len(chain.cycles) == 2
    assert len(chain.runs["agent"][0]) == 1  # only the first cycle's
    assert len(chain.runs["csc"][0]) == 2
    assert len(chain.between) == 1


def test_lines_that_are_not_syscall_exits_are_skipped() -> None:
    text = "\n".join(["", "garbage", "  perf 1/1 [000] 1.0: raw_syscalls:sys_exit: NR 16 = 0"])
    assert parse_trace(text, PIDS) == []
