"""``csc-bootloader``: the command line of the reference bootloader.

``main(argv, env=..., stdin=..., stdout=..., stderr=...)`` builds the configuration from exactly
one source (``--sms``, ``--config-file``, ``--alias``/``--host``+``--port`` flags, or questions
on a terminal), runs :func:`bootloader.flow.run` and returns the exit status; tests call it in
process with their own streams and environment.

Invariants: only this module reads the environment (``CSC_BOOTLOADER_CSC``,
``CSC_BOOTLOADER_PASSWORD``), and only through ``env``; stdout carries only the final report;
every failure is one line on stderr naming its stage, and the stage fixes the exit status
(:func:`bootloader.errors.exit_code_table`); no traceback reaches the user unless ``--debug``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import NoReturn, TextIO

from bootloader import client
from bootloader import config as cfg
from bootloader.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    BootError,
    ConfigError,
    exit_code_table,
)
from bootloader.flow import Options, report, run
from bootloader.preset import load_preset
from bootloader.progress import make_progress
from bootloader.prompts import Terminal

PROG = "csc-bootloader"
ENV_CSC = client.ENV_CSC
ENV_PASSWORD = "CSC_BOOTLOADER_PASSWORD"
DEFAULT_TARGET = "~/csc-client"
DEFAULT_TIMEOUT = 30.0
MAX_SMS = 64 * 1024
PROMPT_ATTEMPTS = 3


def version() -> str:
    try:
        return metadata.version("csc")
    except metadata.PackageNotFoundError:  # a zipapp or a source tree
        return "0+unknown"


class _Parser(argparse.ArgumentParser):
    """argparse writing to the given streams; its exits become :class:`_ParserExit`."""

    def __init__(self, out: TextIO, err: TextIO, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._out, self._err = out, err

    def _print_message(self, message: str, file: object = None) -> None:
        if message:
            (self._err if file is sys.stderr else self._out).write(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            self._err.write(message)
        raise _ParserExit(status)


class _ParserExit(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


_EPILOG = f"""\
The configuration comes from one of --sms, --config-file, --alias (with --csc), or --host
and --port; on a terminal, without any of them, the bootloader asks.

environment:
  {ENV_CSC}       the CSC that resolves an alias (default {cfg.DEFAULT_CSC})
  {ENV_PASSWORD}  the password, unless --password gives it (else it is asked)

exit status:
{exit_code_table()}
"""


def build_parser(out: TextIO, err: TextIO) -> argparse.ArgumentParser:
    parser = _Parser(
        out,
        err,
        prog=PROG,
        description="Reach your company's provisioning portal (by alias through the CSC, or by\n"
        "host and port of a local/DMZ proxy), log on, and install the client package built\n"
        "for you and this device.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    where = parser.add_argument_group("configuration (one of)")
    where.add_argument("--sms", metavar="TEXT", help="the provisioning SMS text (- reads stdin)")
    where.add_argument("--config-file", type=Path, metavar="FILE", help="a migration file")
    where.add_argument("--alias", metavar="ALIAS", help="the alias, e.g. acme@example.com")
    where.add_argument("--host", metavar="HOST", help="host of the local/DMZ proxy")
    where.add_argument("--port", metavar="PORT", help="port of the local/DMZ proxy")
    conn = parser.add_argument_group("connection")
    conn.add_argument("--csc", metavar="URL", help=f"the CSC (or ${ENV_CSC})")
    conn.add_argument("--tls", action="store_true", help="speak HTTPS to --host/--port")
    conn.add_argument("--ca-file", metavar="FILE", help="CA bundle to verify TLS certificates")
    conn.add_argument("--fingerprint", metavar="HEX", help="the portal key's fingerprint")
    conn.add_argument(
        "--timeout",
        metavar="SECONDS",
        help=f"connect and read timeout (default {DEFAULT_TIMEOUT:g})",
    )
    logon = parser.add_argument_group("logon and installation")
    logon.add_argument("--user", metavar="USER", help="user name (default: User: of the SMS)")
    logon.add_argument("--password", metavar="PASSWORD", help=f"password (prefer ${ENV_PASSWORD})")
    logon.add_argument(
        "--device-type", metavar="TYPE", help="e.g. android-arm64 (default: this machine's)"
    )
    logon.add_argument("--device-id", metavar="ID", help="default: a random id kept in DIR/.csc")
    logon.add_argument(
        "--target",
        metavar="DIR",
        default=DEFAULT_TARGET,
        help=f"install here (default {DEFAULT_TARGET})",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress and no information")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Entry point of ``csc-bootloader``; returns the exit status."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    inp = stdin if stdin is not None else sys.stdin
    environ = os.environ if env is None else env
    try:
        args = build_parser(out, err).parse_args(list(argv) if argv is not None else None)
    except _ParserExit as exc:
        return exc.status
    term = Terminal(inp, err, quiet=args.quiet, use_getpass=inp is sys.stdin)
    try:
        options = build_options(args, environ, term, inp)
        outcome = run(options, term, make_progress(err, quiet=args.quiet))
    except BootError as exc:
        err.write(f"{PROG}: {exc.line()}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        err.write(f"\n{PROG}: interrupted; run again to resume the download\n")
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.debug:
            traceback.print_exc(file=err)
        hint = "" if args.debug else "; --debug shows the details"
        err.write(f"{PROG}: internal error: {type(exc).__name__}: {exc}{hint}\n")
        return EXIT_INTERNAL
    try:
        out.write(report(outcome))
        out.flush()
    except (BrokenPipeError, OSError):  # stdout went away; the installation stands
        pass
    return EXIT_OK


def build_options(
    args: argparse.Namespace, env: Mapping[str, str], term: Terminal, stdin: TextIO
) -> Options:
    """Everything the run needs, or a :class:`ConfigError` before anything is contacted."""
    provisioning = _provisioning(args, term, stdin)
    preset = load_preset()
    csc_text = args.csc if args.csc is not None else env.get(ENV_CSC, "").strip()
    if csc_text:
        csc = cfg.parse_csc_url(csc_text, "--csc" if args.csc else ENV_CSC)
    else:
        csc = cfg.parse_csc_url(preset.csc or cfg.DEFAULT_CSC, "the built-in preset")
    # the preset's key and CA are those of the preset's CSC
    preset_csc = preset.csc is not None and csc == cfg.parse_csc_url(preset.csc, "the preset")
    if provisioning.alias is not None and args.tls:
        raise ConfigError(
            "--tls applies to a Host/Port configuration; an alias uses --csc https://…"
        )
    if provisioning.host is not None and args.csc is not None:
        raise ConfigError(
            "--csc applies to an alias; a Host/Port configuration does not use the CSC"
        )
    password = args.password if args.password is not None else env.get(ENV_PASSWORD) or None
    return Options(
        provisioning=provisioning,
        csc=csc,
        target=Path(args.target).expanduser(),
        tls=args.tls,
        ca_file=args.ca_file,
        csc_key=preset.csc_key if preset_csc else None,
        ca_data=preset.csc_ca if preset_csc and provisioning.alias is not None else None,
        password=password,
        device_type=_short_text(args.device_type, "--device-type"),
        device_id=_short_text(args.device_id, "--device-id"),
        timeout=_timeout(args.timeout),
        user_agent=f"{PROG}/{version()}",
    )


def _provisioning(args: argparse.Namespace, term: Terminal, stdin: TextIO) -> cfg.Provisioning:
    by_flags = any(v is not None for v in (args.alias, args.host, args.port))
    given = [args.sms is not None, args.config_file is not None, by_flags]
    if sum(given) > 1:
        raise ConfigError(
            "give the configuration one way: --sms, --config-file, or --alias / --host and --port"
        )
    if args.sms is not None:
        found = cfg.parse_sms(_read_sms(stdin) if args.sms == "-" else args.sms)
    elif args.config_file is not None:
        found = cfg.parse_config_file(args.config_file)
    elif by_flags:
        names = ("--alias", "--host", "--port")
        found = cfg.build(
            "the options", alias=args.alias, host=args.host, port=args.port, names=names
        )
    elif term.interactive:
        found = _ask_provisioning(term)
    else:
        raise ConfigError(
            "no configuration: give --sms, --config-file, or --alias / --host and --port"
        )
    return cfg.with_extras(found, user=args.user, fingerprint=args.fingerprint)


def _read_sms(stdin: TextIO) -> str:
    try:
        text = stdin.read(MAX_SMS + 1)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the SMS from stdin: {exc}") from None
    if len(text) > MAX_SMS:
        raise ConfigError(f"the SMS on stdin is longer than {MAX_SMS // 1024} KiB")
    return text


def _ask_provisioning(term: Terminal) -> cfg.Provisioning:
    term.warn("No configuration given. Your administrator told you an alias, or the host and")
    term.warn("port of a local proxy.")
    for attempt in range(1, PROMPT_ATTEMPTS + 1):
        answer = term.ask("Alias (or host:port): ")
        try:
            return cfg.parse_answer(answer)
        except ConfigError as exc:
            if attempt == PROMPT_ATTEMPTS:
                raise
            term.warn(exc.message)
    raise AssertionError("unreachable")


def _short_text(value: str | None, flag: str) -> str | None:
    if value is None:
        return None
    if not value or len(value) > 128 or not value.isprintable():
        raise ConfigError(f"{flag} must be 1-128 printable characters")
    return value


def _timeout(value: str | None) -> float:
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= 3600:
        raise ConfigError(f"--timeout must be a number of seconds (0-3600], got {value!r}")
    return seconds


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
