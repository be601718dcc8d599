"""``python -m demo`` (``make demo``): provision a device through the alias switching center.

Everything runs on 127.0.0.1, on ports the OS picks, with every state directory, log file and the
provisioned device under one scratch directory (printed, and kept afterwards to look around):

1. ``csc serve``; tenant ``acme`` is given the alias ``acme@example.com`` and an agent token
   (``csc token issue --assign``);
2. a portal set up with ``csc-portal`` commands (also written to ``portal-setup.sh``): two device
   types, users alice and bob, apps for both device types, two policies, deployments; then
   ``csc-portal serve``;
3. ``csc-agent`` dials out to the CSC; the demo waits until the alias resolves;
4. the administrator's provisioning SMS from ``csc-portal sms``;
5. ``csc-bootloader --sms …`` as alice's Android phone (user by ``--user``, password in
   ``CSC_BOOTLOADER_PASSWORD``) into ``DIR/device``; then what it installed.

Afterwards it keeps running and prints the URLs to try until Ctrl-C or SIGTERM; then every child
process is stopped by its PID and the demo exits 0. When stdin is not a terminal, ``CI=true`` or
``DEMO_EXIT=1`` (or ``--exit``), it stops everything and exits 0 right after the story.

Exit status: 0 success; 1 a step failed (the message names the step, followed by the tails of the
processes' logs); 2 bad usage; 130 interrupted before the story ended.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from harness.catalog import (
    DEVICE_TYPES,
    PASSWORDS,
    POLICIES,
    app_sources,
    password_for_command,
    portal_commands,
    run_portal_cli,
)
from harness.factory import ProcFactory
from harness.procs import CscProc, Proc, ProcError, issue_token
from harness.stack import (
    ALIAS,
    TENANT,
    BootRun,
    PortalProc,
    portal_env,
    run_bootloader,
    spawn_portal,
)
from harness.waiting import wait_alias_online

USER = "alice"
DEVICE_TYPE = "android-arm64"
INDENT = "      "


class DemoFailure(Exception):
    """A step did not do what it should; the message says what happened."""


class Stopped(Exception):
    """SIGTERM arrived while the story was being told."""


class Demo:
    """The processes of the demo and the steps that use them; each step returns its lines."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs = ProcFactory(workdir)
        self.env = portal_env(workdir / "portal-state", hash_cost="standard")
        self.device = workdir / "device"
        self.csc: CscProc | None = None
        self.portal: PortalProc | None = None
        self.agent: Proc | None = None
        self.token_file = workdir / "agent-token"
        self.sms = ""

    @property
    def csc_url(self) -> str:
        assert self.csc is not None
        return self.csc.http_url

    def tunnel(self, path: str = "") -> str:
        return f"{self.csc_url}/t/{ALIAS}/{path}"

    # --- the steps ----------------------------------------------------------------------------

    def start_csc(self) -> list[str]:
        self.csc = self.procs.csc(
            state_dir=self.workdir / "csc-state", env={"CSC_LOG_FORMAT": "text"}
        )
        return [f"{self.csc.http_url} for bootloaders and agents, admin API {self.csc.admin_url}"]

    def assign_alias(self) -> list[str]:
        assert self.csc is not None
        token = issue_token(self.csc.state_dir, TENANT, ALIAS, ttl="30d")
        self.token_file.write_text(token + "\n")
        self.token_file.chmod(0o600)
        return [f"tenant {TENANT} owns {ALIAS}; its agent token is in {self.token_file.name}"]

    def set_up_portal(self) -> list[str]:
        commands = portal_commands(self.workdir / "app-sources")
        script = self.workdir / "portal-setup.sh"
        script.write_text(_setup_script(commands, self.env))
        for argv in commands:
            run_portal_cli(argv, self.env, password_for_command(argv) or "")
        apps = sorted({app.name for app in app_sources()})
        return [
            f"{len(commands)} commands, in {script.name}: device types "
            f"{', '.join(DEVICE_TYPES)}; users {', '.join(PASSWORDS)}; apps {', '.join(apps)}; "
            f"policies {', '.join(POLICIES)}",
            f"demo user: {USER}, password {PASSWORDS[USER]!r}",
        ]

    def start_portal(self) -> list[str]:
        self.portal = spawn_portal(self.procs, self.env)
        key = json.loads(run_portal_cli(["key", "show", "--json"], self.env))
        return [f"{self.portal.url}, signing key fingerprint {key['fingerprint']}"]

    def start_agent(self) -> list[str]:
        assert self.portal is not None
        argv = [sys.executable, "-m", "tenant_agent", "--csc", self.csc_url]
        argv += ["--token-file", str(self.token_file), "--upstream", self.portal.url]
        self.agent = self.procs.spawn("agent", argv, env={"CSC_AGENT_LOG_FORMAT": "text"})
        answer = wait_alias_online(self.csc_url, ALIAS)
        return [f"GET /v1/resolve/{ALIAS} -> {json.dumps(answer)}"]

    def make_sms(self) -> list[str]:
        argv = ["sms", "--alias", ALIAS, "--get-url", self.tunnel("get/")]
        self.sms = run_portal_cli(argv, self.env).strip()
        return [self.sms]

    def run_bootloader(self) -> list[str]:
        args = ["--sms", self.sms, "--csc", self.csc_url, "--user", USER]
        args += ["--device-type", DEVICE_TYPE]
        run: BootRun = run_bootloader(args, self.device, password=PASSWORDS[USER])
        if run.code != 0:
            raise DemoFailure(f"the bootloader exited {run.code}: {run.line or run.err}")
        return run.out.rstrip().splitlines()

    def show_device(self) -> list[str]:
        return device_listing(self.device)

    def stop(self) -> None:
        self.procs.stop_all(timeout=10)


def script(name: str) -> str:
    """The full path of one of this venv's programs (``csc-portal``...), so that a command
    printed here also works in a fresh shell where the venv is not activated."""
    return str(Path(sys.executable).parent / name)


def _setup_script(commands: Sequence[Sequence[str]], env: dict[str, str]) -> str:
    lines = ["#!/bin/sh", "# The csc-portal commands that set up the demo's portal.", "set -e"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in sorted(env.items())]
    for argv in commands:
        command = shlex.join([script("csc-portal"), *argv])
        password = password_for_command(argv)
        if password is not None:
            command = f"printf '%s\\n' {shlex.quote(password.strip())} | {command}"
        lines.append(command)
    return "\n".join(lines) + "\n"


def device_listing(device: Path) -> list[str]:
    """``current ->`` its release, then each installed file with its size and permissions."""
    current = device / "current"
    release = current.resolve()
    lines = [f"{device}/current -> {os.readlink(current)}"]
    for path in sorted(p for p in release.rglob("*") if p.is_file()):
        rel = path.relative_to(release).as_posix()
        if rel.startswith(".csc/"):
            continue
        st = path.stat()
        lines.append(f"  {rel:<28} {st.st_size:>8} bytes  {_mode(st.st_mode)}")
    lines.append("  .csc/manifest.json, .csc/manifest.sig: the signed manifest, for the next run")
    return lines


def _mode(mode: int) -> str:
    bits = "rwxrwxrwx"
    return "".join(ch if mode & (1 << (8 - i)) else "-" for i, ch in enumerate(bits))


# --- running ----------------------------------------------------------------------------------


def _run_steps(steps: Sequence[tuple[str, Callable[[], list[str]]]]) -> None:
    for number, (title, step) in enumerate(steps, 1):
        print(f"[{number}/{len(steps)}] {title}", flush=True)
        try:
            lines = step()
        except (DemoFailure, ProcError, TimeoutError, OSError, RuntimeError, ValueError) as exc:
            raise DemoFailure(f"step {number} ({title}) failed: {exc}") from exc
        for line in lines:
            print(f"{INDENT}{line}", flush=True)


def _steps(demo: Demo) -> list[tuple[str, Callable[[], list[str]]]]:
    return [
        ("Start the switching center: csc serve", demo.start_csc),
        (
            "Give tenant acme its alias and an agent token: csc token issue --assign",
            demo.assign_alias,
        ),
        (
            "Set up the portal: csc-portal device-type/group/user/app/policy/deploy",
            demo.set_up_portal,
        ),
        ("Start the portal: csc-portal serve", demo.start_portal),
        ("Start the tenant agent, which dials out to the CSC: csc-agent", demo.start_agent),
        ("The administrator's provisioning SMS: csc-portal sms", demo.make_sms),
        (
            f"The device runs the bootloader on it: csc-bootloader --sms … --user {USER}",
            demo.run_bootloader,
        ),
        ("What the device has now", demo.show_device),
    ]


def _urls(demo: Demo) -> list[str]:
    assert demo.csc is not None
    return try_lines(demo.csc_url, demo.csc.admin_url, demo.csc.state_dir, demo.sms, demo.workdir)


def try_lines(csc_url: str, admin_url: str, csc_state: Path, sms: str, workdir: Path) -> list[str]:
    """What to try once the story is told; every command runs as it is in a fresh shell."""
    laptop = ["--user", "bob", "--device-type", "win-x64", "--target", str(workdir / "laptop")]
    again = shlex.join([script("csc-bootloader"), "--sms", sms, "--csc", csc_url, *laptop])
    tunnel = f"{csc_url}/t/{ALIAS}/"
    admin = shlex.join([script("csc"), "admin", "--state-dir", str(csc_state), "tenants", "list"])
    return [
        f"  the console        {admin_url}/console/ (sign in with the operator token below)",
        f"  operator token     in {csc_state / 'admin-token'}",
        f"  admin commands     {admin}",
        f"  resolve the alias  curl {csc_url}/v1/resolve/{ALIAS}",
        f"  the tunnel         curl {tunnel}v1/portal",
        f"  the get site       {tunnel}get/",
        f"  the SMS            {sms}",
        f"  bob's laptop       CSC_BOOTLOADER_PASSWORD={PASSWORDS['bob']} {again}",
        f"  (csc, csc-portal and csc-bootloader are in {Path(sys.executable).parent}; "
        f"or run: . {Path(sys.executable).parent / 'activate'})",
    ]


def _wait_for_signal() -> str:
    stop = threading.Event()
    received: list[str] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    stop.wait()
    return received[0]


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped


def should_wait(explicit_exit: bool) -> bool:
    """Stay up after the story unless told not to, or nobody is there to press Ctrl-C."""
    if explicit_exit or os.environ.get("DEMO_EXIT", "") not in ("", "0"):
        return False
    if os.environ.get("CI", "").lower() == "true":
        return False
    return sys.stdin.isatty()


def _workdir(given: Path | None) -> Path:
    if given is None:
        return Path(tempfile.mkdtemp(prefix="csc-demo-"))
    given.mkdir(parents=True, exist_ok=True)
    if any(given.iterdir()):
        raise DemoFailure(f"--workdir {given} is not empty; give a new or empty directory")
    return given.resolve()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--workdir", type=Path, metavar="DIR", help="scratch directory (new or empty)"
    )
    parser.add_argument("--exit", action="store_true", help="exit after the story (as DEMO_EXIT=1)")
    args = parser.parse_args(argv)
    try:
        workdir = _workdir(args.workdir)
    except (DemoFailure, OSError) as exc:
        print(f"python -m demo: {exc}", file=sys.stderr)
        return 2
    wait = should_wait(args.exit)
    signal.signal(signal.SIGTERM, _raise_stopped)
    print("CSC demo: a device is provisioned through the alias switching center")
    print(f"Scratch directory (state, logs, the device): {workdir}\n", flush=True)
    demo = Demo(workdir)
    try:
        _run_steps(_steps(demo))
        if wait:
            print("\nEverything keeps running; try:", flush=True)
            print("\n".join(_urls(demo)), flush=True)
            print("Press Ctrl-C to stop.", flush=True)
            print(f"\n{_wait_for_signal()}: stopping.", flush=True)
        else:
            print("\nNot waiting (stdin is not a terminal, or CI=true, DEMO_EXIT=1, --exit).")
    except DemoFailure as exc:
        print(f"\nDEMO FAILED: {exc}\n", file=sys.stderr)
        demo.procs.dump_logs(sys.stderr)
        return 1
    except (KeyboardInterrupt, Stopped):
        print("\nInterrupted: stopping.", file=sys.stderr)
        return 130
    finally:
        demo.stop()
    print(f"Stopped every process. The device stays in {demo.device}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
