"""The whole provisioning stack as real processes, for end-to-end tests and ``python -m demo``.

:func:`start_stack` starts, all on 127.0.0.1 with ports the OS picks and state under one scratch
directory:

* ``csc serve`` (:func:`harness.procs.start_csc`), with an agent token issued for tenant
  ``acme`` and alias ``acme@example.com`` (``csc token issue --assign``: the alias is assigned to
  the tenant first);
* ``csc-portal serve`` on a state directory filled beforehand by a seed function (usually the
  catalog of :mod:`harness.catalog`);
* ``csc-agent`` dialling out to the CSC with the portal as its upstream, ready once the alias
  resolves;
* ``csc-agent proxy``, the local/DMZ proxy in front of the same portal.

Processes are started through a :class:`~harness.procs.ProcFactory`, so they are tracked,
stopped by PID and their logs dumped when a test fails. :func:`run_bootloader` runs
``csc-bootloader`` as a real process (password in ``CSC_BOOTLOADER_PASSWORD``, never on the
command line, stdin not a terminal), :func:`start_bootloader` starts one without waiting and
:func:`run_bootloader_on_terminal` answers its questions on a pseudo-terminal.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.factory import ProcFactory
from harness.procs import REPO_ROOT, CscProc, Proc, ProcError, child_env, issue_token, scaled
from harness.readyfile import parse_hostport
from harness.waiting import resolve_url, tunnel_url, wait_alias_online

TENANT = "acme"
ALIAS = "acme@example.com"
PORTAL_NAME = "Acme Ltd"
BOOTLOADER_TIMEOUT = 120.0


class PortalProc(Proc):
    """A ``csc-portal serve`` process: ``url``."""

    ready_path: Path

    @property
    def url(self) -> str:
        return f"http://{self.ready['http']}"


class ProxyProc(Proc):
    """A ``csc-agent proxy`` process: ``addr`` (host, port) and ``url``."""

    ready_path: Path

    @property
    def addr(self) -> tuple[str, int]:
        return parse_hostport(self.ready["listen"])

    @property
    def url(self) -> str:
        return f"http://{self.ready['listen']}"


def portal_env(
    state_dir: Path, *, hash_cost: str = "test", extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``CSC_PORTAL_*`` settings of a portal on ``state_dir`` (``test``: fast argon2)."""
    return {
        "CSC_PORTAL_STATE_DIR": str(state_dir),
        "CSC_PORTAL_PASSWORD_HASH_COST": hash_cost,
        "CSC_PORTAL_NAME": PORTAL_NAME,
        "CSC_PORTAL_LOG_FORMAT": "text",
        **(extra or {}),
    }


def spawn_portal(factory: ProcFactory, env: Mapping[str, str], *, wait: bool = True) -> PortalProc:
    """``python -m portal serve`` on 127.0.0.1 port 0 (``wait``: until its ready file appears)."""
    ready = factory.tmp_path / f"portal-{len(factory.procs)}.ready.json"
    argv = [sys.executable, "-m", "portal", "serve", "--listen", "127.0.0.1:0"]
    argv += ["--ready-file", str(ready)]
    proc = factory.track(
        PortalProc.spawn(
            "portal", argv, log_dir=factory.log_dir, env=env, ready_file=ready if wait else None
        )
    )
    proc.ready_path = ready
    return proc


def spawn_dmz_proxy(
    factory: ProcFactory, upstream: str, *, wait: bool = True, log_level: str = "warning"
) -> ProxyProc:
    """``python -m tenant_agent proxy`` on 127.0.0.1 port 0 in front of ``upstream``."""
    ready = factory.tmp_path / f"proxy-{len(factory.procs)}.ready.json"
    argv = [sys.executable, "-m", "tenant_agent", "proxy", "--listen", "127.0.0.1:0"]
    argv += ["--upstream", upstream, "--ready-file", str(ready), "--log-level", log_level]
    proc = factory.track(
        ProxyProc.spawn("proxy", argv, log_dir=factory.log_dir, ready_file=ready if wait else None)
    )
    proc.ready_path = ready
    return proc


@dataclass
class BootRun:
    """The outcome of one ``csc-bootloader`` process."""

    argv: list[str]
    code: int
    out: str
    err: str

    @property
    def line(self) -> str:
        """The last line on stderr (a failure's one-line message)."""
        lines = self.err.strip().splitlines()
        return lines[-1] if lines else ""

    def __str__(self) -> str:
        return (
            f"csc-bootloader exited {self.code}: {' '.join(self.argv)}\n"
            f"--- stdout:\n{self.out}\n--- stderr:\n{self.err}"
        )


def bootloader_argv(args: Sequence[str], target: Path, pyz: Path | None = None) -> list[str]:
    """``python -m bootloader`` (or ``python PYZ``, the zipapp of a get site) ARGS --target."""
    program = [str(pyz)] if pyz is not None else ["-m", "bootloader"]
    return [sys.executable, *program, *args, "--target", str(target)]


def bootloader_env(password: str | None) -> dict[str, str]:
    env = child_env({"CSC_BOOTLOADER_PASSWORD": password or ""})
    env.pop("CSC_BOOTLOADER_CSC", None)
    return env


def run_bootloader(
    args: Sequence[str],
    target: Path,
    *,
    password: str | None,
    timeout: float = BOOTLOADER_TIMEOUT,
    pyz: Path | None = None,
) -> BootRun:
    """Run ``csc-bootloader ARGS --target TARGET`` to completion (stdin: /dev/null)."""
    argv = bootloader_argv(args, target, pyz)
    done = subprocess.run(
        argv,
        cwd=REPO_ROOT,
        env=bootloader_env(password),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=scaled(timeout),
        check=False,
    )
    return BootRun(argv, done.returncode, done.stdout, done.stderr)


def start_bootloader(
    args: Sequence[str], target: Path, *, password: str | None, log_dir: Path
) -> subprocess.Popen[bytes]:
    """Start ``csc-bootloader`` without waiting; stdout and stderr go to files in ``log_dir``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "bootloader.out", "wb") as out, open(log_dir / "bootloader.err", "wb") as e:
        return subprocess.Popen(
            bootloader_argv(args, target),
            cwd=REPO_ROOT,
            env=bootloader_env(password),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=e,
        )


def run_bootloader_on_terminal(
    args: Sequence[str],
    target: Path,
    answers: Sequence[tuple[str, str]],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = BOOTLOADER_TIMEOUT,
) -> BootRun:
    """Run ``csc-bootloader`` on a pseudo-terminal, typing each answer once the terminal shows
    its prompt (``(prompt ending, answer)``, in order); ``out`` is everything the terminal
    showed. Unanswered prompts end in a timeout, reported as exit status -1."""
    argv = bootloader_argv(args, target)
    pid, fd = pty.fork()
    if pid == 0:  # the child: the bootloader with the terminal as stdin, stdout and stderr
        os.chdir(REPO_ROOT)
        os.execve(sys.executable, argv, {**bootloader_env(None), **(env or {})})
    pending = [(prompt.encode(), answer) for prompt, answer in answers]
    seen = b""
    deadline = time.monotonic() + scaled(timeout)
    timed_out = True
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            chunk = _read_terminal(fd) if ready else b""
            if ready and not chunk:
                timed_out = False  # the bootloader closed the terminal: it has exited
                break
            seen += chunk
            if pending and seen.rstrip(b" ").endswith(pending[0][0].rstrip(b" ")):
                os.write(fd, pending.pop(0)[1].encode() + b"\n")
    finally:
        if timed_out:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    code = -1 if timed_out else os.waitstatus_to_exitcode(status)
    return BootRun(argv, code, seen.decode(errors="replace"), "")


def _read_terminal(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # EIO: the other side of the terminal is closed
        return b""


@dataclass
class Stack:
    """CSC, portal, agent and DMZ proxy of one scratch directory (see the module docstring)."""

    root: Path
    procs: ProcFactory
    csc: CscProc
    portal: PortalProc
    proxy: ProxyProc
    token: str
    env: dict[str, str]
    agent: Proc | None = None
    alias: str = ALIAS

    @property
    def portal_state(self) -> Path:
        return Path(self.env["CSC_PORTAL_STATE_DIR"])

    @property
    def resolve_url(self) -> str:
        return resolve_url(self.csc.http_url, self.alias)

    def tunnel_url(self, path: str = "/") -> str:
        return tunnel_url(self.csc.http_url, self.alias, path)

    def start_agent(self, *, wait_online: bool = True) -> Proc:
        """Start (or restart) the tenant agent, by default until the alias resolves."""
        self.agent = self.procs.agent(
            self.csc.http_url,
            self.token,
            self.portal.url,
            env={"CSC_AGENT_LOG_LEVEL": "warning"},
        )
        if wait_online:
            try:
                wait_alias_online(self.csc.http_url, self.alias)
            except TimeoutError as exc:
                raise ProcError(f"{exc}\n{self.agent.describe()}") from None
        return self.agent

    def sms(self, *args: str) -> str:
        """The SMS that ``csc-portal sms ARGS`` prints (a real process), get site in the tunnel."""
        env = {**self.env, "CSC_PORTAL_GET_URL": self.tunnel_url("get/")}
        done = subprocess.run(
            [sys.executable, "-m", "portal", "sms", *args],
            cwd=REPO_ROOT,
            env=child_env(env),
            capture_output=True,
            text=True,
            timeout=scaled(30),
            check=False,
        )
        if done.returncode != 0:
            raise ProcError(f"csc-portal sms failed ({done.returncode}): {done.stderr}")
        return done.stdout.strip()

    def bootloader(
        self,
        args: Sequence[str],
        target: Path,
        *,
        password: str | None,
        timeout: float = BOOTLOADER_TIMEOUT,
        pyz: Path | None = None,
    ) -> BootRun:
        return run_bootloader(args, target, password=password, timeout=timeout, pyz=pyz)


def start_stack(
    procs: ProcFactory,
    root: Path,
    seed: Callable[[dict[str, str]], object],
    *,
    hash_cost: str = "test",
) -> Stack:
    """Seed a portal state directory under ``root`` with ``seed(env)``, then start CSC, portal,
    agent and DMZ proxy (the CSC and the portal start in parallel)."""
    env = portal_env(root / "portal-state", hash_cost=hash_cost)
    seed(env)
    portal = spawn_portal(procs, env, wait=False)
    csc = procs.csc(state_dir=root / "csc-state", env={"CSC_LOG_LEVEL": "warning"})
    portal.ready = portal.wait_ready_file(portal.ready_path)
    proxy = spawn_dmz_proxy(procs, portal.url, wait=False)
    token = issue_token(csc.state_dir, TENANT, ALIAS)
    stack = Stack(root, procs, csc, portal, proxy, token, env)
    stack.start_agent(wait_online=False)
    proxy.ready = proxy.wait_ready_file(proxy.ready_path)
    wait_alias_online(csc.http_url, ALIAS)
    return stack
