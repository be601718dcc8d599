"""Many idle agent sessions on one CSC: memory per session, heartbeat CPU at rest, reconnection.

Creates ``--sessions`` / 2 tenants (one alias and one agent token each, two sessions per
tenant, as an agent's default) in a fresh state directory through the CSC's own store, the way
``csc token issue --assign`` does, then starts ``csc serve`` as a subprocess on loopback and
connects every session from this one asyncio process, speaking the agent protocol over
WebSocket (docs/protocol.md: HELLO, WELCOME, answering PINGs and sending one every
``heartbeat_interval``, as the agent does). It reports:

* **RSS per session**: the CSC's RSS once all sessions are up, less its RSS before the first
  one, divided by the number of sessions;
* **heartbeat CPU at rest**: the CSC's user+system CPU over an idle window (``--idle``, 30 s),
  as % of one core (and this process's, which answers the same heartbeats);
* **reconnection after a restart**: the CSC is killed (SIGKILL) and started again on the same
  port and state directory; the time until every session has its WELCOME again, from the kill
  and from the new process's ready file. Sessions redial with a jittered backoff (50 ms
  doubling to 1 s), as agents would.
* **CPU per handshake**: the CSC's user+system CPU while the sessions connect (from nothing,
  and after the restart from the ready file on), divided by the number of sessions: steadier
  than the times on a shared machine, and not bounded by this one client process.

RLIMIT_NOFILE's soft limit is raised to the hard limit here; the CSC inherits it. Every phase
has a deadline; everything is on 127.0.0.1. A benchmark, not a test: it exits 0 unless a
measurement fails. ``--record`` appends the report to bench/RESULTS.md.

Usage: ``python bench/sessions.py [--sessions 10000] [--idle 30] [--record]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

import aiohttp  # noqa: E402
import psutil  # noqa: E402

from bench import refs  # noqa: E402
from bench.datapath import require_own_build  # noqa: E402
from bench.report import machine_info  # noqa: E402
from csc.cli import local_actor  # noqa: E402
from csc.config import load_csc_config  # noqa: E402
from csc.relay.conncap import node_bound  # noqa: E402
from csc.signing import signing_key  # noqa: E402
from csc.store import open_store  # noqa: E402
from harness.procs import CscProc, scaled, start_csc  # noqa: E402
from shared.config import AUTO  # noqa: E402
from shared.protocol.codec import (  # noqa: E402
    FLAG_ACK,
    VERSION,
    FrameDecoder,
    FrameType,
    decode_json,
    encode_frame,
    encode_json,
)

RESULTS_FILE = _REPO_ROOT / "bench" / "RESULTS.md"
MiB = 1024 * 1024
CONNECT_PARALLEL = 256  # handshakes in flight at once
PHASE_TIMEOUT = 600.0  # any phase (connect all, reconnect all), scaled
HELLO = {
    "version": VERSION,
    "settings": {"initial_window": 262144, "max_frame": 262144, "max_streams": 1024},
    "agent": "csc-bench-sessions/1",
}


def log(message: str) -> None:
    print(f"[sessions] {message}", file=sys.stderr, flush=True)


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def create_tenants(state_dir: Path, tenants: int) -> list[str]:
    """One tenant, alias and token each, in the store of ``state_dir``; the tokens."""
    config = load_csc_config(file=None, env={}, overrides={"state_dir": state_dir})
    store = open_store(config)
    try:
        key = signing_key(config, store).key
        tokens = []
        for i in range(tenants):
            token, _ = store.issue_token(
                key,
                tenant=f"t{i:05d}",
                grants=[f"t{i:05d}@bench.example"],
                ttl=86400.0,
                audience=config.token_audience,
                issuer=config.token_issuer,
                actor=local_actor(),
                assign=True,
            )
            tokens.append(token)
        return tokens
    finally:
        store.close()


class Fleet:
    """The agent sessions: each dials, says HELLO, waits for WELCOME, then keeps the link
    alive (answers PINGs, sends one every heartbeat interval) and redials when it drops."""

    def __init__(self, url: str, tokens: list[str], per_tenant: int) -> None:
        self.url = url
        self.tokens = tokens
        self.per_tenant = per_tenant
        self.up = 0  # sessions that have their WELCOME
        self.changed = asyncio.Event()
        self.gate = asyncio.Semaphore(CONNECT_PARALLEL)
        self.tasks: list[asyncio.Task[None]] = []
        self.refusals: dict[str, int] = {}
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            timeout=aiohttp.ClientTimeout(total=None, connect=30),
        )

    def start(self) -> None:
        for token in self.tokens:
            for _ in range(self.per_tenant):
                self.tasks.append(asyncio.create_task(self._session(token)))

    async def wait_up(self, count: int, timeout: float, *, down: bool = False) -> None:
        """Until ``count`` sessions are up (``down``: at most ``count``)."""
        deadline = time.monotonic() + scaled(timeout)
        while (self.up > count) if down else (self.up < count):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.up} of {count} sessions up; refusals {self.refusals}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 1.0))

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.http.close()

    def _note(self, reason: str) -> None:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1

    async def _session(self, token: str) -> None:
        backoff = 0.05
        while True:
            welcomed = False
            try:
                async with self.gate:
                    ws = await self.http.ws_connect(
                        f"{self.url}/v1/agent/connect",
                        headers={"Authorization": f"Bearer {token}"},
                        autoping=True,
                        max_msg_size=0,
                    )
                async with ws:
                    await ws.send_bytes(encode_frame(FrameType.HELLO, 0, 0, encode_json(HELLO)))
                    welcomed = await self._run(ws)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self._note(type(exc).__name__)
            finally:
                if welcomed:
                    self.up -= 1
                    self.changed.set()
                    backoff = 0.05
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, 1.0)

    async def _run(self, ws: aiohttp.ClientWebSocketResponse) -> bool:
        """Until the link ends; whether it got its WELCOME."""
        decoder = FrameDecoder(262144)
        welcomed = False
        pinger: asyncio.Task[None] | None = None
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                for frame in decoder.feed(msg.data):
                    if frame.type == FrameType.PING and not frame.flags & FLAG_ACK:
                        await ws.send_bytes(
                            encode_frame(FrameType.PING, FLAG_ACK, 0, bytes(frame.payload))
                        )
                    elif frame.type == FrameType.WELCOME and not welcomed:
                        welcome = decode_json(frame.payload, "WELCOME")
                        welcomed = True
                        self.up += 1
                        self.changed.set()
                        interval = float(welcome.get("heartbeat_interval", 10.0))
                        pinger = asyncio.create_task(self._ping(ws, interval))
            if ws.close_code not in (None, 1000, 1001, 1006):
                self._note(f"close {ws.close_code}")
        finally:
            if pinger is not None:
                pinger.cancel()
        return welcomed

    async def _ping(self, ws: aiohttp.ClientWebSocketResponse, interval: float) -> None:
        await asyncio.sleep(interval * random.random())  # spread, as sessions start at once
        while not ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_bytes(encode_frame(FrameType.PING, 0, 0, random.randbytes(8)))
            await asyncio.sleep(interval)


def cpu_of(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    sessions = args.sessions - args.sessions % 2
    state_dir = workdir / "csc-state"
    state_dir.mkdir(mode=0o700)
    started = time.monotonic()
    tokens = create_tenants(state_dir, sessions // 2)
    log(f"{len(tokens)} tenants and tokens in {time.monotonic() - started:.1f}s")
    port = refs.free_port()
    listen = f"127.0.0.1:{port}"
    csc: CscProc = start_csc(workdir, state_dir=state_dir, listen=listen, tcp_listen=None)
    require_own_build("csc serve", csc.pid, _REPO_ROOT)
    fleet = Fleet(f"http://{listen}", tokens, 2)
    result: dict[str, Any] = {"sessions": sessions}
    try:
        await asyncio.sleep(args.settle)
        rss_before = csc.rss()
        started, cpu_before = time.monotonic(), cpu_of(csc.pid)
        fleet.start()
        await fleet.wait_up(sessions, PHASE_TIMEOUT)
        result["connect_s"] = time.monotonic() - started
        result["connect_cpu_us"] = (cpu_of(csc.pid) - cpu_before) / sessions * 1e6
        log(f"{sessions} sessions up in {result['connect_s']:.1f}s")
        await asyncio.sleep(args.settle)
        rss_after = csc.rss()
        result["rss_before_mib"] = rss_before / MiB
        result["rss_after_mib"] = rss_after / MiB
        result["rss_per_session_kib"] = (rss_after - rss_before) / sessions / 1024
        log(f"idle for {args.idle:.0f}s (CSC pid {csc.pid}, e.g. for py-spy)")
        csc_cpu, own_cpu, wall = cpu_of(csc.pid), cpu_of(psutil.Process().pid), time.monotonic()
        await asyncio.sleep(args.idle)
        wall = time.monotonic() - wall
        result["idle_s"] = wall
        result["csc_idle_cpu_pct"] = (cpu_of(csc.pid) - csc_cpu) / wall * 100
        result["client_idle_cpu_pct"] = (cpu_of(psutil.Process().pid) - own_cpu) / wall * 100
        result["still_up"] = fleet.up
        log("killing the CSC (SIGKILL) and starting it again on the same port")
        killed = time.monotonic()
        csc.kill()
        await asyncio.to_thread(csc.wait, 30)
        await fleet.wait_up(0, PHASE_TIMEOUT, down=True)  # every session saw its link end
        result["all_down_s"] = time.monotonic() - killed
        csc = await asyncio.to_thread(
            start_csc, workdir, state_dir=state_dir, listen=listen, tcp_listen=None
        )
        ready, cpu_before = time.monotonic(), cpu_of(csc.pid)
        require_own_build("csc serve (restarted)", csc.pid, _REPO_ROOT)
        await fleet.wait_up(sessions, PHASE_TIMEOUT)
        done = time.monotonic()
        result["reconnect_cpu_us"] = (cpu_of(csc.pid) - cpu_before) / sessions * 1e6
        result["restart_ready_s"] = ready - killed
        result["reconnect_from_kill_s"] = done - killed
        result["reconnect_from_ready_s"] = done - ready
        result["refusals"] = dict(fleet.refusals)
        log(f"all {sessions} sessions back {done - killed:.1f}s after the kill")
    except BaseException:
        csc.dump_logs(sys.stderr)
        raise
    finally:
        await fleet.close()
        csc.stop()
    return result


def render(args: argparse.Namespace, r: dict[str, Any], nofile: int) -> str:
    info = machine_info()
    return "\n".join(
        [
            f"## {info['date']}: {r['sessions']:,} idle agent sessions (bench/sessions.py)",
            "",
            f"- machine: {info['cpu']}, {info['cores']} cores, {info['os']}",
            f"- software: {info['python']}, commit {info['commit']}",
            f"- settings: {r['sessions'] // 2:,} tenants x 2 sessions, one client process, "
            f"idle window {args.idle:.0f} s, RLIMIT_NOFILE {nofile}",
            "",
            "| figure | value |",
            "|---|---:|",
            f"| all sessions connected (from nothing) | {r['connect_s']:.1f} s |",
            f"| CSC CPU per session connected (from nothing) | {r['connect_cpu_us']:,.0f} µs |",
            f"| CSC RSS before / with all sessions | {r['rss_before_mib']:.1f} / "
            f"{r['rss_after_mib']:.1f} MiB |",
            f"| CSC RSS per session | {r['rss_per_session_kib']:.1f} KiB |",
            f"| CSC CPU at rest (heartbeats) | {r['csc_idle_cpu_pct']:.1f} % of a core |",
            f"| client CPU at rest (same heartbeats) | {r['client_idle_cpu_pct']:.1f} % of a core |",
            f"| sessions still up after the idle window | {r['still_up']:,} |",
            f"| every session saw its link end after the kill | {r['all_down_s']:.1f} s |",
            f"| CSC restart: kill to ready file | {r['restart_ready_s']:.1f} s |",
            f"| all sessions back: from the kill | {r['reconnect_from_kill_s']:.1f} s |",
            f"| all sessions back: from the new CSC's ready file | "
            f"{r['reconnect_from_ready_s']:.1f} s |",
            f"| CSC CPU per session back (from its ready file) | {r['reconnect_cpu_us']:,.0f} µs |",
            "",
            f"Failed dials and closes seen by the sessions (mostly while the CSC was down): "
            f"{r['refusals'] or 'none'}.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=10_000, help="sessions (10000)")
    parser.add_argument("--idle", type=float, default=30.0, help="idle window, s (30)")
    parser.add_argument("--settle", type=float, default=2.0, help="s before each RSS sample")
    parser.add_argument("--record", action="store_true", help=f"append to {RESULTS_FILE.name}")
    args = parser.parse_args(argv)
    if args.sessions < 2 or args.idle <= 0:
        parser.error("--sessions must be at least 2 and --idle positive")
    nofile = raise_nofile()
    # the CSC inherits the limit; `max_connections = auto` keeps an eighth of it for the rest
    bound = node_bound(AUTO)
    if nofile < args.sessions + 1000 or (bound is not None and bound < args.sessions + 256):
        parser.error(f"RLIMIT_NOFILE hard limit {nofile} is too low for {args.sessions} sessions")
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    with tempfile.TemporaryDirectory(prefix="csc-sessions-") as tmp:
        result = asyncio.run(measure(args, Path(tmp)))
    report = render(args, result, nofile)
    print(report)
    if args.record:
        with RESULTS_FILE.open("a", encoding="utf-8") as out:
            out.write("\n" + report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
