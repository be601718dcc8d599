"""Program start-up shared by every server process: ``csc serve``, ``csc-agent`` (and its proxy
mode), ``csc-portal serve`` and the test suite's helper servers.

* :func:`format_hostport` / :func:`sockname_address`: a listening address as ``host:port``
  (``[v6]:port`` for IPv6), the form ready files, logs and ``--listen`` use.
* :func:`write_ready_file`: the JSON object a process started on port 0 writes to tell its
  parent where it listens; atomic (see :func:`shared.files.write_atomic`), so a reader sees no
  file or the whole of it.
* :func:`on_stop_signals` / :func:`stop_event` / :func:`wait_for_stop_signal`: SIGTERM and
  SIGINT ask the running loop to stop (drain, then exit) instead of killing it.
* :func:`run` / :func:`loop_factory` / :func:`install_uvloop`: the event loop is uvloop when it
  is importable (it is a dependency on Linux), else asyncio's own.
* :func:`raise_open_file_limit`: the soft open-file limit raised to the hard one (``csc serve``
  and ``csc-agent`` hold a descriptor per connection).
* :func:`listen_on`: the ``host``/``port`` or ``sock`` arguments of ``create_server``, with the
  socket bound here when the host is an IP literal (uvloop would resolve it in libuv's thread
  pool).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import resource
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from shared.files import write_atomic

T = TypeVar("T")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def format_hostport(host: str, port: int) -> str:
    """``host:port``, or ``[host]:port`` for an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def sockname_address(sockname: Any) -> str:
    """A socket's ``getsockname()`` (or an aiohttp runner's address) as ``host:port``; a Unix
    socket's path as it is."""
    if isinstance(sockname, str):
        return sockname
    return format_hostport(str(sockname[0]), int(sockname[1]))


def write_ready_file(path: str | Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as one line of JSON to ``path``, atomically."""
    write_atomic(Path(path), (json.dumps(dict(data)) + "\n").encode())


def on_stop_signals(stop: Callable[[], object]) -> None:
    """Call ``stop`` on SIGTERM or SIGINT (in the running loop)."""
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop)


def stop_event() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT."""
    stop = asyncio.Event()
    on_stop_signals(stop.set)
    return stop


async def wait_for_stop_signal() -> None:
    """Return when the process receives SIGTERM or SIGINT (the handlers are removed again)."""
    try:
        await stop_event().wait()
    finally:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


def _uvloop() -> ModuleType | None:
    if sys.platform == "win32":  # pragma: no cover - the programs run on Linux
        return None
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return None
    return uvloop


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """``uvloop.new_event_loop`` when uvloop is importable, else ``None`` (asyncio's loop)."""
    uvloop = _uvloop()
    if uvloop is None:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def install_uvloop() -> None:
    """Make uvloop the event loop policy (for callers of ``asyncio.run``), when importable."""
    uvloop = _uvloop()
    if uvloop is not None:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a program's main coroutine to its end, on the loop :func:`loop_factory` picks."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


#: What :func:`raise_open_file_limit` raises the soft limit to when the hard one is unlimited
#: (Linux's default ``fs.nr_open``, the most a process may have).
NOFILE_CEILING = 1 << 20


def raise_open_file_limit() -> None:
    """Raise the soft open-file limit to the hard one (at most :data:`NOFILE_CEILING`), and log
    it: systemd's own default is 1024 soft, 524288 hard, and it expects a program that needs
    many descriptors to raise the soft limit itself. Nothing when it already was that high or
    the system refused."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        return
    logging.getLogger("shared.runtime").info(
        "open files: soft limit raised from %d to %d", soft, want
    )


def listen_on(host: str | None, port: int) -> dict[str, Any]:
    """Keyword arguments of ``loop.create_server`` / ``asyncio.start_server`` for ``host:port``:
    for an IPv4 or IPv6 literal, ``{"sock": sock}`` with ``sock`` bound to it as create_server
    binds its own (SO_REUSEADDR, IPV6_V6ONLY; the server calls ``listen``); for a host name (or
    none), ``{"host": host, "port": port}``: create_server resolves it.

    uvloop resolves even a literal through libuv's thread pool, whose four threads then stay for
    the life of the process (about 0.5 MiB resident with their malloc arenas; bench/importcost.py).
    A bind error reads as create_server words it (``error while attempting to bind on address``).
    """
    family = _literal_family(host)
    if family is None:
        return {"host": host, "port": port}
    return {"sock": _bind(family, (host, port))}


def bound_sockets(host: str | None, port: int) -> list[socket.socket]:
    """Sockets bound to ``host:port`` as create_server binds them, for a listener that accepts
    by itself: one for a literal, one per address a name (or no host: every interface)
    resolves to. Not listening yet; a bind error is worded as :func:`listen_on` words it."""
    family = _literal_family(host)
    if family is not None:
        return [_bind(family, (host, port))]
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, _, _, _, address in dict.fromkeys(infos):
            sockets.append(_bind(family, address))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _literal_family(host: str | None) -> socket.AddressFamily | None:
    """The family of an IPv4 or IPv6 literal (not a scoped one); None for a name or none."""
    if not host or "%" in host:  # no host (every address), or a scoped IPv6 address
        return None
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return None
    return socket.AF_INET6 if version == 6 else socket.AF_INET


def _bind(family: socket.AddressFamily, address: Any) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(address)
        except OSError as err:
            reason = (err.strerror or str(err)).lower()
            where = address[:2]
            raise OSError(
                err.errno, f"error while attempting to bind on address {where!r}: {reason}"
            ) from None
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
