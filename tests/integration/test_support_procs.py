"""The process harness finds every Python traceback a process wrote (harness/procs.py), which
the ``procs`` fixture turns into a failure of the test that started the process."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.support.procs import ProcFactory

#: one exception logged with its stack (as a JSON line would carry it), one that ends the process
PROGRAM = """
import logging, sys
try:
    {}["missing"]
except KeyError:
    logging.basicConfig(stream=sys.stdout)
    logging.getLogger("x").exception("handled, but with its stack")
print("a line without one", file=sys.stderr)
1 / 0
"""


def test_tracebacks_of_both_streams_are_found(tmp_path: Path) -> None:
    factory = ProcFactory(tmp_path)
    proc = factory.spawn("crasher", [sys.executable, "-c", PROGRAM])
    proc.wait(30)
    found = factory.tracebacks()
    assert len(found) == 2, found
    assert "(crasher" in found[0] and "KeyError: 'missing'" in found[0]
    assert "ZeroDivisionError" in found[1]


def test_a_clean_process_has_none(tmp_path: Path) -> None:
    factory = ProcFactory(tmp_path)
    proc = factory.spawn("quiet", [sys.executable, "-c", "print('Traceback-free')"])
    proc.wait(30)
    assert factory.tracebacks() == []
