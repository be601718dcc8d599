"""``csc``: the switching center's command line.

``csc serve`` runs a node; ``csc token issue`` signs an agent token for aliases assigned to a
tenant (creating the signing key on first use; ``--assign`` creates the tenant and assigns the
aliases first) and records its metadata in the store (``csc.db``, or the PostgreSQL database of
``--database-url``); ``csc token verify`` checks one; ``csc operator add|list|remove`` manages
the admin API's operators offline; ``csc db check|backup`` looks at or copies the store's
database (:mod:`csc.admin.db`); ``csc admin ...`` drives a running node's admin API
(:mod:`csc.admin.cli`). The store and the signing key are the node's own
(:func:`csc.store.open_store`, :func:`csc.signing.signing_key`).

Invariants: only this module (the entry point) reads ``os.environ``; ``token issue`` prints the
token and nothing else on stdout; exit codes are 0 success, 1 failure, 2 usage or configuration
error (every configuration problem is printed at once), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from csc.admin import cli as admin_cli
from csc.admin import db as db_cli
from csc.config import LOG_LEVELS, CSCConfig, load_csc_config
from csc.signing import signing_key, verification_keys
from csc.store import Store, StoreError, open_store
from csc.store.sqlite import DB_FILE as SQLITE_FILE
from csc.tenants import Actor, Conflict, NotFound, TokenRecord
from shared import checks
from shared.aliases import normalise_grant
from shared.allocator import keep_freed_memory
from shared.cli_support import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    add_log_format_arg,
    add_version_arg,
    config_file,
    fail,
    load_or_report,
    run_parser,
)
from shared.config import ConfigError
from shared.errors import AuthFailed, BadAlias
from shared.files import create_exclusive
from shared.logsetup import configure_logging
from shared.oserrors import describe_os_error
from shared.timefmt import iso
from shared.tokens import (
    PublicKey,
    SigningKeyError,
    check_tenant_id,
    parse_ttl,
    verify_token,
)

PROG = "csc"
ENV_PREFIX = "CSC_"


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML file (or $CSC_CONFIG)")
    parser.add_argument("--state-dir", metavar="DIR", help="state directory (keys, csc.db)")


def _add_database_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        metavar="URL",
        help="the cluster's PostgreSQL store, postgresql://... (or $CSC_DATABASE_URL)",
    )


def _add_store_args(parser: argparse.ArgumentParser) -> None:
    _add_config_args(parser)
    _add_database_arg(parser)


def _store_overrides(args: argparse.Namespace) -> dict[str, object]:
    return {"state_dir": args.state_dir, "database_url": args.database_url}


def _serve_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser("serve", help="run a CSC node")
    _add_config_args(serve)
    serve.add_argument("--listen", metavar="HOST:PORT", help="HTTP listener")
    serve.add_argument("--tcp-listen", metavar="HOST:PORT|off", help="TCP ingress listener")
    serve.add_argument("--admin-listen", metavar="HOST:PORT|off", help="admin API listener")
    serve.add_argument("--metrics-listen", metavar="HOST:PORT|off", help="/metrics listener")
    serve.add_argument("--node-id", metavar="NAME", help="this node's name in a cluster")
    serve.add_argument("--peer-listen", metavar="HOST:PORT", help="node-to-node listener")
    serve.add_argument("--peer-advertise", metavar="HOST:PORT", help="address peers dial")
    serve.add_argument("--ready-file", type=Path, metavar="PATH", help="write addresses when up")
    serve.add_argument("--log-level", metavar="LEVEL", help="/".join(LOG_LEVELS))
    add_log_format_arg(serve)
    serve.set_defaults(handler=_cmd_serve)


def _check_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = commands.add_parser(
        "check", help="check the configuration (and Redis, PostgreSQL) without serving"
    )
    _add_config_args(check)
    _add_database_arg(check)
    check.set_defaults(handler=_cmd_check)


def _cmd_check(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from csc.admin.check import check_csc

    file = config_file(args.config, env, ENV_PREFIX)
    try:
        config = load_csc_config(file=file, env=env, overrides=_store_overrides(args))
    except ConfigError as exc:
        return checks.report(PROG, checks.config_problems(exc.problems))
    where = f"{file} loads" if file is not None else "defaults and CSC_* variables load"
    return checks.report(PROG, [checks.ok("configuration", where), *check_csc(config)])


def _token_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = commands.add_parser("token", help="issue or verify agent tokens")
    actions = token.add_subparsers(dest="action", metavar="ACTION")
    issue = actions.add_parser("issue", help="sign a token for a tenant's agent")
    _add_config_args(issue)
    _add_database_arg(issue)
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
    issue.add_argument(
        "--assign",
        action="store_true",
        help="create the tenant if missing and assign it the aliases first",
    )
    issue.add_argument("--audience", help="token audience (default: token_audience)")
    issue.add_argument("--issuer", help="token issuer (default: token_issuer)")
    issue.set_defaults(handler=_cmd_token_issue)
    verify = actions.add_parser("verify", help="verify a token and print its claims")
    _add_config_args(verify)
    _add_database_arg(verify)
    verify.add_argument("token", metavar="TOKEN", help="the token, or - to read it from stdin")
    verify.set_defaults(handler=_cmd_token_verify)
    token.set_defaults(handler=lambda args, env: _usage(token))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="CSC, the alias switching center: relay and token tool."
    )
    add_version_arg(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _serve_parser(commands)
    _check_parser(commands)
    _token_parser(commands)
    _operator_parser(commands)
    db_cli.add_parser(commands, _add_store_args, _usage)
    admin_cli.add_parser(commands)
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
        "admin_listen": args.admin_listen,
        "metrics_listen": args.metrics_listen,
        "state_dir": args.state_dir,
        "log_level": args.log_level,
        "log_format": args.log_format,
        "node_id": args.node_id,
        "peer_listen": args.peer_listen,
        "peer_advertise": args.peer_advertise,
    }
    config = _load(args, env, overrides)
    if config is None:
        return EXIT_USAGE
    configure_logging(config.log_level, PROG, fmt=config.log_format)
    keep_freed_memory()
    # lazy: keeps `csc token` free of the server's imports
    from csc.cluster.attach import ClusterStartError
    from csc.permissions import NotPrivate
    from csc.server import serve

    try:
        return serve(config, ready_file=args.ready_file)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (StoreError, SigningKeyError, ClusterStartError, NotPrivate) as exc:
        return fail(PROG, f"cannot start: {exc}")
    except OSError as exc:
        return fail(PROG, f"cannot start: {describe_os_error(exc)}")


def local_actor() -> Actor:
    """The audit identity of a command run on the CSC host: ``local:<user>``."""
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    return Actor(f"local:{user}", "local")


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


def _issue_offline(
    config: CSCConfig, tenant: str, grants: list[str], ttl: float, assign: bool
) -> tuple[str, TokenRecord]:
    """Sign and record a token in the node's store (creating the key on first use)."""
    store = open_store(config)
    try:
        signing = signing_key(config, store)
        if signing.created:
            print(f"{PROG}: created a new signing key in {signing.where}", file=sys.stderr)
        return store.issue_token(
            signing.key,
            tenant=tenant,
            grants=grants,
            ttl=ttl,
            audience=config.token_audience,
            issuer=config.token_issuer,
            actor=local_actor(),
            assign=assign,
        )
    finally:
        store.close()


def _cmd_token_issue(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    checked = _check_issue_args(args)
    if isinstance(checked, str):
        return fail(PROG, checked, EXIT_USAGE)
    ttl, grants = checked
    overrides = {
        **_store_overrides(args),
        "token_audience": args.audience,
        "token_issuer": args.issuer,
    }
    config = _load(args, env, overrides)
    if config is None:
        return EXIT_USAGE
    try:
        token, record = _issue_offline(config, args.tenant, grants, ttl, args.assign)
    except NotFound:
        hint = f"create it with 'csc admin tenants create {args.tenant}', or pass --assign"
        return fail(PROG, f"cannot issue the token: no tenant {args.tenant!r} ({hint})", EXIT_USAGE)
    except Conflict as exc:
        return fail(PROG, f"cannot issue the token: {'; '.join(exc.problems)}", EXIT_USAGE)
    except (SigningKeyError, StoreError) as exc:
        return fail(PROG, str(exc))
    except OSError as exc:
        return fail(PROG, f"state directory {config.state_dir}: {exc}")
    print(
        f"{PROG}: token {record.jti} for tenant {args.tenant!r}, aliases {', '.join(grants)}, "
        f"expires {iso(record.expires_at)}",
        file=sys.stderr,
    )
    print(token)
    return EXIT_OK


def _verification_keys(config: CSCConfig) -> list[PublicKey]:
    """The keys ``csc token verify`` checks with: the public key file of the state directory,
    or the public half of ``signing_key_file`` / the key in the database."""
    if config.database_url is None:
        return verification_keys(config, None)
    store = open_store(config)
    try:
        return verification_keys(config, store)
    finally:
        store.close()


def _cmd_token_verify(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    config = _load(args, env, _store_overrides(args))
    if config is None:
        return EXIT_USAGE
    token = sys.stdin.read().strip() if args.token == "-" else args.token.strip()
    try:
        keys = _verification_keys(config)
        claims = verify_token(
            token, keys, audience=config.token_audience, issuer=config.token_issuer
        )
    except (SigningKeyError, StoreError) as exc:
        return fail(PROG, str(exc))
    except AuthFailed as exc:
        return fail(PROG, f"token rejected: {exc.message}")
    data = {
        "tenant": claims.tenant,
        "aliases": list(claims.aliases),
        "jti": claims.jti,
        "issuer": claims.issuer,
        "expires_at": iso(claims.expires_at),
    }
    print(json.dumps(data, indent=2))
    return EXIT_OK


# --- csc operator (offline, on the node's store) -------------------------------------------------


def _operator_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    operator = commands.add_parser("operator", help="manage admin API operators (offline)")
    actions = operator.add_subparsers(dest="action", metavar="ACTION")
    add = actions.add_parser("add", help="create an operator and print its bearer token")
    _add_config_args(add)
    _add_database_arg(add)
    add.add_argument("name", help="operator name, e.g. alice")
    add.add_argument("--token-file", type=Path, metavar="PATH", help="write the token here (0600)")
    add.set_defaults(handler=_cmd_operator_add)
    listing = actions.add_parser("list", help="list the operators")
    _add_config_args(listing)
    _add_database_arg(listing)
    listing.set_defaults(handler=_cmd_operator_list)
    remove = actions.add_parser("remove", help="remove an operator (its token stops working)")
    _add_config_args(remove)
    _add_database_arg(remove)
    remove.add_argument("name")
    remove.set_defaults(handler=_cmd_operator_remove)
    operator.set_defaults(handler=lambda args, env: _usage(operator))


def _open_store(
    args: argparse.Namespace, env: Mapping[str, str], *, create: bool = False
) -> Store | int:
    """The node's store; without ``create`` a missing SQLite store is an error naming where
    it was looked for (a listing must not leave an empty state directory behind)."""
    config = _load(args, env, _store_overrides(args))
    if config is None:
        return EXIT_USAGE
    db = config.state_dir.absolute() / SQLITE_FILE
    if not create and config.database_url is None and not db.exists():
        return fail(
            PROG,
            f"no CSC state in {db.parent} ({db.name} is missing); give the node's state "
            "directory with --state-dir or CSC_STATE_DIR, or its database with --database-url",
        )
    try:
        return open_store(config)
    except StoreError as exc:
        return fail(PROG, str(exc))


def _cmd_operator_add(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    try:
        check_tenant_id(args.name)
    except ValueError as exc:
        return fail(PROG, f"operator name: {exc}", EXIT_USAGE)
    store = _open_store(args, env, create=True)
    if isinstance(store, int):
        return store
    try:
        token = store.add_operator(args.name, local_actor())
        if args.token_file is not None:
            try:
                create_exclusive(args.token_file, (token + "\n").encode(), mode=0o600)
            except OSError as exc:
                store.remove_operator(args.name, local_actor())
                return fail(PROG, f"{args.token_file}: {exc.strerror or exc}; nothing created")
    except Conflict as exc:
        return fail(PROG, "; ".join(exc.problems))
    except StoreError as exc:
        return fail(PROG, str(exc))
    finally:
        store.close()
    if args.token_file is None:
        print(token)
    else:
        print(f"{PROG}: operator {args.name!r}: token in {args.token_file}", file=sys.stderr)
    return EXIT_OK


def _cmd_operator_list(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    store = _open_store(args, env)
    if isinstance(store, int):
        return store
    try:
        rows = [(name, iso(created)) for name, created in store.operators()]
        print(admin_cli.table(("OPERATOR", "CREATED"), rows, "(no operators)"))
    except StoreError as exc:
        return fail(PROG, str(exc))
    finally:
        store.close()
    return EXIT_OK


def _cmd_operator_remove(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    store = _open_store(args, env)
    if isinstance(store, int):
        return store
    try:
        store.remove_operator(args.name, local_actor())
    except (NotFound, StoreError) as exc:
        return fail(PROG, str(exc))
    finally:
        store.close()
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
