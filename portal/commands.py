"""The ``csc-portal`` commands: one handler per command, on an opened :class:`Context`.

A handler returns a :class:`Result` and prints nothing itself (the password prompt aside).
:func:`run` opens the state directory (database created and migrated, signing key created on
first use), calls the handler, prints the result (JSON with ``--json``, else its text on stdout
and its notes on stderr: decided there, once) and turns every expected failure into a message on
stderr and an exit code: :class:`portal.store.InvalidValue` (bad input) exits 2; any other
:class:`portal.store.PortalDataError` (unknown name, duplicate, still in use), a database, key or
I/O error exits 1. Lists print as :func:`shared.cli_support.table`; an empty one says ``(none)``
on stderr. The command table itself is in :mod:`portal.cli`.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from portal import catalog, store
from portal.blobs import BlobStore, collect_files
from portal.config import PortalConfig
from portal.db import DB_FILE, Database, DatabaseError
from portal.getsite import BootloaderUnavailable, build_bootloader_pyz, write_site
from portal.keys import KEY_FILE, PortalKey, PortalKeyError, load_or_create_key
from portal.passwords import Passwords, check_password
from portal.sms import length_warning, sms_length, sms_text
from shared.cli_support import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, table
from shared.errors import BadAlias
from shared.timefmt import iso, with_iso_times


@dataclass
class Context:
    prog: str
    config: PortalConfig
    db: Database
    key: PortalKey
    stdin: TextIO
    stdout: TextIO
    stderr: TextIO

    @contextmanager
    def conn(self) -> Iterator[sqlite3.Connection]:
        with self.db.connect() as conn:
            yield conn

    def say(self, message: str) -> None:
        """A message for the operator (stderr)."""
        print(f"{self.prog}: {message}", file=self.stderr)

    def out(self, text: str) -> None:
        print(text, file=self.stdout)

    def show(self, result: Result, *, as_json: bool) -> None:
        """Print ``result``: its data as JSON, or its text (stdout) and notes (stderr)."""
        if as_json:
            self.out(json_text(result.data))
            return
        if result.text:
            self.out(result.text)
        for note in result.notes:
            self.say(note)


@dataclass(frozen=True)
class Result:
    """What a command did: ``data`` for ``--json``; ``text`` for stdout and ``notes`` for the
    operator (stderr) otherwise; ``code`` the exit code."""

    data: Any = None
    text: str = ""
    notes: tuple[str, ...] = ()
    code: int = EXIT_OK


Command = Callable[[Context, argparse.Namespace], Result]


def done(*notes: str) -> Result:
    """A command that changed something and says so on stderr."""
    return Result(notes=notes)


def listing(
    data: Sequence[Any], headers: Sequence[str], rows: Sequence[Sequence[object]]
) -> Result:
    """A list: ``data`` as JSON (records as dicts), or ``rows`` as a table; ``(none)`` if empty."""
    text = table(headers, rows, "")
    return Result([asdict(d) for d in data], text, () if text else ("(none)",))


def missing_state(config: PortalConfig) -> str | None:
    """Why the state directory cannot serve a command that must not create it, or None."""
    state_dir = config.state_dir.absolute()
    for path in (state_dir / DB_FILE, state_dir / KEY_FILE):
        if not path.exists():
            return (
                f"no portal state in {state_dir} ({path.name} is missing); give the portal's "
                "state directory with --state-dir or CSC_PORTAL_STATE_DIR (or state_dir in "
                "--config); only serve and the commands that add things (user add, "
                "device-type add, app add, ...) create it"
            )
    return None


def run(prog: str, config: PortalConfig, args: argparse.Namespace) -> int:
    """Open the state directory and run ``args.handler``; see the module doc for exit codes.

    A command that does not create things (``args.creates`` false: lists, removals, ``key
    show``, ``sms``, ``get-site``) fails on a missing state directory instead of creating an
    empty portal with a new key."""
    if not getattr(args, "creates", False):
        problem = missing_state(config)
        if problem is not None:
            return _fail(prog, problem, EXIT_FAILURE)
    try:
        db = Database(config.state_dir)
        for step in db.open():
            print(f"{prog}: database {db.path}: {step}", file=sys.stderr)
        key, created = load_or_create_key(config.state_dir)
        if created:
            print(f"{prog}: created the portal key in {config.state_dir}", file=sys.stderr)
        ctx = Context(prog, config, db, key, sys.stdin, sys.stdout, sys.stderr)
        command: Command = args.handler
        result = command(ctx, args)
        ctx.show(result, as_json=getattr(args, "json", False))
        return result.code
    except store.InvalidValue as exc:
        return _fail(prog, str(exc), EXIT_USAGE)
    except (store.PortalDataError, DatabaseError, PortalKeyError, BootloaderUnavailable) as exc:
        return _fail(prog, str(exc), EXIT_FAILURE)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(prog, f"{where}{exc.strerror or exc}", EXIT_FAILURE)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _fail(prog: str, message: str, code: int) -> int:
    print(f"{prog}: {message}", file=sys.stderr)
    return code


# --- output --------------------------------------------------------------------------------


#: the fields of listed records that hold a Unix time (written as ISO 8601 in JSON, too)
TIME_FIELDS = ("created_at", "first_logon", "last_logon")


def when(stamp: float) -> str:
    return iso(stamp)


def json_text(data: Any) -> str:
    """``data`` as JSON; times in :data:`TIME_FIELDS` as ISO 8601 strings, as tables show them."""
    if isinstance(data, list):
        data = [with_iso_times(d, TIME_FIELDS) if isinstance(d, dict) else d for d in data]
    return json.dumps(data, indent=2, ensure_ascii=False)


# --- users ---------------------------------------------------------------------------------


def read_password(ctx: Context, args: argparse.Namespace) -> str:
    """The new password from ``--password``, ``--password-stdin``, ``--password-file`` or a
    terminal prompt (twice); :class:`store.InvalidValue` when there is none or it is unacceptable."""
    if args.password is not None:
        password = args.password
    elif args.password_stdin:
        password = ctx.stdin.readline().rstrip("\r\n")
    elif args.password_file is not None:
        with open(args.password_file, encoding="utf-8") as fh:
            password = fh.readline().rstrip("\r\n")
    elif ctx.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat the password: ") != password:
            raise store.InvalidValue("the two passwords differ")
    else:
        raise store.InvalidValue(
            "no password: use --password-stdin or --password-file (or run in a terminal)"
        )
    try:
        return check_password(password)
    except ValueError as exc:
        raise store.InvalidValue(str(exc)) from None


def _hash(ctx: Context, password: str) -> str:
    return Passwords(ctx.config.password_hash_cost).hash(password)


def user_add(ctx: Context, args: argparse.Namespace) -> Result:
    name = store.check_user_name(args.name)
    with ctx.conn() as conn:  # fail early (before the prompt) on a duplicate
        if store.credentials(conn, name) is not None:
            raise store.AlreadyExists(f"a user named {name!r} already exists")
    password_hash = _hash(ctx, read_password(ctx, args))
    with ctx.conn() as conn:
        store.add_user(conn, name, password_hash, args.groups)
    return done(f"user {name!r} created")


def user_passwd(ctx: Context, args: argparse.Namespace) -> Result:
    with ctx.conn() as conn:
        store.user_id(conn, args.name)
    password_hash = _hash(ctx, read_password(ctx, args))
    with ctx.conn() as conn:
        store.set_password_hash(conn, args.name, password_hash)
    return done(f"password of {store.check_user_name(args.name)!r} changed")


def user_remove(ctx: Context, args: argparse.Namespace) -> Result:
    with ctx.conn() as conn:
        store.remove_user(conn, args.name)
    return done(f"user {store.check_user_name(args.name)!r} removed")


def user_list(ctx: Context, args: argparse.Namespace) -> Result:
    with ctx.conn() as conn:
        users = store.list_users(conn)
    rows = [[u.name, u.groups, u.devices, when(u.created_at)] for u in users]
    return listing(users, ["USER", "GROUPS", "DEVICES", "CREATED"], rows)


# --- groups --------------------------------------------------------------------------------


def group_add(ctx: Context, args: argparse.Namespace) -> Result:
    with ctx.conn() as conn:
        name = store.add_group(conn, args.name)
    return done(f"group {name!r} created")


def group_remove(ctx: Context, args: argparse.Namespace) -> Result:
    with ctx.conn() as conn:
        store.remove_group(conn, args.name)
    return done(f"group {store.check_name(args.name, 'group')!r} removed")


def group_list(ctx: Context, args: argparse.Namespace) -> Result:
    with ctx.conn() as conn:
        groups = store.list_groups(conn)
    return listing(groups, ["GROUP", "MEMBERS"], [[g.name, g.members] for g in groups])


def group_add_member(ctx: Context, args: argparse.Namespace) -> Result:
    with ctx.conn() as conn:
        added = store.add_members(conn, args.group, args.users)
    group = store.check_name(args.group, "group")
    return done(f"added to {group!r}: {', '.join(added) or 'nobody new'}")


def group_remove_member(ctx: Context, args: argparse.Namespace) -> Result:
    with ctx.conn() as conn:
        store.remove_members(conn, args.group, args.users)
    group = store.check_name(args.group, "group")
    return done(f"removed from {group!r}: {', '.join(args.users)}")


# --- device types --------------------------------------------------------------------------


def device_type_add(ctx: Context, args: argparse.Namespace) -> Result:
    with ctx.conn() as conn:
        name = store.add_device_type(conn, args.name, args.description)
    return done(f"device type {name!r} created")


def device_type_remove(ctx: Context, args: argparse.Namespace) -> Result:
    with ctx.conn() as conn:
        store.remove_device_type(conn, args.name)
    return done(f"device type {store.check_name(args.name, 'device type')!r} removed")


def device_type_list(ctx: Context, args: argparse.Namespace) -> Result:
    with ctx.conn() as conn:
        types = store.list_device_types(conn)
    return listing(types, ["DEVICE TYPE", "DESCRIPTION"], [[t.name, t.description] for t in types])


# --- apps ----------------------------------------------------------------------------------


def _split_version(spec: str) -> tuple[str, str | None]:
    name, at, version = spec.partition("@")
    if at and not version:
        raise store.InvalidValue(f"{spec!r}: a version must follow '@' (NAME@VERSION)")
    return name, version if at else None


def app_add(ctx: Context, args: argparse.Namespace) -> Result:
    name = store.check_name(args.name, "app")
    version = catalog.check_version(args.app_version)
    with ctx.conn() as conn:
        store.device_type_id(conn, args.device_type)
    files = collect_files(name, args.paths)
    blobs = BlobStore(ctx.config.state_dir / "blobs")
    entries = []
    for source in files:
        sha256, size = blobs.put_file(source.source)
        entries.append(catalog.FileEntry(source.package_path, sha256, size, source.mode))
    with ctx.conn() as conn:
        catalog.add_app_version(conn, name, version, args.device_type, entries)
    total = sum(e.size for e in entries)
    return done(
        f"app {name} {version} for {store.check_name(args.device_type, 'device type')}: "
        f"{len(entries)} files, {total} bytes"
    )


def app_list(ctx: Context, args: argparse.Namespace) -> Result:
    with ctx.conn() as conn:
        versions = catalog.list_app_versions(conn)
    rows = [
        [v.name, v.version, v.device_type, v.files, v.size, when(v.created_at)] for v in versions
    ]
    return listing(versions, ["APP", "VERSION", "DEVICE TYPE", "FILES", "BYTES", "ADDED"], rows)


def app_remove(ctx: Context, args: argparse.Namespace) -> Result:
    name, version = _split_version(args.name)
    with ctx.conn() as conn:
        count = catalog.remove_app(conn, name, version, args.device_type)
    return done(
        f"removed {count} version(s) of {store.check_name(name, 'app')!r}",
        "`csc-portal prune` deletes their files and packages once nothing uses them",
    )


# --- policies ------------------------------------------------------------------------------


def _settings(items: Sequence[str]) -> dict[str, str]:
    settings: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise store.InvalidValue(f"{item!r} is not KEY=VALUE")
        settings[key.strip()] = value
    return settings


def policy_set(ctx: Context, args: argparse.Namespace) -> Result:
    settings = _settings(args.settings)
    with ctx.conn() as conn:
        created = catalog.set_policy(conn, args.name, settings)
    what = "created" if created else "updated"
    policy = store.check_name(args.name, "policy")
    return done(f"policy {policy!r} {what}: {', '.join(settings)}")


def policy_unset(ctx: Context, args: argparse.Namespace) -> Result:
    with ctx.conn() as conn:
        catalog.unset_policy_keys(conn, args.name, args.keys)
    policy = store.check_name(args.name, "policy")
    return done(f"policy {policy!r}: removed {', '.join(args.keys)}")


def policy_remove(ctx: Context, args: argparse.Namespace) -> Result:
    with ctx.conn() as conn:
        catalog.remove_policy(conn, args.name)
    return done(f"policy {store.check_name(args.name, 'policy')!r} removed")


def policy_list(ctx: Context, args: argparse.Namespace) -> Result:
    with ctx.conn() as conn:
        policies = catalog.list_policies(conn)
    rows = [[p.name, k, v] for p in policies for k, v in p.settings.items()]
    rows += [[p.name, "-", ""] for p in policies if not p.settings]
    return listing(policies, ["POLICY", "KEY", "VALUE"], sorted(rows))


# --- deployments and devices ---------------------------------------------------------------


def _target(args: argparse.Namespace) -> tuple[store.TargetKind, str]:
    return ("user", args.user) if args.user is not None else ("group", args.group)


def deploy(ctx: Context, args: argparse.Namespace) -> Result:
    name, version = _split_version(args.name) if args.kind == "app" else (args.name, None)
    kind, target = _target(args)
    with ctx.conn() as conn:
        outcome = catalog.deploy(conn, args.kind, name, kind, target, version)
    pinned = f" (pinned to {version})" if version else ""
    return done(f"{args.kind} {name}{pinned} deployed to {kind} {target}: {outcome}")


def undeploy(ctx: Context, args: argparse.Namespace) -> Result:
    kind, target = _target(args)
    with ctx.conn() as conn:
        catalog.undeploy(conn, args.kind, args.name, kind, target)
    return done(f"{args.kind} {args.name} no longer deployed to {kind} {target}")


def deployments(ctx: Context, args: argparse.Namespace) -> Result:
    with ctx.conn() as conn:
        rows = catalog.list_deployments(conn)
    return listing(
        rows,
        ["KIND", "NAME", "VERSION", "TO"],
        [[d.kind, d.name, d.version or "-", f"{d.target_kind} {d.target}"] for d in rows],
    )


def devices(ctx: Context, args: argparse.Namespace) -> Result:
    with ctx.conn() as conn:
        rows = store.list_devices(conn)
    return listing(
        rows,
        ["DEVICE", "USER", "DEVICE TYPE", "LAST LOGON", "FROM", "PACKAGE"],
        [
            [
                d.device_id,
                d.user,
                d.device_type,
                when(d.last_logon),
                d.last_address,
                d.last_package[:16],
            ]
            for d in rows
        ],
    )


# --- key, SMS, get site, serve -------------------------------------------------------------


def key_show(ctx: Context, args: argparse.Namespace) -> Result:
    key = ctx.key
    return Result(
        {"key": key.public_b64, "fingerprint": key.fingerprint},
        f"public key:  {key.public_b64}\nfingerprint: {key.fingerprint}",
    )


def _sms_destination(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    if args.alias is not None and (args.host is not None or args.port is not None):
        raise store.InvalidValue("give --alias or --host/--port, not both")
    if (args.host is None) != (args.port is None):
        raise store.InvalidValue("--host and --port go together")
    if args.port is not None and not 0 < args.port < 65536:
        raise store.InvalidValue(f"--port {args.port}: not a port number (1..65535)")
    if args.alias is not None:
        return {"alias": args.alias}
    if args.host is not None:
        return {"host": args.host, "port": args.port}
    config = ctx.config
    if config.sms_alias is not None:
        return {"alias": config.sms_alias}
    if config.sms_host is not None:
        return {"host": config.sms_host, "port": config.sms_port}
    raise store.InvalidValue(
        "the SMS needs an alias or a proxy: give --alias or --host/--port, "
        "or set sms_alias or sms_host/sms_port"
    )


def sms(ctx: Context, args: argparse.Namespace) -> Result:
    destination = _sms_destination(ctx, args)
    if ctx.config.get_url is None:
        raise store.InvalidValue("the SMS needs the get site's URL: give --get-url or set get_url")
    user = None
    if args.user is not None:
        with ctx.conn() as conn:
            store.user_id(conn, args.user)
        user = store.check_user_name(args.user)
    try:
        text = sms_text(ctx.config.get_url, ctx.key.fingerprint, user=user, **destination)
    except BadAlias as exc:
        raise store.InvalidValue(f"--alias: {exc.message}") from None
    warning = length_warning(sms_length(text))
    return Result(text=text, notes=() if warning is None else (f"warning: {warning}",))


def get_site(ctx: Context, args: argparse.Namespace) -> Result:
    pyz = build_bootloader_pyz(args.bootloader_source)
    with ctx.conn() as conn:
        types = store.list_device_types(conn)
    written = write_site(args.out, ctx.config.name, ctx.key.fingerprint, types, pyz)
    return done(f"wrote {len(written)} files to {args.out}")


def prune(ctx: Context, args: argparse.Namespace) -> Result:
    from portal.prune import prune as prune_unused

    report = prune_unused(
        ctx.db,
        ctx.config.state_dir,
        ctx.key,
        ctx.config.name,
        session_ttl=ctx.config.session_ttl,
        min_age=args.min_age,
        dry_run=args.dry_run,
    )
    verb = "would delete" if args.dry_run else "deleted"
    note = (
        f"{verb} {len(report.packages)} package(s), {len(report.blobs)} blob(s) and "
        f"{len(report.temporary)} temporary file(s): {report.bytes} bytes"
    )
    return Result(asdict(report), notes=(note,))


def serve(ctx: Context, args: argparse.Namespace) -> Result:
    from portal import server  # lazy: the admin commands stay free of aiohttp
    from portal.state import build_state
    from shared.logsetup import configure_logging

    configure_logging(ctx.config.log_level, ctx.prog, fmt=ctx.config.log_format)
    state, _ = build_state(ctx.config)
    try:
        code = server.serve(
            ctx.config, state, ready_file=args.ready_file, bootloader_dir=args.bootloader_source
        )
    except OSError as exc:
        from shared.oserrors import describe_os_error

        where = describe_os_error(exc, ctx.config.listen)
        return Result(notes=(f"cannot listen: {where}",), code=EXIT_FAILURE)
    return Result(code=code)
