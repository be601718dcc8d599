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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from portal import commands
from portal.config import ENV_PREFIX, load_portal_config
from portal.prune import MIN_AGE
from shared import checks
from shared.cli_support import (
    EXIT_USAGE,
    add_log_format_arg,
    config_file,
    load_or_report,
    run_parser,
    version,
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


def _command(
    parent: Subparsers,
    name: str,
    handler: Callable[..., int],
    help: str,
    *,
    json_output: bool = False,
    creates: bool = False,
) -> argparse.ArgumentParser:
    """A command; only one that ``creates`` something may create the state directory."""
    parser = parent.add_parser(name, help=help, description=help)
    _common(parser, json_output=json_output)
    parser.set_defaults(handler=handler, creates=creates)
    return parser


def _group(commands_: Subparsers, name: str, help: str) -> Subparsers:
    parser = commands_.add_parser(name, help=help, description=help)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    parser.set_defaults(handler=lambda ctx, args: _usage(parser))
    return actions


def _password_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin (one line)"
    )
    source.add_argument("--password-file", type=Path, metavar="FILE", help="first line of FILE")
    source.add_argument(
        "--password", metavar="PASSWORD", help="the password itself (visible in ps: avoid)"
    )


def _target_options(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--user", metavar="USER", help="deploy to this user")
    target.add_argument("--group", metavar="GROUP", help="deploy to this group")


def _user_parsers(top: Subparsers) -> None:
    users = _group(top, "user", "manage users")
    add = _command(users, "add", commands.user_add, "create a user", creates=True)
    add.add_argument("name", metavar="NAME")
    add.add_argument(
        "--group", action="append", default=[], dest="groups", metavar="G", help="(repeatable)"
    )
    _password_options(add)
    _command(users, "list", commands.user_list, "list users", json_output=True)
    passwd = _command(users, "passwd", commands.user_passwd, "set a user's password")
    passwd.add_argument("name", metavar="NAME")
    _password_options(passwd)
    remove = _command(users, "remove", commands.user_remove, "delete a user and its devices")
    remove.add_argument("name", metavar="NAME")


def _group_parsers(top: Subparsers) -> None:
    groups = _group(top, "group", "manage groups")
    _command(groups, "add", commands.group_add, "create a group", creates=True).add_argument("name")
    _command(groups, "list", commands.group_list, "list groups", json_output=True)
    _command(groups, "remove", commands.group_remove, "delete a group").add_argument("name")
    for action, handler, help in (
        ("add-member", commands.group_add_member, "add users to a group"),
        ("remove-member", commands.group_remove_member, "remove users from a group"),
    ):
        parser = _command(groups, action, handler, help)
        parser.add_argument("group", metavar="GROUP")
        parser.add_argument("users", nargs="+", metavar="USER")


def _device_type_parsers(top: Subparsers) -> None:
    types = _group(top, "device-type", "manage device types")
    add = _command(types, "add", commands.device_type_add, "create a device type", creates=True)
    add.add_argument("name", metavar="NAME", help="e.g. android-arm64")
    add.add_argument("--description", default="", metavar="TEXT", help="one line for the site")
    _command(types, "list", commands.device_type_list, "list device types", json_output=True)
    remove = _command(types, "remove", commands.device_type_remove, "delete a device type")
    remove.add_argument("name", metavar="NAME")


def _app_parsers(top: Subparsers) -> None:
    apps = _group(top, "app", "manage applications")
    add = _command(
        apps, "add", commands.app_add, "add an application version (immutable)", creates=True
    )
    add.add_argument("name", metavar="NAME")
    add.add_argument("--version", required=True, dest="app_version", metavar="V")
    add.add_argument("--device-type", required=True, metavar="T")
    add.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="files, or directories (contents)"
    )
    _command(apps, "list", commands.app_list, "list application versions", json_output=True)
    remove = _command(apps, "remove", commands.app_remove, "delete application versions")
    remove.add_argument("name", metavar="NAME[@VERSION]")
    remove.add_argument("--device-type", metavar="T", help="only this device type's")


def _policy_parsers(top: Subparsers) -> None:
    policies = _group(top, "policy", "manage policies (named key=value settings)")
    set_ = _command(
        policies, "set", commands.policy_set, "create a policy or set its keys", creates=True
    )
    set_.add_argument("name", metavar="NAME")
    set_.add_argument("settings", nargs="+", metavar="KEY=VALUE")
    unset = _command(policies, "unset", commands.policy_unset, "remove keys from a policy")
    unset.add_argument("name", metavar="NAME")
    unset.add_argument("keys", nargs="+", metavar="KEY")
    _command(policies, "list", commands.policy_list, "list policies", json_output=True)
    remove = _command(policies, "remove", commands.policy_remove, "delete a policy")
    remove.add_argument("name", metavar="NAME")


def _deploy_parsers(top: Subparsers) -> None:
    for verb, handler, help in (
        ("deploy", commands.deploy, "assign an app or a policy to a user or group"),
        ("undeploy", commands.undeploy, "remove an assignment"),
    ):
        kinds = _group(top, verb, help)
        creates = verb == "deploy"
        app = _command(kinds, "app", handler, f"{verb} an app", creates=creates)
        app.add_argument("name", metavar="NAME[@VERSION]" if verb == "deploy" else "NAME")
        _target_options(app)
        app.set_defaults(kind="app")
        policy = _command(kinds, "policy", handler, f"{verb} a policy", creates=creates)
        policy.add_argument("name", metavar="NAME")
        _target_options(policy)
        policy.set_defaults(kind="policy")
    _command(top, "deployments", commands.deployments, "list assignments", json_output=True)
    _command(top, "devices", commands.devices, "list devices that logged on", json_output=True)


def _seconds(text: str) -> float:
    """A duration argument (``90``, ``15m``, ``1h``); argparse reports a ValueError as usage."""
    seconds = parse_duration(text)
    if seconds < 0:
        raise ValueError(text)
    return seconds


def _misc_parsers(top: Subparsers) -> None:
    key = _group(top, "key", "the portal's signing key")
    _command(
        key, "show", commands.key_show, "print the public key and fingerprint", json_output=True
    )
    sms = _command(top, "sms", commands.sms, "print the provisioning SMS")
    sms.add_argument("--user", metavar="USER", help="an SMS for this user (adds User:)")
    sms.add_argument("--alias", metavar="ALIAS", help="the CSC alias (default: sms_alias)")
    sms.add_argument("--host", metavar="HOST", help="the local/DMZ proxy (default: sms_host)")
    sms.add_argument("--port", type=int, metavar="PORT", help="the proxy's port (with --host)")
    sms.add_argument("--get-url", metavar="URL", help="the get site's URL (default: get_url)")
    site = _command(top, "get-site", commands.get_site, "write the get site as static files")
    site.add_argument("--out", type=Path, required=True, metavar="DIR")
    site.add_argument("--bootloader-source", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    _command(top, "check", _check, "check the configuration and state without serving")
    prune = _command(
        top,
        "prune",
        commands.prune,
        "delete packages and app files nothing uses any more",
        json_output=True,
    )
    prune.add_argument("--dry-run", action="store_true", help="only say what would go")
    prune.add_argument(
        "--min-age",
        type=_seconds,
        default=MIN_AGE,
        metavar="DURATION",
        help=f"spare files younger than this (work in progress; default {MIN_AGE:g})",
    )
    serve = _command(top, "serve", commands.serve, "run the portal's HTTP server", creates=True)
    serve.add_argument("--listen", metavar="HOST:PORT", help="HTTP listener")
    serve.add_argument("--ready-file", type=Path, metavar="PATH", help="write the address when up")
    serve.add_argument("--log-level", metavar="LEVEL", help="/".join(LOG_LEVELS))
    add_log_format_arg(serve)
    serve.add_argument("--bootloader-source", type=Path, metavar="DIR", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="The reference provisioning portal: users, apps, policies, deployments; "
        "logon and package download for bootloaders. Settings: --config, CSC_PORTAL_<NAME>.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (
        _user_parsers,
        _group_parsers,
        _device_type_parsers,
        _app_parsers,
        _policy_parsers,
        _deploy_parsers,
        _misc_parsers,
    ):
        add(top)
    parser.set_defaults(handler=lambda ctx, args: _usage(parser))
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _check(ctx: object, args: argparse.Namespace) -> int:  # pragma: no cover - never run
    raise AssertionError("csc-portal check runs before the state is opened")


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
