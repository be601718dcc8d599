"""``python -m demo``: the whole relay on this machine, step by step.

Starts a stand-in portal (the test upstream), ``csc serve`` with a temporary state directory,
issues an agent token for tenant ``acme`` and alias ``acme@example.com``, starts the tenant
agent, waits until the alias resolves, then sends a bootloader's requests through the tunnel:
``GET /t/acme@example.com/echo/hello``, a 10 MiB download checked against its SHA-256, and a
raw TCP ``CONNECT`` to the echo server. Finally every process gets SIGTERM and must exit 0.

Exit status: 0 when every step succeeded; 1 with a message naming the failed step (and the
tails of the processes' logs) otherwise. Everything listens on 127.0.0.1, on ports the OS picks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.support.procs import (
    CscProc,
    Proc,
    ProcError,
    UpstreamProc,
    http_request,
    issue_token,
    scaled,
    start_agent,
    start_csc,
    start_upstream,
    tunnel_url,
    wait_alias_online,
)
from tests.support.upstream import expected_sha256

TENANT = "acme"
ALIAS = "acme@example.com"
DOWNLOAD = 10 * 1024 * 1024
SHOWN_HEADERS = ("Host", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Request-Id")


class DemoFailure(Exception):
    """A step did not do what it should; the message says what happened."""


class Demo:
    """The processes of the demo and the steps that use them."""

    def __init__(self, workdir: Path, use_tcp: bool) -> None:
        self.workdir = workdir
        self.use_tcp = use_tcp
        self.upstream: UpstreamProc | None = None
        self.csc: CscProc | None = None
        self.agent: Proc | None = None
        self.token = ""

    @property
    def procs(self) -> list[Proc]:
        return [p for p in (self.agent, self.csc, self.upstream) if p is not None]

    def url(self, path: str) -> str:
        assert self.csc is not None
        return tunnel_url(self.csc.http_url, ALIAS, path)

    # steps: each returns a one-line result

    def start_upstream(self) -> str:
        self.upstream = start_upstream(self.workdir)
        return f"HTTP {self.upstream.http_url}, TCP echo {_addr(self.upstream.tcp_echo_addr)}"

    def start_csc(self) -> str:
        self.csc = start_csc(self.workdir, state_dir=self.workdir / "csc-state")
        return f"HTTP {self.csc.http_url}, TCP ingress {_addr(self.csc.tcp_addr)}"

    def issue_token(self) -> str:
        assert self.csc is not None
        self.token = issue_token(self.csc.state_dir, TENANT, [ALIAS], ttl="1d")
        return f"tenant {TENANT!r}, alias {ALIAS!r}: {self.token[:16]}... ({len(self.token)} chars)"

    def start_agent(self) -> str:
        assert self.csc is not None and self.upstream is not None
        tcp = _addr(self.upstream.tcp_echo_addr) if self.use_tcp else None
        self.agent = start_agent(
            self.csc.http_url,
            self.token,
            self.upstream.http_url,
            tcp_upstream=tcp,
            log_dir=self.workdir / "logs",
        )
        answer = wait_alias_online(self.csc.http_url, ALIAS)
        return f"pid {self.agent.pid}; GET /v1/resolve/{ALIAS} -> {json.dumps(answer)}"

    def echo_request(self) -> str:
        status, _, body = http_request(self.url("/echo/hello?from=demo"))
        if status != 200:
            raise DemoFailure(f"expected 200, got {status}: {body[:300]!r}")
        echo = json.loads(body)
        if echo.get("path") != "/echo/hello":
            raise DemoFailure(f"the portal saw path {echo.get('path')!r}, not '/echo/hello'")
        seen = {name.lower(): value for name, value in echo["headers"]}
        lines = [f"200; the portal saw {echo['method']} {echo['path']}?{echo['query']}"]
        lines += [f"      {name}: {seen.get(name.lower(), '(not set)')}" for name in SHOWN_HEADERS]
        return "\n".join(lines)

    def download(self) -> str:
        url = self.url(f"/bytes/{DOWNLOAD}")
        started = time.monotonic()
        digest, size = _download_sha256(url)
        elapsed = time.monotonic() - started
        expected = expected_sha256(DOWNLOAD)
        if (size, digest) != (DOWNLOAD, expected):
            raise DemoFailure(f"got {size} bytes with SHA-256 {digest}, expected {expected}")
        return f"{size} bytes in {elapsed:.2f}s ({size / elapsed / 1e6:.0f} MB/s), SHA-256 {digest[:16]}... ok"

    def tcp_connect(self) -> str:
        assert self.csc is not None
        payload = b"hello over the raw TCP ingress"
        reply, echoed = _tcp_roundtrip(self.csc.tcp_addr, ALIAS, payload)
        if reply != b"OK\r\n":
            raise DemoFailure(f"CONNECT answered {reply!r}")
        if echoed != payload:
            raise DemoFailure(f"the echo server sent back {echoed!r}")
        return f"CONNECT {ALIAS} -> OK; sent {len(payload)} bytes, half-closed, got them back"

    def stop_all(self) -> str:
        codes = {}
        for proc in self.procs:  # agent first, upstream last
            proc.terminate()
            codes[proc.name] = proc.wait(15)
        bad = {name: code for name, code in codes.items() if code != 0}
        if bad:
            raise DemoFailure(f"non-zero exit status after SIGTERM: {bad}")
        return ", ".join(f"{name} exited {code}" for name, code in codes.items())

    def kill_leftovers(self) -> None:
        for proc in self.procs:
            if proc.running:
                proc.stop(5)


def _addr(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


def _download_sha256(url: str) -> tuple[str, int]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    digest, size = hashlib.sha256(), 0
    with opener.open(url, timeout=scaled(60)) as resp:
        if resp.status != 200:
            raise DemoFailure(f"download answered {resp.status}")
        while chunk := resp.read(256 * 1024):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _tcp_roundtrip(addr: tuple[str, int], alias: str, payload: bytes) -> tuple[bytes, bytes]:
    """``CONNECT alias``; returns the reply line and what came back after sending ``payload``."""
    with socket.create_connection(addr, timeout=scaled(10)) as sock:
        sock.sendall(f"CONNECT {alias}\r\n".encode())
        reply = b""
        while not reply.endswith(b"\n"):
            data = sock.recv(1)
            if not data:
                break
            reply += data
        if reply != b"OK\r\n":
            return reply, b""
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        echoed = b""
        while data := sock.recv(65536):
            echoed += data
    return reply, echoed


def _run_steps(steps: Sequence[tuple[str, Callable[[], str]]]) -> None:
    for number, (title, step) in enumerate(steps, 1):
        print(f"[{number}/{len(steps)}] {title} ...", flush=True)
        try:
            result = step()
        except (DemoFailure, ProcError, TimeoutError, OSError, ValueError, KeyError) as exc:
            raise DemoFailure(f"step {number} ({title}) failed: {exc}") from exc
        print(f"      {result}", flush=True)


def _hold(demo: Demo) -> None:
    assert demo.csc is not None
    print("\nThe relay is running. Try:")
    print(f"  curl -s '{demo.url('/echo/hello')}'")
    if demo.use_tcp:
        host, port = demo.csc.tcp_addr
        print(f"  printf 'CONNECT {ALIAS}\\r\\nhello\\n' | nc -q1 {host} {port}")
    print("Press Ctrl-C to stop.", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    print()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n")[0])
    parser.add_argument("--no-tcp", action="store_true", help="skip the raw TCP ingress step")
    parser.add_argument("--hold", action="store_true", help="keep running until Ctrl-C")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="csc-demo-") as tmp:
        demo = Demo(Path(tmp), use_tcp=not args.no_tcp)
        setup: list[tuple[str, Callable[[], str]]] = [
            ("Start the stand-in portal (tests.support.upstream)", demo.start_upstream),
            ("Start the switching center (csc serve)", demo.start_csc),
            ("Issue an agent token (csc token issue)", demo.issue_token),
            ("Start the tenant agent and wait for the alias", demo.start_agent),
            (f"GET /t/{ALIAS}/echo/hello through the tunnel", demo.echo_request),
            (f"Download {DOWNLOAD // (1024 * 1024)} MiB through the tunnel", demo.download),
        ]
        if demo.use_tcp:
            setup.append((f"Raw TCP: CONNECT {ALIAS} on the TCP ingress", demo.tcp_connect))
        try:
            _run_steps(setup)
            if args.hold:
                _hold(demo)
            _run_steps([("Stop everything with SIGTERM", demo.stop_all)])
        except DemoFailure as exc:
            print(f"\nDEMO FAILED: {exc}\n", file=sys.stderr)
            for proc in demo.procs:
                proc.dump_logs(sys.stderr)
            return 1
        finally:
            demo.kill_leftovers()
    print("\nDemo succeeded: the bootloader reached the portal through the alias.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
