"""``csc-portal``: the provisioning portal's command line.

Every command takes ``--config FILE`` (or ``$CSC_PORTAL_CONFIG``) and ``--state-dir DIR`` (or
``CSC_PORTAL_STATE_DIR``), and creates the database and the signing key there on first use.
The commands themselves live in :mod:`portal.commands`; ``serve`` runs :mod:`portal.server`.

Invariants: only this module (the entry point) reads ``os.environ``; a password is never taken
from a plain flag unless ``--password`` is given explicitly; data goes to stdout, messages and
warnings to stderr; exit codes are 0 success, 1 failure (unknown name, duplicate, in use, I/O),
2 usage, configuration or invalid input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from portal import commands
from portal.config import ENV_PREFIX, load_portal_config
from portal.prune import MIN_AGE
from shared import checks
from shared.cli_support import (
    EXIT_USAGE,
    add_log_format_arg,
    add_version_arg,
    config_file,
    load_or_report,
    run_parser,
)
from shared.config import LOG_LEVELS, ConfigError
from shared.units import parse_duration

PROG = "csc-portal"
if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _common(parser: argparse.ArgumentParser, *, json_output: bool = False) -> None:
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML file (or $CSC_PORTAL_CONFIG)"
    )
    parser.add_argument("--state-dir", metavar="DIR", help="state directory (database, key)")
    if json_output:
        parser.add_argument("--json", action="store_true", help="print JSON")


def _group(commands_: Subparsers, name: str, help: str) -> Subparsers:
    parser = commands_.add_parser(name, help=help, description=help)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    parser.set_defaults(handler=lambda ctx, args: _usage(parser))
    return actions


# --- the arguments of each command ---------------------------------------------------------

Setup = Callable[[argparse.ArgumentParser], None]


def _no_args(parser: argparse.ArgumentParser) -> None:
    pass


def _bare_name(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name")


def _name(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME")


def _password_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin (one line)"
    )
    source.add_argument("--password-file", type=Path, metavar="FILE", help="first line of FILE")
    source.add_argument(
        "--password", metavar="PASSWORD", help="the password itself (visible in ps: avoid)"
    )


def _user_add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME")
    parser.add_argument(
        "--group", action="append", default=[], dest="groups", metavar="G", help="(repeatable)"
    )
    _password_options(parser)


def _user_passwd(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME")
    _password_options(parser)


def _members(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("group", metavar="GROUP")
    parser.add_argument("users", nargs="+", metavar="USER")


def _device_type_add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="e.g. android-arm64")
    parser.add_argument("--description", default="", metavar="TEXT", help="one line for the site")


def _app_add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME")
    parser.add_argument("--version", required=True, dest="app_version", metavar="V")
    parser.add_argument("--device-type", required=True, metavar="T")
    parser.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="files, or directories (contents)"
    )


def _app_remove(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME[@VERSION]")
    parser.add_argument("--device-type", metavar="T", help="only this device type's")


def _policy_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME")
    parser.add_argument("settings", nargs="+", metavar="KEY=VALUE")


def _policy_unset(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME")
    parser.add_argument("keys", nargs="+", metavar="KEY")


def _assignment(kind: str, metavar: str) -> Setup:
    """``deploy|undeploy app|policy NAME --user U|--group G``."""

    def setup(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("name", metavar=metavar)
        target = parser.add_mutually_exclusive_group(required=True)
        target.add_argument("--user", metavar="USER", help="deploy to this user")
        target.add_argument("--group", metavar="GROUP", help="deploy to this group")
        parser.set_defaults(kind=kind)

    return setup


def _seconds(text: str) -> float:
    """A duration argument (``90``, ``15m``, ``1h``); argparse reports a ValueError as usage."""
    seconds = parse_duration(text)
    if seconds < 0:
        raise ValueError(text)
    return seconds


def _sms(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", metavar="USER", help="an SMS for this user (adds User:)")
    parser.add_argument("--alias", metavar="ALIAS", help="the CSC alias (default: sms_alias)")
    parser.add_argument("--host", metavar="HOST", help="the local/DMZ proxy (default: sms_host)")
    parser.add_argument("--port", type=int, metavar="PORT", help="the proxy's port (with --host)")
    parser.add_argument("--get-url", metavar="URL", help="the get site's URL (default: get_url)")


def _get_site(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, metavar="DIR")
    parser.add_argument("--bootloader-source", type=Path, metavar="DIR", help=argparse.SUPPRESS)


def _prune(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="only say what would go")
    parser.add_argument(
        "--min-age",
        type=_seconds,
        default=MIN_AGE,
        metavar="DURATION",
        help=f"spare files younger than this (work in progress; default {MIN_AGE:g})",
    )


def _serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", metavar="HOST:PORT", help="HTTP listener")
    parser.add_argument("--ready-file", type=Path, metavar="PATH", help="write the address when up")
    parser.add_argument("--log-level", metavar="LEVEL", help="/".join(LOG_LEVELS))
    add_log_format_arg(parser)
    parser.add_argument("--bootloader-source", type=Path, metavar="DIR", help=argparse.SUPPRESS)


def _check(
    ctx: object, args: argparse.Namespace
) -> commands.Result:  # pragma: no cover - never run
    raise AssertionError("csc-portal check runs before the state is opened")


# --- the command table ---------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One command: its group (None: a top-level command), name, handler, help and arguments;
    ``json`` gives it ``--json``; only a command that ``creates`` something may create the
    state directory."""

    group: str | None
    name: str
    run: commands.Command
    help: str
    setup: Setup = _no_args
    json: bool = False
    creates: bool = False


GROUPS = {
    "user": "manage users",
    "group": "manage groups",
    "device-type": "manage device types",
    "app": "manage applications",
    "policy": "manage policies (named key=value settings)",
    "deploy": "assign an app or a policy to a user or group",
    "undeploy": "remove an assignment",
    "key": "the portal's signing key",
}
#: Every command, in the order ``--help`` lists them (a group where its first command is).
# fmt: off
COMMANDS = (
    Spec("user", "add", commands.user_add, "create a user", _user_add, creates=True),
    Spec("user", "list", commands.user_list, "list users", json=True),
    Spec("user", "passwd", commands.user_passwd, "set a user's password", _user_passwd),
    Spec("user", "remove", commands.user_remove, "delete a user and its devices", _name),
    Spec("group", "add", commands.group_add, "create a group", _bare_name, creates=True),
    Spec("group", "list", commands.group_list, "list groups", json=True),
    Spec("group", "remove", commands.group_remove, "delete a group", _bare_name),
    Spec("group", "add-member", commands.group_add_member, "add users to a group", _members),
    Spec("group", "remove-member", commands.group_remove_member, "remove users from a group", _members),
    Spec("device-type", "add", commands.device_type_add, "create a device type", _device_type_add, creates=True),
    Spec("device-type", "list", commands.device_type_list, "list device types", json=True),
    Spec("device-type", "remove", commands.device_type_remove, "delete a device type", _name),
    Spec("app", "add", commands.app_add, "add an application version (immutable)", _app_add, creates=True),
    Spec("app", "list", commands.app_list, "list application versions", json=True),
    Spec("app", "remove", commands.app_remove, "delete application versions", _app_remove),
    Spec("policy", "set", commands.policy_set, "create a policy or set its keys", _policy_set, creates=True),
    Spec("policy", "unset", commands.policy_unset, "remove keys from a policy", _policy_unset),
    Spec("policy", "list", commands.policy_list, "list policies", json=True),
    Spec("policy", "remove", commands.policy_remove, "delete a policy", _name),
    Spec("deploy", "app", commands.deploy, "deploy an app", _assignment("app", "NAME[@VERSION]"), creates=True),
    Spec("deploy", "policy", commands.deploy, "deploy a policy", _assignment("policy", "NAME"), creates=True),
    Spec("undeploy", "app", commands.undeploy, "undeploy an app", _assignment("app", "NAME")),
    Spec("undeploy", "policy", commands.undeploy, "undeploy a policy", _assignment("policy", "NAME")),
    Spec(None, "deployments", commands.deployments, "list assignments", json=True),
    Spec(None, "devices", commands.devices, "list devices that logged on", json=True),
    Spec("key", "show", commands.key_show, "print the public key and fingerprint", json=True),
    Spec(None, "sms", commands.sms, "print the provisioning SMS", _sms),
    Spec(None, "get-site", commands.get_site, "write the get site as static files", _get_site),
    Spec(None, "check", _check, "check the configuration and state without serving"),
    Spec(None, "prune", commands.prune, "delete packages and app files nothing uses any more", _prune, json=True),
    Spec(None, "serve", commands.serve, "run the portal's HTTP server", _serve, creates=True),
)
# fmt: on


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="The reference provisioning portal: users, apps, policies, deployments; "
        "logon and package download for bootloaders. Settings: --config, CSC_PORTAL_<NAME>.",
    )
    add_version_arg(parser)
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, Subparsers] = {}
    for spec in COMMANDS:
        if spec.group is not None and spec.group not in groups:
            groups[spec.group] = _group(top, spec.group, GROUPS[spec.group])
        parent = top if spec.group is None else groups[spec.group]
        command = parent.add_parser(spec.name, help=spec.help, description=spec.help)
        _common(command, json_output=spec.json)
        command.set_defaults(handler=spec.run, creates=spec.creates)
        spec.setup(command)
    parser.set_defaults(handler=lambda ctx, args: _usage(parser))
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _run_check(file: Path | None, environ: Mapping[str, str], overrides: dict[str, Any]) -> int:
    """``csc-portal check``: the configuration and the state, nothing created (portal/check.py)."""
    from portal.check import check_portal

    try:
        config = load_portal_config(file=file, env=environ, overrides=overrides)
    except ConfigError as exc:
        return checks.report(f"{PROG} check", checks.config_problems(exc.problems))
    where = f"{file} loads" if file is not None else "defaults and CSC_PORTAL_* variables load"
    found = [checks.ok("configuration", where), *check_portal(config)]
    return checks.report(f"{PROG} check", found)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = ("state_dir", "listen", "log_level", "log_format", "get_url")
    return {name: getattr(args, name, None) for name in names}


def main(argv: Sequence[str] | None = None, *, env: Mapping[str, str] | None = None) -> int:
    """Entry point of ``csc-portal``; returns the exit code."""
    parser = build_parser()
    parsed = run_parser(parser, list(argv) if argv is not None else None)
    if isinstance(parsed, int):
        return parsed
    if not hasattr(parsed, "config"):  # a bare command group: help, nothing to load
        code: int = parsed.handler(None, parsed)
        return code
    environ = os.environ if env is None else env
    file = config_file(parsed.config, environ, ENV_PREFIX)
    overrides = _overrides(parsed)
    if parsed.command == "check":
        return _run_check(file, environ, overrides)
    config = load_or_report(
        PROG, lambda: load_portal_config(file=file, env=environ, overrides=overrides)
    )
    if config is None:
        return EXIT_USAGE
    return commands.run(PROG, config, parsed)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
