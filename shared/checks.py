"""What ``csc check``, ``csc-agent check`` and ``csc-portal check`` report: one finding per line.

A check-only run loads the configuration, looks at everything it can without serving (files,
keys, and for some programs one attempt to reach each server they need) and prints every
finding, then exits 0 when there was no problem and 1 otherwise. Nothing is created or changed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO

OK, PROBLEM, NOTE = "ok", "problem", "note"


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing looked at: ``ok``, a ``problem`` (the run fails) or a ``note`` (it does not)."""

    status: str
    subject: str
    detail: str


def ok(subject: str, detail: str) -> Finding:
    return Finding(OK, subject, detail)


def problem(subject: str, detail: str) -> Finding:
    return Finding(PROBLEM, subject, detail)


def note(subject: str, detail: str) -> Finding:
    return Finding(NOTE, subject, detail)


def report(prog: str, findings: list[Finding], stream: TextIO | None = None) -> int:
    """Print the findings and a summary line; 0 when none is a problem, else 1."""
    out = stream if stream is not None else sys.stdout
    width = max((len(f.subject) for f in findings), default=0)
    for f in findings:
        print(f"{f.status:<8} {f.subject:<{width}}  {f.detail}", file=out)
    problems = sum(1 for f in findings if f.status == PROBLEM)
    if problems:
        word = "problem" if problems == 1 else "problems"
        print(f"{prog}: {problems} {word} found; nothing was started", file=out)
        return 1
    print(f"{prog}: the configuration is usable", file=out)
    return 0


def config_problems(problems: list[str]) -> list[Finding]:
    """Every problem of a configuration that did not load."""
    return [problem("configuration", p) for p in problems]
