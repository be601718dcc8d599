"""bench/report.py states the speed targets that are not a ratio to direct, each met or
missed: the download against nginx's, the c=32 rate against pproxy's, and each relay's CPU
per small request at c=32."""

from __future__ import annotations

from bench.report import Row, render_other_targets


def _rows(*, csc_cpu: float, pproxy_rate: float) -> list[Row]:
    return [
        Row("download 256 MiB, one stream", "MB/s", 4884, 1689, refs={"nginx": 1534}),
        Row("1 KiB keep-alive, c=32: rate", "req/s", 45195, 12707, refs={"pproxy": pproxy_rate}),
        Row(
            "1 KiB keep-alive, c=32: relay CPU per request (csc 49 + agent 30)",
            "µs",
            22.0,
            csc_cpu + 30.0,
            parts={"csc": csc_cpu, "agent": 30.0},
        ),
    ]


def test_each_target_is_stated_met_or_missed() -> None:
    text = render_other_targets(_rows(csc_cpu=49.0, pproxy_rate=38206))
    assert "- download: 1.10 of nginx's (target ≥ 0.6: met)" in text
    assert "- keep-alive c=32 rate: 0.33 of pproxy's (target: ahead of it, > 1: **missed**)" in text
    assert "csc 49 µs (**missed**), agent 30 µs (met)" in text


def test_a_faster_tunnel_meets_them() -> None:
    text = render_other_targets(_rows(csc_cpu=40.0, pproxy_rate=12000))
    assert "**missed**" not in text
    assert "csc 40 µs (met)" in text and "1.06 of pproxy's" in text


def test_nothing_is_said_without_the_reference_rows() -> None:
    assert render_other_targets([Row("download 256 MiB, one stream", "MB/s", 4884, 1689)]) == ""
