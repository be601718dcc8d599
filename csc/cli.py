"""``csc``: the switching center's command line.

``csc serve`` runs a node; ``csc token issue`` signs an agent token (creating the signing key on
first use) and records its grants in ``tenants.json``; ``csc token verify`` checks one.

Invariants: only this module (the entry point) reads ``os.environ``; ``token issue`` prints the
token and nothing else on stdout; exit codes are 0 success, 1 failure, 2 usage or configuration
error (every configuration problem is printed at once), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from csc.config import LOG_LEVELS, CSCConfig, load_csc_config
from csc.tenants import TenantsFile, TenantsFileError
from shared.aliases import normalise_grant
from shared.allocator import keep_freed_memory
from shared.cli_support import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    config_file,
    fail,
    load_or_report,
    run_parser,
    version,
)
from shared.errors import AliasTaken, AuthFailed, BadAlias
from shared.logsetup import configure_logging
from shared.tokens import (
    SigningKeyError,
    check_tenant_id,
    issue_token,
    load_or_create_signing_key,
    load_public_keys,
    parse_ttl,
    verify_token,
)

PROG = "csc"
ENV_PREFIX = "CSC_"


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML file (or $CSC_CONFIG)")
    parser.add_argument("--state-dir", metavar="DIR", help="state directory (keys, tenants.json)")


def _serve_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser("serve", help="run a CSC node")
    _add_config_args(serve)
    serve.add_argument("--listen", metavar="HOST:PORT", help="HTTP listener")
    serve.add_argument("--tcp-listen", metavar="HOST:PORT|off", help="TCP ingress listener")
    serve.add_argument("--ready-file", type=Path, metavar="PATH", help="write addresses when up")
    serve.add_argument("--log-level", metavar="LEVEL", help="/".join(LOG_LEVELS))
    serve.set_defaults(handler=_cmd_serve)


def _token_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = commands.add_parser("token", help="issue or verify agent tokens")
    actions = token.add_subparsers(dest="action", metavar="ACTION")
    issue = actions.add_parser("issue", help="sign a token for a tenant's agent")
    _add_config_args(issue)
    issue.add_argument("--tenant", required=True, help="tenant id, e.g. acme")
    issue.add_argument(
        "--alias",
        action="append",
        required=True,
        dest="aliases",
        metavar="ALIAS",
        help="alias or *@domain pattern the agent may serve (repeatable)",
    )
    issue.add_argument("--ttl", default="30d", help="lifetime, e.g. 12h, 30d (default 30d)")
    issue.add_argument("--audience", help="token audience (default: token_audience)")
    issue.add_argument("--issuer", help="token issuer (default: token_issuer)")
    issue.set_defaults(handler=_cmd_token_issue)
    verify = actions.add_parser("verify", help="verify a token and print its claims")
    _add_config_args(verify)
    verify.add_argument("token", metavar="TOKEN", help="the token, or - to read it from stdin")
    verify.set_defaults(handler=_cmd_token_verify)
    token.set_defaults(handler=lambda args, env: _usage(token))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="CSC, the alias switching center: relay and token tool."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _serve_parser(commands)
    _token_parser(commands)
    parser.set_defaults(handler=lambda args, env: _usage(parser))
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _load(
    args: argparse.Namespace, env: Mapping[str, str], overrides: Mapping[str, object]
) -> CSCConfig | None:
    file = config_file(args.config, env, ENV_PREFIX)
    return load_or_report(PROG, lambda: load_csc_config(file=file, env=env, overrides=overrides))


def _cmd_serve(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    overrides = {
        "listen": args.listen,
        "tcp_listen": args.tcp_listen,
        "state_dir": args.state_dir,
        "log_level": args.log_level,
    }
    config = _load(args, env, overrides)
    if config is None:
        return EXIT_USAGE
    configure_logging(config.log_level, PROG, fmt=config.log_format)
    keep_freed_memory()
    from csc.server import serve  # lazy: keeps `csc token` free of the server's imports

    try:
        return serve(config, ready_file=args.ready_file)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _check_issue_args(args: argparse.Namespace) -> tuple[float, list[str]] | str:
    try:
        ttl = parse_ttl(args.ttl)
    except ValueError as exc:
        return f"--ttl: {exc}"
    try:
        check_tenant_id(args.tenant)
    except ValueError as exc:
        return f"--tenant: {exc}"
    try:
        grants = list(dict.fromkeys(normalise_grant(a) for a in args.aliases))
    except BadAlias as exc:
        return f"--alias: {exc.message}"
    return ttl, grants


def _cmd_token_issue(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    checked = _check_issue_args(args)
    if isinstance(checked, str):
        return fail(PROG, checked, EXIT_USAGE)
    ttl, grants = checked
    overrides = {
        "state_dir": args.state_dir,
        "token_audience": args.audience,
        "token_issuer": args.issuer,
    }
    config = _load(args, env, overrides)
    if config is None:
        return EXIT_USAGE
    try:
        key, created = load_or_create_signing_key(config.state_dir)
        if created:
            print(f"{PROG}: created a new signing key in {config.state_dir}", file=sys.stderr)
        TenantsFile(config.state_dir).assign(args.tenant, grants)
    except AliasTaken as exc:
        return fail(PROG, f"cannot issue the token: {exc.message}", EXIT_USAGE)
    except (SigningKeyError, TenantsFileError) as exc:
        return fail(PROG, str(exc))
    except OSError as exc:
        return fail(PROG, f"state directory {config.state_dir}: {exc}")
    token = issue_token(
        key,
        tenant=args.tenant,
        aliases=grants,
        ttl_seconds=ttl,
        audience=config.token_audience,
        issuer=config.token_issuer,
    )
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + ttl))
    print(
        f"{PROG}: token for tenant {args.tenant!r}, aliases {', '.join(grants)}, expires {expires}",
        file=sys.stderr,
    )
    print(token)
    return EXIT_OK


def _cmd_token_verify(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    config = _load(args, env, {"state_dir": args.state_dir})
    if config is None:
        return EXIT_USAGE
    token = sys.stdin.read().strip() if args.token == "-" else args.token.strip()
    try:
        keys = load_public_keys(config.state_dir)
        claims = verify_token(
            token, keys, audience=config.token_audience, issuer=config.token_issuer
        )
    except SigningKeyError as exc:
        return fail(PROG, str(exc))
    except AuthFailed as exc:
        return fail(PROG, f"token rejected: {exc.message}")
    data = {
        "tenant": claims.tenant,
        "aliases": list(claims.aliases),
        "jti": claims.jti,
        "issuer": claims.issuer,
        "expires_at": claims.expires_at,
    }
    print(json.dumps(data, indent=2))
    return EXIT_OK


def main(argv: Sequence[str] | None = None, *, env: Mapping[str, str] | None = None) -> int:
    """Entry point of ``csc``; returns the exit code."""
    parsed = run_parser(build_parser(), list(argv) if argv is not None else None)
    if isinstance(parsed, int):
        return parsed
    handler = parsed.handler
    code: int = handler(parsed, os.environ if env is None else env)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
