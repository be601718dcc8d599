"""Ready files: how a process started on port 0 tells its parent where it listens.

A server binds port 0, then writes a small JSON object (addresses as ``"host:port"`` strings and
its ``pid``) to the path given by ``--ready-file``. The write is atomic (a temporary file in the
same directory, then ``os.replace``), so a reader never sees a partial file: the file either does
not exist yet or parses completely. Writing, and the rest of a helper server's start-up, is
:mod:`shared.runtime`'s (the programs' own); this module adds what a parent needs to read it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_ready_file(path: str | Path) -> dict[str, Any] | None:
    """The ready file's JSON object, or ``None`` while it does not exist (or is not JSON yet)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def parse_hostport(value: str) -> tuple[str, int]:
    """Split ``"host:port"`` (or ``"[v6]:port"``) into a host and an integer port."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {value!r}")
    return host.strip("[]"), int(port)
