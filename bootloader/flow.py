"""One provisioning run: resolve, connect, log on, download, verify, install (in that order).

Invariants: each step raises a :class:`~bootloader.errors.BootError` of its own stage; a failed
logon sends nothing else and installs nothing; the portal key is checked against the expected
fingerprint (``Key:`` of the SMS or ``--fingerprint``), else against the key of the portal that
installed the current client, else trusted on first use with a warning, before any credential
is sent; questions are asked only on a terminal, and a run that would need one fails before it
contacts anything.
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from bootloader.client import (
    Endpoint,
    PortalInfo,
    Resolved,
    Session,
    Transport,
    logon,
    portal_info,
    resolve,
)
from bootloader.config import Provisioning, format_hostport, parse_user
from bootloader.download import download
from bootloader.errors import BootError, ConfigError, Stage, printable
from bootloader.install import Installed, Target, install
from bootloader.progress import Progress
from bootloader.prompts import Terminal

LOGON_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Options:
    provisioning: Provisioning
    csc: str
    target: Path
    tls: bool = False
    ca_file: str | None = None
    #: the CSC's resolve key (base64), built in by the get site: resolve answers must be signed
    csc_key: str | None = None
    #: PEM CA certificates of the CSC, built in by the get site (``--ca-file`` wins)
    ca_data: str | None = None
    password: str | None = None
    device_type: str | None = None
    device_id: str | None = None
    timeout: float = 30.0
    user_agent: str = "csc-bootloader"


@dataclass(frozen=True, slots=True)
class Outcome:
    portal: PortalInfo
    user: str
    device_type: str
    package_id: str
    target: Target
    installed: Installed


def platform_device_type() -> str:
    """This machine as a device type name, e.g. ``linux-x64``, ``win-x64``, ``android-arm64``."""
    system = platform.system().lower()
    machine = platform.machine().lower()
    arch = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "i686": "x86", "i386": "x86"}
    names = {"windows": "win", "darwin": "macos"}
    os_name = "android" if hasattr(sys, "getandroidapilevel") else names.get(system, system)
    return f"{os_name}-{arch.get(machine, machine)}"


def run(opts: Options, term: Terminal, progress: Progress) -> Outcome:
    prov = opts.provisioning
    if not term.interactive:
        _need_no_questions(prov, opts)
    target = Target(opts.target)
    target.prepare()
    with target.lock():
        transport = Transport(
            timeout=opts.timeout,
            ca_file=opts.ca_file,
            user_agent=opts.user_agent,
            ca_data=opts.ca_data,
        )
        base, subject = locate(transport, prov, opts, term)
        info = portal_info(transport, base, subject)
        term.say(f"Portal: {info.name} ({subject}), key {info.fingerprint}")
        check_key(info, prov.fingerprint, target.installed_fingerprint(), term, subject)
        device_type = choose_device_type(opts.device_type, info.device_types, term)
        device_id = opts.device_id or target.device_id()
        session, user = log_on(transport, base, subject, opts, device_type, device_id, term)
        term.say(f"Logged on as {user}; downloading the package for {device_type}")
        package = download(transport, base, subject, session, target.partial, progress)
        try:
            installed = install(
                target, package, info.key, session.package.id, device_type=device_type
            )
        except BootError as exc:
            if exc.stage is Stage.VERIFY:  # never resume from bytes that failed verification
                package.unlink(missing_ok=True)
            raise
    for warning in installed.warnings:
        term.warn(f"warning: {warning}")
    return Outcome(info, user, device_type, session.package.id, target, installed)


def _need_no_questions(prov: Provisioning, opts: Options) -> None:
    why = "stdin is not a terminal, so the bootloader cannot ask"
    if prov.user is None:
        raise ConfigError(f"no user name: give --user, or User: in the SMS ({why})")
    if opts.password is None:
        raise ConfigError(f"no password: give --password or set CSC_BOOTLOADER_PASSWORD ({why})")


def locate(
    transport: Transport, prov: Provisioning, opts: Options, term: Terminal
) -> tuple[Endpoint, str]:
    """The portal's base URL and how to name it in messages (the alias, or the proxy)."""
    if prov.alias is not None:
        term.say(f"Resolving {prov.alias} at {opts.csc}")
        found = resolve(transport, opts.csc, prov.alias, opts.csc_key)
        if found.tenant:
            term.say(logging_on_line(found))
        return found.base, prov.alias
    assert prov.host is not None and prov.port is not None
    scheme = "https" if opts.tls else "http"
    return Endpoint(scheme, prov.host, prov.port, "/"), format_hostport(prov.host, prov.port)


def logging_on_line(found: Resolved) -> str:
    """Whom the device is about to trust, said before any password is asked."""
    contact = f"; support: {found.contact}" if found.contact else ""
    how = "verified by the CSC" if found.verified else "as the CSC says; not verified"
    return f"Logging on to {found.tenant} ({how}){contact}"


def check_key(
    info: PortalInfo,
    expected: str | None,
    installed: str | None,
    term: Terminal,
    subject: str,
) -> None:
    """Refuse a portal whose key is not the expected one (docs/provisioning.md)."""
    actual = info.fingerprint
    if expected is not None:
        if actual != expected:
            raise BootError(
                Stage.CONNECT,
                f"the portal of {subject} has the key {actual}, not the {expected} you were "
                "given: it is not your company's portal (or the SMS is wrong); nothing was sent",
            )
        term.say(f"The key matches the fingerprint {expected}")
    elif installed is not None:
        if actual != installed:
            raise BootError(
                Stage.CONNECT,
                f"the portal of {subject} has the key {actual}, but the installed client came "
                f"from the key {installed}; if the key really changed, run again with "
                f"--fingerprint {actual} (or the Key: of a new SMS)",
            )
        term.say("The key is the one of the portal that installed the current client")
    else:
        term.warn(
            f"warning: no key fingerprint given (Key: in the SMS or --fingerprint); trusting "
            f"the key {actual} of {subject} on first use"
        )


def choose_device_type(given: str | None, known: tuple[str, ...], term: Terminal) -> str:
    if given is not None:
        return given
    guess = platform_device_type()
    if guess in known:
        return guess
    if len(known) == 1:
        return known[0]
    listed = ", ".join(printable(k, 60) for k in known) or "none"
    if term.interactive and known:
        for _ in range(LOGON_ATTEMPTS):
            answer = term.ask(f"Device type ({listed}): ").strip()
            if answer in known:
                return answer
            term.warn(f"{printable(answer, 60)!r} is not one of {listed}")
    raise ConfigError(f"give --device-type; the portal knows {listed}")


def log_on(
    transport: Transport,
    base: Endpoint,
    subject: str,
    opts: Options,
    device_type: str,
    device_id: str,
    term: Terminal,
) -> tuple[Session, str]:
    """Log on; on a terminal, a wrong password is asked again (up to three attempts)."""
    user, password = opts.provisioning.user, opts.password
    ask_user, attempts = user is None, 1 if password is not None else LOGON_ATTEMPTS
    for attempt in range(1, attempts + 1):
        if user is None:
            user = parse_user(term.ask("User: "), "your answer")
        if password is None:
            password = term.ask_secret(f"Password for {user}: ")
        try:
            session = logon(
                transport,
                base,
                subject,
                user=user,
                password=password,
                device_type=device_type,
                device_id=device_id,
            )
        except BootError as exc:
            if exc.code != "logon_failed" or attempt == attempts:
                raise
            term.warn("Wrong user name or password; try again")
            password = None
            user = None if ask_user else user
            continue
        return session, user
    raise AssertionError("unreachable")


def report(outcome: Outcome) -> str:
    """What was installed, for stdout."""
    manifest = outcome.installed.manifest
    lines = [
        f"Installed package {outcome.package_id[:16]} from {printable(manifest.portal_name, 80)} "
        f"for {printable(manifest.user, 80)} ({printable(manifest.device_type, 60)}) in "
        f"{outcome.target.current}",
    ]
    lines += [
        f"  {printable(app.name, 80)} {printable(app.version, 40)} ({_files(len(app.files))})"
        for app in manifest.apps
    ]
    if not manifest.apps:
        lines.append("  (no apps)")
    lines.append("Policies:" if manifest.policies else "Policies: none")
    for name in sorted(manifest.policies):
        value = manifest.policies[name]
        shown = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        lines.append(f"  {printable(name, 80)} = {printable(shown, 200)}")
    previous = outcome.installed.previous
    if previous is not None and previous.name.split(".")[0] == outcome.package_id:
        lines.append("Reinstalled: this package was the current release already")
    elif previous is not None:
        lines.append(f"Replaced the previous release {previous.name[:16]}")
    return "\n".join(lines) + "\n"


def _files(n: int) -> str:
    return "1 file" if n == 1 else f"{n} files"
