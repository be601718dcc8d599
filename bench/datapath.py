"""Whether a benchmarked process runs this checkout's compiled data path.

A CSC or agent that imported its data path from source (shared/compiled.py falls back to the
sources when one was edited after `make compile`, even while a benchmark runs) or that mapped
another checkout's build measures other code than the one a recorded figure names. Every bench
script passes each relay process it starts to :func:`require_own_build`, which reads the
process's ``/proc/PID/maps`` once the process has imported its data path (a CSC once it is
ready, an agent once its alias is online) and stops the run when the library is not the
checkout's own.
"""

from __future__ import annotations

from pathlib import Path

#: the compiled library's file name starts so (shared/compiled.py's GROUP)
LIBRARY = "native__mypyc"


def foreign_library(maps: str, tree: Path) -> str | None:
    """What is wrong with the compiled library a process mapped (``maps``: its
    ``/proc/PID/maps``) for a checkout at ``tree``: None when it is ``tree``'s own."""
    loaded = sorted({line.split()[-1] for line in maps.splitlines() if LIBRARY in line})
    if not loaded:
        return "no compiled library (its data path came from source: `make compile`)"
    foreign = [path for path in loaded if not path.startswith(f"{tree}/")]
    return f"the library of another checkout: {', '.join(foreign)}" if foreign else None


def require_own_build(name: str, pid: int, tree: Path) -> None:
    """Raise RuntimeError unless process ``pid`` (``name`` in the message) runs ``tree``'s
    compiled library."""
    wrong = foreign_library(Path(f"/proc/{pid}/maps").read_text(), tree)
    if wrong is not None:
        raise RuntimeError(f"{name} (pid {pid}) runs {wrong}, not {tree}'s build")
