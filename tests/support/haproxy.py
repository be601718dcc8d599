"""A real HAProxy in front of test backends, for cluster tests (Debian's ``haproxy`` binary).

:func:`start_haproxy` writes a configuration into a temp dir and runs ``haproxy -db`` as a
child process: an HTTP frontend (``balance roundrobin`` over the HTTP backends, health-checked
with ``GET /readyz`` expecting 200, ``inter`` 500 ms, ``fall 1``/``rise 1``, ``timeout tunnel
1h`` so WebSockets outlive the client/server idle timeouts; a request whose connection is
refused, or whose reused idle connection closes before any answer, is retried, on another
server from the first retry on: ``retry-on conn-failure empty-response``, ``option redispatch
1``, as a rolling restart wants) and a TCP frontend (mode ``tcp``,
for the ``CONNECT alias`` ingress) over the TCP backends, each checked through the health path
of the HTTP backend of the same index (the same node), or by a plain TCP connect.

Invariants:

* No port is chosen by HAProxy or guessed: the parent binds both frontends on 127.0.0.1 port 0
  and hands the listening sockets over (``bind fd@N``), so the addresses are known before the
  process starts and nothing races for them.
* The backend set changes through the runtime API on the stats socket (a Unix socket, mode
  600, in the temp dir), not by reloading: ``set server … addr … port …`` plus ``state
  ready``/``maint`` on a fixed number of server slots (``slots``, named ``n0``, ``n1``, …).
  A reload (``haproxy -sf OLDPID``) would start a second process that binds the same ports
  while the old one lingers for as long as a tunnel stays open (an hour), with a new PID, a
  new log and a stats socket to take over; the runtime API keeps one process, one PID, one
  log, and established connections survive.
* The process logs to its stderr (``log stderr format raw``), kept in a file; it is stopped by
  its own PID (SIGTERM: HAProxy's immediate stop). The ``haproxy`` fixture tracks it in the
  test's ``procs``, which prints its log tail when the test fails.
* Waiting for a server state polls ``show stat`` until a deadline scaled by
  :func:`tests.support.procs.scaled`; use the ``async_`` variants from a test whose backends
  run in the test's own event loop (a blocking wait would starve their health checks).
"""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import Proc, ProcError, ProcFactory, child_env, scaled

HTTP_BACKEND = "http_nodes"
TCP_BACKEND = "tcp_nodes"
STATES = ("UP", "DOWN", "MAINT")
START_TIMEOUT = 10.0
#: Longest Unix socket path (``sun_path`` is 108 bytes with the terminating NUL, on Linux).
_MAX_UNIX_PATH = 100

_names = itertools.count(1)


def haproxy_binary() -> str:
    found = shutil.which("haproxy")
    if found is None:
        raise ProcError(
            "haproxy is not installed; `make test` installs Debian's haproxy "
            "(scripts/system_deps.sh haproxy:haproxy)"
        )
    return found


def split_backend(address: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``http://host:port`` -> (host, port)."""
    rest = address.removeprefix("http://").removesuffix("/")
    host, sep, port = rest.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or "/" in rest or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"a backend is host:port, got {address!r}")
    return host, int(port)


def _server_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listen(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(512)
    return sock


def render_config(
    *,
    http_fd: int,
    tcp_fd: int | None,
    stats_socket: Path,
    http_backends: Sequence[tuple[str, int]],
    tcp_backends: Sequence[tuple[str, int]],
    slots: int,
    health_path: str,
    tcp_checks: str,
    inter_ms: int,
    check_timeout: float,
    timeout_client: str,
    timeout_server: str,
    timeout_tunnel: str,
    server_options: str = "",
) -> str:
    """The configuration text; unused slots are servers in maintenance on a placeholder;
    ``server_options`` go on every server line (``send-proxy-v2``, ``source ADDR``)."""

    def servers(backends: Sequence[tuple[str, int]], checks: Sequence[int | None]) -> str:
        lines = []
        for i in range(slots):
            if i < len(backends):
                host, port = backends[i]
                state = ""
            else:
                host, port, state = "127.0.0.1", 9, " disabled"  # a placeholder: never dialled
            check_port = checks[i] if i < len(checks) else None
            port_opt = f" port {check_port}" if check_port is not None else ""
            address = _server_address(host, port)
            options = f" {server_options}" if server_options else ""
            lines.append(f"    server n{i} {address} check{port_opt}{options}{state}")
        return "\n".join(lines)

    http_check = (
        "    option httpchk\n"
        f"    http-check send meth GET uri {health_path}\n"
        "    http-check expect status 200\n"
    )
    text = f"""\
global
    log stderr format raw local0 info
    stats socket {stats_socket} mode 600 level admin
    nbthread 1

defaults
    log global
    timeout connect 5s
    timeout client {timeout_client}
    timeout server {timeout_server}
    timeout tunnel {timeout_tunnel}
    timeout check {round(check_timeout * 1000)}ms
    default-server inter {inter_ms}ms fastinter {inter_ms}ms downinter {inter_ms}ms fall 1 rise 1

frontend http_in
    mode http
    option httplog
    bind fd@{http_fd}
    default_backend {HTTP_BACKEND}

backend {HTTP_BACKEND}
    mode http
    balance roundrobin
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
{http_check}{servers(http_backends, [])}
"""
    if tcp_fd is not None:
        checks: list[int | None] = (
            [port for _, port in http_backends] if tcp_checks == "http" else []
        )
        text += f"""
frontend tcp_in
    mode tcp
    option tcplog
    bind fd@{tcp_fd}
    default_backend {TCP_BACKEND}

backend {TCP_BACKEND}
    mode tcp
    balance roundrobin
{http_check if tcp_checks == "http" else ""}{servers(tcp_backends, checks)}
"""
    return text


class HaproxyProc(Proc):
    """A running HAProxy: ``http_url``, ``tcp_address``, the runtime API, ``stop()``."""

    http_address: tuple[str, int]
    tcp_address: tuple[str, int] | None
    stats_socket: Path
    config_path: Path
    slots: int
    tcp_checks: str
    _socket_dir: Path | None = None

    @property
    def http_url(self) -> str:
        host, port = self.http_address
        return f"http://{_server_address(host, port)}"

    # -- the runtime API ------------------------------------------------------------------------

    def command(self, line: str) -> str:
        """Send one runtime API command on the stats socket; its answer."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(scaled(5))
            sock.connect(str(self.stats_socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def stat_rows(self) -> list[dict[str, str]]:
        """The servers' rows of ``show stat`` (``pxname``, ``svname``, ``status``, ``addr``…)."""
        text = self.command("show stat").lstrip("# ")
        return [
            row
            for row in csv.DictReader(io.StringIO(text))
            if row.get("svname") not in (None, "FRONTEND", "BACKEND")
        ]

    def server_states(self) -> dict[tuple[str, str], str]:
        """(backend, server) -> status (``UP``, ``DOWN``, ``MAINT``, …)."""
        return {(row["pxname"], row["svname"]): row["status"] for row in self.stat_rows()}

    def set_backends(self, http_backends: Sequence[str], tcp_backends: Sequence[str] = ()) -> None:
        """Point the first slots at these backends (the rest go to maintenance). A new or
        re-addressed server is checked again; wait for it with :meth:`wait_backend_state`."""
        http = [split_backend(b) for b in http_backends]
        tcp = [split_backend(b) for b in tcp_backends]
        _check_counts(http, tcp, self.slots, self.tcp_checks, self.tcp_address is not None)
        self._assign(HTTP_BACKEND, http, [])
        if self.tcp_address is not None:
            checks = [port for _, port in http] if self.tcp_checks == "http" else []
            self._assign(TCP_BACKEND, tcp, checks)

    def _assign(
        self, backend: str, servers: Sequence[tuple[str, int]], checks: Sequence[int]
    ) -> None:
        for i in range(self.slots):
            name = f"{backend}/n{i}"
            if i >= len(servers):
                self._ok(self.command(f"set server {name} state maint"), name)
                continue
            host, port = servers[i]
            self._ok(self.command(f"set server {name} addr {host} port {port}"), name)
            if i < len(checks):
                self._ok(self.command(f"set server {name} check-port {checks[i]}"), name)
            self._ok(self.command(f"set server {name} state ready"), name)

    def _ok(self, answer: str, server: str) -> None:
        text = answer.strip()
        if text and not any(w in text for w in ("changed", "no need to change")):
            raise ProcError(f"haproxy refused a change of {server}: {text}")

    def _state_reached(self, name: str, state: str, backend: str) -> tuple[bool, str]:
        """Whether server ``name`` (``n0``… or the ``host:port`` it points at) is in ``state``;
        its current status."""
        if state not in STATES:
            raise ValueError(f"state is one of {STATES}, got {state!r}")
        wanted = split_backend(name) if ":" in name else None
        for row in self.stat_rows():
            if row["pxname"] != backend:
                continue
            if row["svname"] == name or (wanted and split_backend(row["addr"]) == wanted):
                return row["status"] == state, row["status"]
        return False, "<no such server>"

    def wait_backend_state(
        self, name: str, state: str, *, backend: str = HTTP_BACKEND, timeout: float = 10.0
    ) -> None:
        """Poll ``show stat`` until server ``name`` (``n0``… or a backend's ``host:port``)
        of ``backend`` is in ``state`` (``UP``/``DOWN``/``MAINT``); ``timeout`` is scaled."""
        deadline = time.monotonic() + scaled(timeout)
        while True:
            reached, current = self._state_reached(name, state, backend)
            if reached:
                return
            self._check_deadline(deadline, name, state, current, timeout)
            time.sleep(0.02)

    async def async_wait_backend_state(
        self, name: str, state: str, *, backend: str = HTTP_BACKEND, timeout: float = 10.0
    ) -> None:
        """:meth:`wait_backend_state` without blocking the event loop."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + scaled(timeout)
        while True:
            reached, current = await loop.run_in_executor(
                None, self._state_reached, name, state, backend
            )
            if reached:
                return
            self._check_deadline(deadline, name, state, current, timeout)
            await asyncio.sleep(0.02)

    def _check_deadline(
        self, deadline: float, name: str, state: str, current: str, timeout: float
    ) -> None:
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"haproxy server {name} is {current}, not {state}, after "
                f"{scaled(timeout):.1f}s\n{self.describe()}"
            )
        if not self.running:
            raise ProcError(f"haproxy exited with {self.returncode}\n{self.describe()}")

    def stop(self, timeout: float = 10.0) -> int:
        try:
            return super().stop(timeout)
        finally:
            if self._socket_dir is not None:
                shutil.rmtree(self._socket_dir, ignore_errors=True)


def _check_counts(
    http: Sequence[tuple[str, int]],
    tcp: Sequence[tuple[str, int]],
    slots: int,
    tcp_checks: str,
    has_tcp: bool,
) -> None:
    if not http or len(http) > slots or len(tcp) > slots:
        raise ValueError(f"need 1 to {slots} HTTP backends and at most {slots} TCP backends")
    if tcp and not has_tcp:
        raise ValueError("this haproxy has no TCP frontend (start it with tcp_backends)")
    if tcp_checks not in ("http", "connect"):
        raise ValueError(f"tcp_checks is 'http' or 'connect', got {tcp_checks!r}")
    if tcp and tcp_checks == "http" and len(tcp) != len(http):
        raise ValueError("with tcp_checks='http' the TCP backend i is checked through HTTP one i")


def _stats_path(tmp_dir: Path) -> tuple[Path, Path | None]:
    """The stats socket's path, in ``tmp_dir`` unless that is too long for a Unix socket
    (then in a private short-named temp dir, returned second so it can be removed)."""
    path = tmp_dir / "stats.sock"
    if len(str(path).encode()) <= _MAX_UNIX_PATH:
        return path, None
    short = Path(tempfile.mkdtemp(prefix="csc-hap-"))
    return short / "stats.sock", short


def start_haproxy(
    tmp_dir: Path,
    http_backends: Sequence[str],
    tcp_backends: Sequence[str] = (),
    *,
    health_path: str = "/readyz",
    tcp_checks: str = "http",
    slots: int | None = None,
    inter_ms: int = 500,
    timeout_client: str = "30s",
    timeout_server: str = "30s",
    timeout_tunnel: str = "1h",
    server_options: str = "",
) -> HaproxyProc:
    """Start HAProxy in front of ``http_backends`` (and ``tcp_backends``: a TCP frontend too)
    and return once its runtime API answers. ``slots`` (default: 4 or more if needed) bounds
    how many backends :meth:`HaproxyProc.set_backends` can point at later."""
    binary = haproxy_binary()
    http = [split_backend(b) for b in http_backends]
    tcp = [split_backend(b) for b in tcp_backends]
    slots = slots if slots is not None else max(4, len(http), len(tcp))
    _check_counts(http, tcp, slots, tcp_checks, bool(tcp))
    if not health_path.startswith("/") or any(c.isspace() for c in health_path):
        raise ValueError(f"health_path is an absolute path without spaces, got {health_path!r}")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    unique = f"haproxy-{next(_names)}"
    stats_socket, socket_dir = _stats_path(tmp_dir)
    http_sock = _listen()
    tcp_sock = _listen() if tcp else None
    try:
        config = render_config(
            http_fd=http_sock.fileno(),
            tcp_fd=tcp_sock.fileno() if tcp_sock else None,
            stats_socket=stats_socket,
            http_backends=http,
            tcp_backends=tcp,
            slots=slots,
            health_path=health_path,
            tcp_checks=tcp_checks,
            inter_ms=inter_ms,
            check_timeout=scaled(2.0),
            timeout_client=timeout_client,
            timeout_server=timeout_server,
            timeout_tunnel=timeout_tunnel,
            server_options=server_options,
        )
        config_path = tmp_dir / f"{unique}.cfg"
        config_path.write_text(config, encoding="utf-8")
        argv = [binary, "-db", "-f", str(config_path)]
        stdout_path = tmp_dir / f"{unique}.stdout.log"
        stderr_path = tmp_dir / f"{unique}.stderr.log"
        fds = [s.fileno() for s in (http_sock, tcp_sock) if s is not None]
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            popen = subprocess.Popen(
                argv,
                env=child_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                pass_fds=fds,
            )
        proc = HaproxyProc(unique, argv, popen, stdout_path, stderr_path)
        proc.http_address = http_sock.getsockname()[:2]
        proc.tcp_address = tcp_sock.getsockname()[:2] if tcp_sock else None
    finally:  # the child holds the listening sockets now; ours would only keep them alive
        http_sock.close()
        if tcp_sock is not None:
            tcp_sock.close()
    proc.stats_socket, proc._socket_dir = stats_socket, socket_dir
    proc.config_path, proc.slots, proc.tcp_checks = config_path, slots, tcp_checks
    try:
        _wait_runtime_api(proc)
    except BaseException:
        proc.stop()
        raise
    return proc


def _wait_runtime_api(proc: HaproxyProc) -> None:
    deadline = time.monotonic() + scaled(START_TIMEOUT)
    while True:
        if not proc.running:
            raise ProcError(f"haproxy exited with {proc.returncode}\n{proc.describe()}")
        try:
            if "Name: HAProxy" in proc.command("show info"):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise ProcError(f"haproxy's runtime API did not answer\n{proc.describe()}")
        time.sleep(0.02)


@pytest.fixture
def haproxy(procs: ProcFactory, tmp_path: Path) -> Iterator[Callable[..., HaproxyProc]]:
    """Start HAProxy processes for this test: ``haproxy(http_backends, tcp_backends, **kw)``
    (see :func:`start_haproxy`); stopped by PID at teardown, log tails shown on failure."""
    count = itertools.count(1)
    started: list[HaproxyProc] = []

    def start(*args: Any, **kwargs: Any) -> HaproxyProc:
        proc = start_haproxy(tmp_path / f"haproxy-{next(count)}", *args, **kwargs)
        started.append(procs.track(proc))
        return proc

    yield start
    for proc in started:
        proc.stop()
