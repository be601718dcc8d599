"""``bench/run.py --cpus``: the CPUs every process of a bench run is confined to."""

from __future__ import annotations

import argparse
import os

import pytest

from bench.run import cpu_list, parse_args, parse_cpus

ALLOWED = sorted(os.sched_getaffinity(0))


def test_a_cpu_list_names_cpus_this_process_may_use() -> None:
    first = ALLOWED[0]
    assert parse_cpus(str(first)) == {first}
    assert parse_cpus(f"{first}-{first}") == {first}
    assert parse_cpus(cpu_list(ALLOWED)) == set(ALLOWED)
    assert cpu_list({3, 1, 2}) == "1,2,3"


@pytest.mark.parametrize("text", ["", "x", "1-", "-1", "0,,1", "1-0", str(max(ALLOWED) + 1)])
def test_a_bad_cpu_list_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_cpus(text)


def test_the_option_is_off_unless_given() -> None:
    assert parse_args([]).cpus is None
    assert parse_args(["--cpus", str(ALLOWED[0])]).cpus == {ALLOWED[0]}
