"""Ready files: how a process started on port 0 tells its parent where it listens.

A server binds port 0, then writes a small JSON object (addresses as ``"host:port"`` strings and
its ``pid``) to the path given by ``--ready-file``. The write is atomic (a temporary file in the
same directory, then ``os.replace``), so a reader never sees a partial file: the file either does
not exist yet or parses completely.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any


def write_ready_file(path: str | Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` atomically."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(data)) + "\n", encoding="utf-8")
    os.replace(tmp, target)


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


def format_hostport(host: str, port: int) -> str:
    """The inverse of :func:`parse_hostport`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def wait_for_stop_signal() -> None:
    """Return when the process receives SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """``uvloop.new_event_loop`` when uvloop is importable, else ``None`` (default loop)."""
    if sys.platform == "win32":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run_main(coro: Coroutine[Any, Any, None]) -> None:
    """Run a CLI's main coroutine, on uvloop when it is importable."""
    with asyncio.Runner(loop_factory=uvloop_factory()) as runner:
        runner.run(coro)
