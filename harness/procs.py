"""Run the real processes (CSC, tenant agent, upstream) from tests, the benchmark and the demo.

Every server is started on port 0 with ``--ready-file``; the parent polls until the file appears
(atomic JSON, see :mod:`harness.readyfile`) and reads the bound addresses from it, so no
port is ever guessed. Waiting is always "poll until a deadline", never a fixed sleep, and every
deadline is multiplied by ``CSC_TEST_TIMEOUT_FACTOR`` (default 1) for slow machines.

Processes run as ``sys.executable -m <module> ...`` with the repository root as working
directory and ``PYTHONUNBUFFERED=1``; stdout and stderr go to files in a log directory, and
their tails are included in every startup error (and dumped by the pytest fixtures when a test
fails). A :class:`Proc` is only ever signalled by its own PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Self, TypeVar

import psutil

from harness.readyfile import parse_hostport, read_ready_file

REPO_ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
LOG_TAIL_CHARS = 6000

T = TypeVar("T")
P = TypeVar("P", bound="Proc")
FlagValue = str | int | float | bool | Path | Sequence[str] | None

_names = itertools.count(1)


class ProcError(RuntimeError):
    """A process failed to start, exited early, or a command failed."""


def timeout_factor() -> float:
    """The multiplier for every deadline, from ``CSC_TEST_TIMEOUT_FACTOR`` (default 1)."""
    raw = os.environ.get("CSC_TEST_TIMEOUT_FACTOR", "").strip()
    if not raw:
        return 1.0
    try:
        factor = float(raw)
    except ValueError:
        raise ValueError(f"CSC_TEST_TIMEOUT_FACTOR must be a number, got {raw!r}") from None
    if factor <= 0:
        raise ValueError("CSC_TEST_TIMEOUT_FACTOR must be positive")
    return factor


def scaled(seconds: float) -> float:
    """``seconds`` multiplied by :func:`timeout_factor`."""
    return seconds * timeout_factor()


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process: ours, ``PYTHONUNBUFFERED=1``, then ``extra``.

    ``CSC_TEST_TIMEOUT_FACTOR`` is the tests' own setting: it is not passed on, since the
    programs refuse ``CSC_*`` variables they do not know."""
    env = dict(os.environ)
    env.pop("CSC_TEST_TIMEOUT_FACTOR", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


# --- memory sampling -----------------------------------------------------------------------


class RssSampler:
    """Samples a process's RSS in a daemon thread and keeps the peak (bytes)."""

    def __init__(self, process: psutil.Process, interval: float = 0.05) -> None:
        self._process = process
        self._interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._peak = 0
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @property
    def peak(self) -> int:
        with self._lock:
            return self._peak

    def reset(self) -> None:
        with self._lock:
            self._peak = 0

    def sample(self) -> int:
        """Take one sample now; 0 once the process is gone."""
        try:
            rss = int(self._process.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            return 0
        with self._lock:
            self._peak = max(self._peak, rss)
        return rss

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sample() and not self._process.is_running():
                return
            self._stop.wait(self._interval)


def _kernel_peak_rss(pid: int) -> int:
    """``VmHWM`` from ``/proc/PID/status`` (Linux's exact peak RSS), or 0 if unavailable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


# --- processes -----------------------------------------------------------------------------


class Proc:
    """A child process with logs in files, readiness data and memory figures."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        popen: subprocess.Popen[bytes],
        stdout_path: Path,
        stderr_path: Path,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.popen = popen
        self.pid = popen.pid
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path
        self.ready: dict[str, Any] = {}
        self._ps = psutil.Process(popen.pid)
        self._sampler = RssSampler(self._ps)
        self._sampler.start()

    @classmethod
    def spawn(
        cls,
        name: str,
        argv: Sequence[str],
        *,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        ready_file: Path | None = None,
        ready_timeout: float = READY_TIMEOUT,
    ) -> Self:
        """Start ``argv`` (cwd: repo root); with ``ready_file``, wait for it and parse it."""
        log_dir.mkdir(parents=True, exist_ok=True)
        unique = f"{name}-{next(_names)}"
        stdout_path = log_dir / f"{unique}.stdout.log"
        stderr_path = log_dir / f"{unique}.stderr.log"
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            popen = subprocess.Popen(
                list(argv),
                cwd=REPO_ROOT,
                env=child_env(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        proc = cls(unique, argv, popen, stdout_path, stderr_path)
        if ready_file is not None:
            try:
                proc.ready = proc.wait_ready_file(ready_file, ready_timeout)
            except BaseException:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
                raise
        return proc

    def wait_ready_file(self, path: Path, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        """Poll until ``path`` holds a JSON object; fail early if the process exits."""
        deadline = time.monotonic() + scaled(timeout)
        interval = 0.005
        while True:
            data = read_ready_file(path)
            if data is not None:
                return data
            if self.returncode is not None:
                raise ProcError(
                    f"{self.name} exited with {self.returncode} before writing {path}\n"
                    f"{self.describe()}"
                )
            if time.monotonic() >= deadline:
                raise ProcError(
                    f"{self.name} wrote no ready file {path} within {scaled(timeout):.1f}s\n"
                    f"{self.describe()}"
                )
            time.sleep(interval)
            interval = min(interval * 2, 0.1)

    # signals and exit

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has exited (negative: killed by that signal)."""
        return self.popen.poll()

    @property
    def running(self) -> bool:
        return self.returncode is None

    def send_signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM (graceful drain for the CSC and the agent)."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL."""
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for exit (``timeout`` is scaled); raises :class:`TimeoutError`."""
        try:
            code = self.popen.wait(None if timeout is None else scaled(timeout))
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.name} (pid {self.pid}) still running") from None
        self._sampler.stop()
        return code

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; returns the exit status."""
        self.terminate()
        try:
            return self.wait(timeout)
        except TimeoutError:
            self.kill()
            return self.wait(STOP_TIMEOUT)

    # memory

    def rss(self) -> int:
        """Current resident set size in bytes (0 once exited)."""
        return self._sampler.sample()

    def peak_rss(self) -> int:
        """Peak RSS in bytes since start or :meth:`reset_peak_rss` (sampled, and VmHWM on Linux)."""
        self._sampler.sample()
        return max(self._sampler.peak, _kernel_peak_rss(self.pid) if self.running else 0)

    def reset_peak_rss(self) -> None:
        """Start a new peak measurement (also resets Linux's VmHWM when permitted)."""
        self._sampler.reset()
        with contextlib.suppress(OSError):
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        self._sampler.sample()

    # logs

    def logs(self, max_chars: int = LOG_TAIL_CHARS) -> tuple[str, str]:
        """The tails of stdout and stderr."""
        return _tail(self.stdout_path, max_chars), _tail(self.stderr_path, max_chars)

    def describe(self, max_chars: int = LOG_TAIL_CHARS) -> str:
        """Command line, status and log tails, for error messages."""
        out, err = self.logs(max_chars)
        status = "running" if self.running else f"exit {self.returncode}"
        return (
            f"--- {self.name} pid {self.pid} ({status}): {' '.join(self.argv)}\n"
            f"--- stdout ({self.stdout_path}):\n{out}\n"
            f"--- stderr ({self.stderr_path}):\n{err}\n"
        )

    def dump_logs(self, stream: IO[str] | None = None) -> None:
        print(self.describe(), file=stream or sys.stderr)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} pid={self.pid} rc={self.returncode}>"


def _tail(path: Path, max_chars: int) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            size = log.tell()
            log.seek(max(0, size - max_chars))
            text = log.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"<unreadable: {exc}>"
    return ("[...]\n" if size > max_chars else "") + text


def _url(hostport: str) -> str:
    return f"http://{hostport}"


class CscProc(Proc):
    """A ``csc serve`` process: ``http_url``, ``tcp_addr``, ``state_dir``."""

    state_dir: Path

    @property
    def http_addr(self) -> tuple[str, int]:
        return parse_hostport(self.ready["http"])

    @property
    def http_url(self) -> str:
        return _url(self.ready["http"])

    @property
    def tcp_addr(self) -> tuple[str, int]:
        return parse_hostport(self.ready["tcp"])

    @property
    def admin_url(self) -> str:
        return _url(self.ready["admin"])

    @property
    def metrics_url(self) -> str:
        """``http://host:port/metrics`` of the node's metrics listener."""
        return _url(self.ready["metrics"]) + "/metrics"


class UpstreamProc(Proc):
    """A ``harness.upstream`` process: ``http_url``, ``tcp_echo_addr``."""

    @property
    def http_addr(self) -> tuple[str, int]:
        return parse_hostport(self.ready["http"])

    @property
    def http_url(self) -> str:
        return _url(self.ready["http"])

    @property
    def tcp_echo_addr(self) -> tuple[str, int]:
        if not self.ready.get("tcp_echo"):
            raise ProcError(f"{self.name} runs no TCP echo server")
        return parse_hostport(self.ready["tcp_echo"])


class DelayProxyProc(Proc):
    """A ``tests.support.delayproxy`` process: ``addr``, ``url``."""

    @property
    def addr(self) -> tuple[str, int]:
        return parse_hostport(self.ready["listen"])

    @property
    def url(self) -> str:
        return _url(self.ready["listen"])


# --- starting the product ------------------------------------------------------------------


def flag_args(flags: Mapping[str, FlagValue]) -> list[str]:
    """``foo_bar=v`` -> ``--foo-bar v``; ``True`` -> bare flag; ``None``/``False`` omitted;
    a list or tuple repeats the flag."""
    args: list[str] = []
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            args.append(flag)
        elif isinstance(value, list | tuple):
            for item in value:
                args += [flag, str(item)]
        else:
            args += [flag, str(value)]
    return args


def start_csc(
    tmp_path: Path,
    *,
    state_dir: Path | None = None,
    listen: str = "127.0.0.1:0",
    tcp_listen: str | None = "127.0.0.1:0",
    admin_listen: str = "127.0.0.1:0",
    metrics_listen: str = "127.0.0.1:0",
    env: Mapping[str, str] | None = None,
    ready_timeout: float = READY_TIMEOUT,
    **flags: FlagValue,
) -> CscProc:
    """Start ``python -m csc serve`` and wait until it is listening.

    ``state_dir`` defaults to ``tmp_path / "csc-state"`` (shared by CSCs of one test, so a
    restarted CSC keeps its keys); the admin API and ``/metrics`` listen on free ports (``"off"``: none);
    other keyword arguments become flags (see :func:`flag_args`).
    """
    state = state_dir if state_dir is not None else tmp_path / "csc-state"
    state.mkdir(mode=0o700, parents=True, exist_ok=True)  # csc serve refuses an open one
    ready = tmp_path / f"csc-{next(_names)}.ready.json"
    argv = [sys.executable, "-m", "csc", "serve"]
    argv += flag_args({"listen": listen, "tcp_listen": tcp_listen, "state_dir": state})
    argv += flag_args({"admin_listen": admin_listen, "metrics_listen": metrics_listen})
    argv += flag_args({"ready_file": ready, **flags})
    proc = CscProc.spawn(
        "csc",
        argv,
        log_dir=tmp_path / "logs",
        env=env,
        ready_file=ready,
        ready_timeout=ready_timeout,
    )
    proc.state_dir = state
    return proc


def issue_token(
    state_dir: Path,
    tenant: str,
    aliases: str | Iterable[str],
    ttl: str = "1d",
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> str:
    """Run ``python -m csc token issue --assign`` (creating the tenant and assigning it the
    aliases when needed) and return the token it prints."""
    alias_list = [aliases] if isinstance(aliases, str) else list(aliases)
    argv = [sys.executable, "-m", "csc", "token", "issue", "--assign", "--tenant", tenant]
    argv += flag_args({"alias": alias_list, "ttl": ttl, "state_dir": state_dir})
    result = subprocess.run(
        argv,
        cwd=REPO_ROOT,
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=scaled(timeout),
        check=False,
    )
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    if result.returncode != 0 or not lines:
        raise ProcError(
            f"token issue failed (exit {result.returncode}): {' '.join(argv)}\n"
            f"--- stdout:\n{result.stdout}\n--- stderr:\n{result.stderr}"
        )
    return lines[-1]


def start_agent(
    csc_url: str,
    token: str,
    upstream: str,
    tcp_upstream: str | None = None,
    sessions: int = 2,
    extra_args: Sequence[str] = (),
    *,
    log_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Proc:
    """Start ``python -m tenant_agent``; it is ready once its alias resolves
    (see :func:`wait_alias_online`). Logs go to ``log_dir`` (default: a new temp dir)."""
    argv = [sys.executable, "-m", "tenant_agent"]
    argv += flag_args({"csc": csc_url, "token": token, "upstream": upstream})
    argv += flag_args({"tcp_upstream": tcp_upstream, "sessions": sessions})
    argv += list(extra_args)
    logs = log_dir if log_dir is not None else Path(tempfile.mkdtemp(prefix="csc-agent-logs-"))
    return Proc.spawn("agent", argv, log_dir=logs, env=env)


def start_upstream(
    tmp_path: Path,
    *,
    tcp_echo: bool = True,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = READY_TIMEOUT,
) -> UpstreamProc:
    """Start ``python -m harness.upstream`` (with its TCP echo server unless told not to)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    ready = tmp_path / f"upstream-{next(_names)}.ready.json"
    argv = [sys.executable, "-m", "harness.upstream", "--listen", "127.0.0.1:0"]
    argv += flag_args({"ready_file": ready, "tcp_echo_listen": "127.0.0.1:0" if tcp_echo else None})
    return UpstreamProc.spawn(
        "upstream",
        argv,
        log_dir=tmp_path / "logs",
        env=env,
        ready_file=ready,
        ready_timeout=ready_timeout,
    )


def start_delay_proxy(
    tmp_path: Path,
    target: str,
    delay: float,
    *,
    ready_timeout: float = READY_TIMEOUT,
) -> DelayProxyProc:
    """Start ``python -m tests.support.delayproxy`` forwarding to ``target`` (``host:port``)
    with ``delay`` seconds per direction; its address is ``proc.url`` / ``proc.addr``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    ready = tmp_path / f"delayproxy-{next(_names)}.ready.json"
    argv = [sys.executable, "-m", "tests.support.delayproxy"]
    argv += flag_args({"target": target, "delay": delay, "ready_file": ready})
    return DelayProxyProc.spawn(
        "delayproxy",
        argv,
        log_dir=tmp_path / "logs",
        ready_file=ready,
        ready_timeout=ready_timeout,
    )


# --- waiting -------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    interval: float = 0.05,
    *,
    message: str = "",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` until it returns a truthy value (returned) or ``timeout`` (scaled)
    passes (:class:`TimeoutError`). Exceptions of the ``ignore`` types count as falsy."""
    deadline = time.monotonic() + scaled(timeout)
    last: object = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except ignore as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{message or 'condition'} not met in {scaled(timeout):.1f}s: {last!r}"
            )
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], T | Awaitable[T | None] | None],
    timeout: float,
    interval: float = 0.05,
    *,
    message: str = "",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Like :func:`wait_until`, without blocking the loop; ``predicate`` may be async."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + scaled(timeout)
    last: object = None
    while True:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            last = value
        except ignore as exc:
            last = exc
        if loop.time() >= deadline:
            raise TimeoutError(
                f"{message or 'condition'} not met in {scaled(timeout):.1f}s: {last!r}"
            )
        await asyncio.sleep(interval)


def resolve_url(csc_url: str, alias: str) -> str:
    """``{csc_url}/v1/resolve/{alias}`` with the alias quoted for a path segment."""
    return f"{csc_url.rstrip('/')}/v1/resolve/{urllib.parse.quote(alias, safe='@')}"


def tunnel_url(csc_url: str, alias: str, path: str = "/") -> str:
    """``{csc_url}/t/{alias}/{path}``: a URL through the tunnel to the tenant's upstream."""
    quoted = urllib.parse.quote(alias, safe="@")
    return f"{csc_url.rstrip('/')}/t/{quoted}/{path.lstrip('/')}"


#: urllib opener that ignores *_proxy environment variables: tests only talk to loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_request(
    url: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """A blocking HTTP request without proxies: ``(status, headers, body)``, errors included."""
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with _OPENER.open(req, timeout=scaled(timeout)) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers.items()), err.read()


def _resolve_once(csc_url: str, alias: str) -> dict[str, Any] | str:
    """The resolve answer when online; otherwise a short description of why not."""
    try:
        status, _, body = http_request(resolve_url(csc_url, alias), timeout=5.0)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    if status == 200:
        data = json.loads(body)
        if isinstance(data, dict):
            return data
    return f"HTTP {status}: {body[:200]!r}"


def wait_alias_online(csc_url: str, alias: str, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
    """Poll ``GET /v1/resolve/{alias}`` until it answers 200; returns its JSON."""
    last: list[str] = ["no answer"]

    def online() -> dict[str, Any] | None:
        answer = _resolve_once(csc_url, alias)
        if isinstance(answer, dict):
            return answer
        last[0] = answer
        return None

    try:
        return wait_until(online, timeout, message=f"alias {alias!r} online")
    except TimeoutError:
        raise TimeoutError(
            f"alias {alias!r} not online at {csc_url} within {scaled(timeout):.1f}s "
            f"(last: {last[0]})"
        ) from None


async def async_wait_alias_online(
    csc_url: str, alias: str, timeout: float = READY_TIMEOUT
) -> dict[str, Any]:
    """:func:`wait_alias_online` for async tests (runs the polls in a worker thread)."""
    return await asyncio.to_thread(wait_alias_online, csc_url, alias, timeout)


# --- tracking for tests --------------------------------------------------------------------


class ProcFactory:
    """Starts processes for one test, remembers them, and stops them all at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.log_dir = tmp_path / "logs"
        self.procs: list[Proc] = []

    def track(self, proc: P) -> P:
        self.procs.append(proc)
        return proc

    def csc(self, **kwargs: Any) -> CscProc:
        return self.track(start_csc(self.tmp_path, **kwargs))

    def agent(self, csc_url: str, token: str, upstream: str, **kwargs: Any) -> Proc:
        kwargs.setdefault("log_dir", self.log_dir)
        return self.track(start_agent(csc_url, token, upstream, **kwargs))

    def upstream(self, **kwargs: Any) -> UpstreamProc:
        return self.track(start_upstream(self.tmp_path, **kwargs))

    def delay_proxy(self, target: str, delay: float, **kwargs: Any) -> DelayProxyProc:
        return self.track(start_delay_proxy(self.tmp_path, target, delay, **kwargs))

    def spawn(self, name: str, argv: Sequence[str], **kwargs: Any) -> Proc:
        kwargs.setdefault("log_dir", self.log_dir)
        return self.track(Proc.spawn(name, argv, **kwargs))

    def relay(
        self,
        upstream: UpstreamProc,
        *,
        alias: str = "acme@example.com",
        tenant: str = "acme",
        sessions: int = 2,
        csc_env: Mapping[str, str] | None = None,
        agent_env: Mapping[str, str] | None = None,
        agent_args: Sequence[str] = (),
        start_agent: bool = True,
    ) -> RelayProcs:
        """A CSC process, a token for ``tenant``/``alias`` and (unless ``start_agent`` is
        false) an agent serving ``upstream``, returned once the alias resolves."""
        csc = self.csc(env=csc_env)
        token = issue_token(csc.state_dir, tenant, alias)
        relay = RelayProcs(csc, upstream, token, alias, self)
        if start_agent:
            relay.start_agent(sessions=sessions, env=agent_env, extra_args=agent_args)
        return relay

    def dump_logs(self, stream: IO[str] | None = None) -> None:
        for proc in self.procs:
            proc.dump_logs(stream)

    def stop_all(self, timeout: float = 5.0) -> None:
        """SIGTERM every tracked process (newest first), then SIGKILL what is left."""
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout)
            except TimeoutError:
                proc.kill()
                proc.wait(STOP_TIMEOUT)


class RelayProcs:
    """A relay of real processes (see :meth:`ProcFactory.relay`): CSC, upstream, agent."""

    def __init__(
        self, csc: CscProc, upstream: UpstreamProc, token: str, alias: str, factory: ProcFactory
    ) -> None:
        self.csc = csc
        self.upstream = upstream
        self.token = token
        self.alias = alias
        self.factory = factory
        self.agent: Proc | None = None

    def url(self, path: str = "/") -> str:
        """A URL through the tunnel: ``{csc}/t/{alias}/{path}``."""
        return tunnel_url(self.csc.http_url, self.alias, path)

    @property
    def resolve_url(self) -> str:
        return resolve_url(self.csc.http_url, self.alias)

    def start_agent(
        self,
        *,
        csc_url: str | None = None,
        sessions: int = 2,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        wait_online: bool = True,
    ) -> Proc:
        """Start an agent (dialing ``csc_url``, default the CSC itself) and by default wait
        until the alias resolves."""
        self.agent = self.factory.agent(
            csc_url or self.csc.http_url,
            self.token,
            self.upstream.http_url,
            sessions=sessions,
            env=env,
            extra_args=extra_args,
        )
        if wait_online:
            try:
                wait_alias_online(self.csc.http_url, self.alias)
            except TimeoutError as exc:
                raise ProcError(f"{exc}\n{self.agent.describe()}") from None
        return self.agent
