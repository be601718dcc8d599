"""What the bootloader shows: progress forms, error lines, exit codes, retry hints."""

from __future__ import annotations

import email.utils
import io
import re
import time
from pathlib import Path

from bootloader.client import parse_retry_after, retry_hint
from bootloader.errors import EXIT_CODES, BootError, ConfigError, Stage, printable
from bootloader.progress import BarProgress, LineProgress, NullProgress, human_size, make_progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_progress_prints_a_few_lines() -> None:
    out = io.StringIO()
    progress = LineProgress(out)
    progress.start(1000, 0)
    for _ in range(100):
        progress.advance(10)
    progress.finish()
    assert out.getvalue().splitlines() == [
        "download: downloading 1000 B",
        "download: 25% (250 B)",
        "download: 50% (500 B)",
        "download: 75% (750 B)",
        "download: complete (1000 B)",
    ]


def test_plain_progress_when_resuming_and_stopping() -> None:
    out = io.StringIO()
    progress = LineProgress(out)
    progress.start(4096, 2048)
    progress.advance(100)
    progress.abort()
    assert out.getvalue().splitlines() == [
        "download: resuming at 2.0 KiB of 4.0 KiB",
        "download: stopped at 2.1 KiB of 4.0 KiB",
    ]


def test_bar_is_redrawn_at_most_every_tenth_of_a_second() -> None:
    now = [0.0]
    out = _Tty()
    progress = BarProgress(out, clock=lambda: now[0])
    progress.start(1 << 20, 0)
    for _ in range(10):
        progress.advance(1024)  # same instant: no redraw
    now[0] = 0.5
    progress.advance(1024)
    progress.finish()
    frames = out.getvalue().split("\r")[1:]
    assert len(frames) == 3  # start, the one after 0.5 s, finish
    assert frames[1].startswith("  1% [") and "11.0 KiB of 1.0 MiB" in frames[1]
    assert "22.0 KiB/s" in frames[1]
    assert out.getvalue().endswith("\n")


def test_progress_form_follows_the_stream() -> None:
    assert isinstance(make_progress(_Tty(), quiet=False), BarProgress)
    assert isinstance(make_progress(io.StringIO(), quiet=False), LineProgress)
    assert isinstance(make_progress(_Tty(), quiet=True), NullProgress)


def test_human_sizes() -> None:
    assert [human_size(n) for n in (0, 1023, 1024, 5 << 20, 3 << 30)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "5.0 MiB",
        "3.0 GiB",
    ]


def test_error_lines_name_the_stage_and_request() -> None:
    error = BootError(Stage.RESOLVE, "the portal is offline; try again in 30 s", request_id="3f")
    assert error.line() == "resolve failed: the portal is offline; try again in 30 s (request 3f)"
    assert ConfigError("both Alias and Host").line() == "config: both Alias and Host"
    assert ConfigError("x").exit_code == 2


def test_every_stage_has_its_own_exit_code() -> None:
    codes = [EXIT_CODES[stage] for stage in Stage]
    assert len(set(codes)) == len(codes) and 0 not in codes and 1 not in codes


def test_printable_defuses_terminal_controls() -> None:
    assert printable("evil\x1b[2J\r\nname\x07") == "evil [2J name"
    assert printable("x" * 500, 10) == "x" * 9 + "…"


def test_retry_after() -> None:
    assert parse_retry_after("30") == 30.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= (parse_retry_after(in_a_minute) or 0) <= 61
    assert retry_hint(30) == "try again in 30 s"
    assert retry_hint(0.2) == "try again in 1 s"
    assert retry_hint(600) == "try again in 10 min"
    assert retry_hint(None) == "try again later"


def test_readme_lists_the_exit_codes_of_the_code() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Bootloader", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \|", section, flags=re.MULTILINE)
    assert {stage: int(code) for code, stage in rows} == {s.value: c for s, c in EXIT_CODES.items()}
