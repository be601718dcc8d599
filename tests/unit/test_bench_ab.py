"""``bench/ab.py``: two builds compared over alternated starts, each relay's CPU divided by the
upstream's of the same run."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench import ab, datapath


def _round(rate: float, csc: float, agent: float, upstream: float) -> dict[str, Any]:
    return {
        "rate": rate,
        "p50_ms": 1000 / rate,
        "cpu_us": {"csc": csc, "agent": agent, "upstream": upstream},
    }


def test_each_relay_is_divided_by_the_upstream_of_its_own_run() -> None:
    # the machine twice as slow in the second run: raw CPU doubles, the divided figure does not
    rounds = [_round(1000, 60, 40, 30), _round(500, 120, 80, 60), _round(800, 66, 44, 30)]
    s = ab.summarize(rounds)
    assert s.runs == 3
    assert s.rate == 800
    assert s.cpu_us == {"csc": 66, "agent": 44, "upstream": 30}
    assert set(s.divided) == {"csc", "agent"}  # not the reference itself
    assert s.divided["csc"] == pytest.approx((2.0, 2.0, 2.2))
    assert s.divided["agent"] == pytest.approx((4 / 3, 4 / 3, 44 / 30))


def test_the_report_gives_both_sides_and_new_over_base() -> None:
    sides = [ab.Side("base", "a1 (a1)", Path("/b")), ab.Side("new", "this checkout", Path("/n"))]
    results = {
        "base": {"32": [_round(1000, 60, 40, 30), _round(1000, 60, 40, 30)]},
        "new": {"32": [_round(1250, 30, 40, 30), _round(1250, 30, 40, 30)]},
    }
    report = ab.render(sides, results)
    lines = report.splitlines()
    assert "- base: a1 (a1)" in lines and "- new: this checkout" in lines
    header = next(line for line in lines if line.startswith("| c=32 |"))
    assert "csc ÷ upstream" in header and "agent ÷ upstream" in header
    assert "upstream ÷ upstream" not in header
    ratio = next(line for line in lines if line.startswith("| new ÷ base |"))
    cells = [c.strip() for c in ratio.strip("|").split("|")]
    # req/s, p50, csc µs, agent µs, upstream µs, csc ÷ upstream, agent ÷ upstream
    assert cells[2:] == ["1.250", "0.800", "0.500", "1.000", "1.000", "0.500", "1.000"]


def test_a_process_must_run_the_build_of_its_own_side(tmp_path: Path) -> None:
    own = tmp_path / "base"
    line = (
        "7f00-7f10 r-xp 00000000 08:01 42 {}/shared/native__mypyc.cpython-311-x86_64-linux-gnu.so"
    )
    assert datapath.foreign_library(line.format(own), own) is None
    wrong = datapath.foreign_library(line.format(tmp_path / "new"), own)
    assert wrong is not None and str(tmp_path / "new") in wrong
    assert (
        datapath.foreign_library(line.format(tmp_path / "base-old"), own) is not None
    )  # a prefix only
    no_build = datapath.foreign_library("7f00-7f10 r-xp 00000000 08:01 42 /usr/lib/libc.so.6", own)
    assert no_build is not None and no_build.startswith("no compiled library")


def _worktrees() -> str:
    return subprocess.run(
        ["git", "worktree", "list"], cwd=ab._REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout


def test_revisions_are_checked_out_apart_and_removed_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[Path] = []
    monkeypatch.setattr(ab, "_build", built.append)  # compiling is the bench's job, not this test's
    head = ab._git("rev-parse", "HEAD")
    with ab.checked_out("HEAD", None, tmp_path) as sides:
        base, new = sides
        assert base.tree.parent == tmp_path and base.revision == f"HEAD ({head[:12]})"
        assert ab._git("rev-parse", "HEAD", cwd=base.tree) == head
        assert new.tree == ab._REPO_ROOT and new.revision == "this checkout"
        assert built == [base.tree, ab._REPO_ROOT]
        assert str(base.tree) in _worktrees()
    assert not base.tree.exists()
    assert str(base.tree) not in _worktrees()


def test_an_unknown_revision_is_refused_with_gits_words(tmp_path: Path) -> None:
    with (
        pytest.raises(SystemExit, match="no-such-revision"),
        ab.checked_out("no-such-revision", None, tmp_path),
    ):
        pass
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flag", ["--rounds", "--duration", "--concurrency"])
def test_counts_below_one_are_refused(flag: str) -> None:
    with pytest.raises(SystemExit):
        ab.parse_args(["HEAD", flag, "0"])
