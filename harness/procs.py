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

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Self, TypeVar

import psutil

from harness.readyfile import parse_hostport, read_ready_file

REPO_ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
LOG_TAIL_CHARS = 6000
#: How Python starts the report of an exception nobody caught (or one logged with its stack).
TRACEBACK = "Traceback (most recent call last)"

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

    def tracebacks(self, context: int = 1500) -> list[str]:
        """Each Python traceback in the process's whole stdout and stderr, with ``context``
        characters after its start (a JSON log line carries it on one line)."""
        found = []
        for path in (self.stdout_path, self.stderr_path):
            try:
                text = path.read_bytes().decode("utf-8", "replace")
            except OSError:
                continue
            at = text.find(TRACEBACK)
            while at >= 0:
                found.append(f"{self.name} pid {self.pid} ({path.name}): {text[at : at + context]}")
                at = text.find(TRACEBACK, at + 1)
        return found

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
    launcher: Sequence[str] = (),
    **flags: FlagValue,
) -> CscProc:
    """Start ``python -m csc serve`` and wait until it is listening.

    ``state_dir`` defaults to ``tmp_path / "csc-state"`` (shared by CSCs of one test, so a
    restarted CSC keeps its keys); the admin API and ``/metrics`` listen on free ports (``"off"``: none);
    ``launcher`` is a command that execs the rest (``prlimit --nofile=256:``); other keyword
    arguments become flags (see :func:`flag_args`).
    """
    state = state_dir if state_dir is not None else tmp_path / "csc-state"
    state.mkdir(mode=0o700, parents=True, exist_ok=True)  # csc serve refuses an open one
    ready = tmp_path / f"csc-{next(_names)}.ready.json"
    argv = [*launcher, sys.executable, "-m", "csc", "serve"]
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
    sessions: int | str = 2,
    extra_args: Sequence[str] = (),
    *,
    log_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    launcher: Sequence[str] = (),
) -> Proc:
    """Start ``python -m tenant_agent``; it is ready once its alias resolves
    (see :func:`wait_alias_online`). Logs go to ``log_dir`` (default: a new temp dir);
    ``launcher`` is a command that execs the rest, as for :func:`start_csc`."""
    argv = [*launcher, sys.executable, "-m", "tenant_agent"]
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
