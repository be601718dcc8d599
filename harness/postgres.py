"""A real PostgreSQL server for tests and the benchmark, from Debian's binaries (``/usr/lib/postgresql/<v>/bin``).

:class:`PostgresServer` runs ``initdb`` once and ``pg_ctl start`` on a free loopback TCP port
(no unix socket in a shared place; ``fsync`` off for speed; trust authentication, loopback
only). As root it runs as the ``postgres`` user (``initdb`` refuses root) in a directory of
its own under the system temp dir (pytest's tmp dirs are root's 0700), else as the current
user. It is stopped by the PID in ``postmaster.pid`` and can be started again on the same port.

The pytest fixtures over it (``postgres_server``, ``postgres_url``) are in
``tests/support/postgres.py``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg

from harness.procs import scaled

PG_ROOT = Path("/usr/lib/postgresql")
SUPERUSER = "postgres"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def find_bin_dir() -> Path | None:
    """The ``bin`` directory of the newest installed PostgreSQL (None: none installed)."""
    found: list[tuple[tuple[int, ...], Path]] = []
    for initdb in PG_ROOT.glob("*/bin/initdb"):
        version = initdb.parent.parent.name
        if re.fullmatch(r"\d+(\.\d+)*", version):
            found.append((tuple(int(p) for p in version.split(".")), initdb.parent))
    return max(found)[1] if found else None


MISSING = f"no PostgreSQL server in {PG_ROOT}/*/bin (apt-get install postgresql)"


class PostgresMissing(RuntimeError):
    """No PostgreSQL server binaries are installed."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_gone(proc: psutil.Process, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.01)  # polling the process's state until the deadline
    return False


class PostgresServer:
    """One PostgreSQL cluster in a private directory; :meth:`start` / :meth:`stop` by PID."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.as_postgres = os.getuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="csc-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self.pid: int | None = None
        if self.as_postgres:
            entry = pwd.getpwnam(SUPERUSER)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                  "--no-locale", "--no-sync")  # fmt: skip

    def _run(self, program: str, *args: str) -> None:
        argv = [str(self.bin_dir / program), *args]
        if self.as_postgres:
            argv = ["runuser", "-u", SUPERUSER, "--", *argv]
        done = subprocess.run(
            argv, cwd=self.root, capture_output=True, text=True, timeout=scaled(START_TIMEOUT)
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{program} failed ({done.returncode}): {done.stderr.strip()}\n{self.log_tail()}"
            )

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def start(self, port: int | None = None) -> None:
        """Start on ``port`` (default: the last one, else a free one); returns when it accepts.
        A free port taken by someone else meanwhile is replaced by another, twice at most."""
        if port or self.port:
            self._start(port or self.port)
            return
        for attempt in (1, 2, 3):
            try:
                self._start(free_port())
                return
            except RuntimeError:
                if attempt == 3 or "already in use" not in self.log_tail():
                    raise

    def _start(self, port: int) -> None:
        self.port = port
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        self._run("pg_ctl", "start", "-w", "-t", str(int(scaled(START_TIMEOUT))),
                  "-D", str(self.data), "-l", str(self.log), "-o", options)  # fmt: skip
        first_line = (self.data / "postmaster.pid").read_text().split("\n", 1)[0]
        self.pid = int(first_line)

    def stop(self) -> None:
        """Fast shutdown by PID (SIGINT), then SIGKILL if it lingers; returns once it exited
        (a zombie counts: whoever adopted the daemon reaps it in its own time)."""
        pid, self.pid = self.pid, None
        if pid is None:
            return
        try:
            proc = psutil.Process(pid)
            proc.send_signal(signal.SIGINT)
            if not _wait_gone(proc, scaled(STOP_TIMEOUT)):
                proc.kill()
                _wait_gone(proc, scaled(STOP_TIMEOUT))
        except psutil.NoSuchProcess:
            return

    def url(self, database: str = "postgres", password: str | None = None) -> str:
        secret = f":{password}" if password else ""
        return f"postgresql://{SUPERUSER}{secret}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its name."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_postgres(bin_dir: Path | None = None) -> Iterator[PostgresServer]:
    """A started server of its own for the block (a test that stops and restarts it);
    :class:`PostgresMissing` when none is installed."""
    bin_dir = bin_dir or find_bin_dir()
    if bin_dir is None:
        raise PostgresMissing(MISSING)
    server = PostgresServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.close()
