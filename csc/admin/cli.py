"""``csc admin ...``: a running node's admin API from the command line.

Commands: ``tenants list|show|create|update|suspend|resume|delete``, ``aliases
list|assign|unassign``, ``tokens list|issue|revoke``, ``sessions list|disconnect``, ``audit``,
``drain``. Each prints an aligned table or a short sentence, or with ``--json`` the API's JSON
as it came. ``tokens issue`` prints the token alone on stdout (its details go to stderr).

Where the API is: ``--url``, else ``$CSC_ADMIN_URL``, else ``<state-dir>/admin-url`` (written by
the running node). The operator token: ``--token-file``, else ``$CSC_ADMIN_TOKEN``, else
``$CSC_ADMIN_TOKEN_FILE``, else ``<state-dir>/admin-token``. The state directory: ``--state-dir``,
else ``$CSC_STATE_DIR``, else the default of ``csc serve``. ``--ca-file`` (or
``$CSC_ADMIN_CA_FILE``) verifies an HTTPS admin API with a private CA.

Exit codes: 0 success; 1 the API refused (its error code and message, and every problem of a
400/409, are printed) or could not be reached; 2 usage error or no URL / token to be found.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csc.admin.client import (
    AdminApiError,
    AdminClient,
    Unreachable,
    UsageProblem,
    client_for,
    segment,
    with_defaults,
)
from shared.cli_support import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, fail
from shared.cli_support import table as table  # re-exported: csc/cli.py prints with it

PROG = "csc admin"


# --- output ------------------------------------------------------------------------------------


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 token``, ``2 tokens`` (``many`` for an irregular plural)."""
    return f"{count} {word if count == 1 else many or word + 's'}"


def human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"  # pragma: no cover - the loop always returns


def _limits(limits: Mapping[str, Any]) -> str:
    parts = [f"{k.removeprefix('max_')}={v}" for k, v in limits.items() if v is not None]
    return ",".join(parts) or "unlimited"


def _tenant_text(t: Mapping[str, Any]) -> str:
    lines = [
        f"tenant    {t['id']}",
        f"name      {t['name']}",
        f"contact   {t['contact'] or '-'}",
        f"state     {t['state']}",
        f"limits    {_limits(t['limits'])}",
        f"aliases   {', '.join(t['aliases']) or '-'}",
        f"sessions  {t['sessions']}",
        f"created   {t['created_at']}",
    ]
    return "\n".join(lines)


def _tokens_table(tokens: list[Mapping[str, Any]]) -> str:
    rows = [
        (t["jti"], t["tenant"], t["status"], t["expires_at"], t["aliases"], t["issued_by"])
        for t in tokens
    ]
    headers = ("JTI", "TENANT", "STATUS", "EXPIRES", "ALIASES", "ISSUED BY")
    return table(headers, rows, "(no tokens)")


def _sessions_table(sessions: list[Mapping[str, Any]]) -> str:
    rows = [
        (
            s["id"],
            s["tenant"],
            s["aliases"],
            s["remote"],
            s["since"],
            s["streams"],
            human_bytes(s["bytes_in"]),
            human_bytes(s["bytes_out"]),
            s["state"],
        )
        for s in sessions
    ]
    headers = ("SESSION", "TENANT", "ALIASES", "REMOTE", "SINCE", "STREAMS", "IN", "OUT", "STATE")
    return table(headers, rows, "(no live sessions)")


# --- commands ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shown:
    """A command's result: the API's JSON and how it reads as text."""

    data: Any
    text: str


Command = Callable[[AdminClient, argparse.Namespace], Shown]


def _tenants_list(c: AdminClient, args: argparse.Namespace) -> Shown:
    data = c.call("GET", "/tenants")
    rows = [
        (t["id"], t["name"], t["state"], t["aliases"], t["sessions"], t["contact"] or None)
        for t in data["tenants"]
    ]
    headers = ("TENANT", "NAME", "STATE", "ALIASES", "SESSIONS", "CONTACT")
    return Shown(data, table(headers, rows, "(no tenants)"))


def _tenants_show(c: AdminClient, args: argparse.Namespace) -> Shown:
    t = c.call("GET", f"/tenants/{segment(args.tenant)}")
    tokens, sessions = t["tokens"], t["live_sessions"]
    text = "\n\n".join(
        [
            _tenant_text(t),
            f"Tokens ({len(tokens)})\n{_tokens_table(tokens)}",
            f"Live sessions ({len(sessions)})\n{_sessions_table(sessions)}",
        ]
    )
    return Shown(t, text)


def _tenant_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for name in ("name", "contact"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    limits = {
        name: (None if value == UNLIMITED else value)
        for name in ("max_sessions", "max_streams", "max_request_rate")
        if (value := getattr(args, name)) is not None
    }
    if limits:
        body["limits"] = limits
    return body


def _tenants_create(c: AdminClient, args: argparse.Namespace) -> Shown:
    t = c.call("POST", "/tenants", {"id": args.tenant, **_tenant_body(args)})
    return Shown(t, f"created tenant {t['id']}\n{_tenant_text(t)}")


def _tenants_update(c: AdminClient, args: argparse.Namespace) -> Shown:
    body = _tenant_body(args)
    if not body:
        raise UsageProblem("nothing to change: give --name, --contact or a limit")
    t = c.call("PATCH", f"/tenants/{segment(args.tenant)}", body)
    return Shown(t, f"updated tenant {t['id']}\n{_tenant_text(t)}")


def _set_state(state: str) -> Command:
    def run(c: AdminClient, args: argparse.Namespace) -> Shown:
        t = c.call("PATCH", f"/tenants/{segment(args.tenant)}", {"state": state})
        closed = t.get("sessions_closed", 0)
        closed_text = plural(closed, "session")
        return Shown(t, f"tenant {t['id']} is {t['state']} ({closed_text} closed)")

    return run


def _tenants_delete(c: AdminClient, args: argparse.Namespace) -> Shown:
    query = {"cascade": "true"} if args.cascade else None
    d = c.call("DELETE", f"/tenants/{segment(args.tenant)}", query=query)
    freed = ", ".join(d["aliases_freed"]) or "none"
    text = (
        f"deleted tenant {d['deleted']}: aliases freed: {freed}; "
        f"{plural(d['tokens_revoked'], 'token')} revoked; "
        f"{plural(d['sessions_closed'], 'session')} closed"
    )
    return Shown(d, text)


def _aliases_list(c: AdminClient, args: argparse.Namespace) -> Shown:
    query = {"tenant": args.tenant} if args.tenant else None
    data = c.call("GET", "/aliases", query=query)
    rows = [(a["alias"], a["tenant"], a["sessions"], a["assigned_at"]) for a in data["aliases"]]
    headers = ("ALIAS", "TENANT", "SESSIONS", "ASSIGNED")
    return Shown(data, table(headers, rows, "(no aliases)"))


def _looks_swapped(tenant: str, aliases: Sequence[str]) -> bool:
    """``TENANT`` holds an ``@`` (tenant ids never do) and no ``ALIAS`` does: given the other
    way round."""
    return "@" in tenant and not any("@" in a for a in aliases)


def _check_order(verb: str, tenant: str, aliases: Sequence[str]) -> None:
    if _looks_swapped(tenant, aliases):
        fixed = " ".join([*aliases, tenant])
        raise UsageProblem(
            f"the arguments look swapped: {tenant!r} is an alias, not a tenant id "
            f"(the order is TENANT then ALIAS: csc admin aliases {verb} {fixed})"
        )


def _aliases_assign(c: AdminClient, args: argparse.Namespace) -> Shown:
    _check_order("assign", args.tenant, args.aliases)
    d = c.call("POST", f"/tenants/{segment(args.tenant)}/aliases", {"aliases": args.aliases})
    added = ", ".join(d["assigned"]) or "nothing new"
    return Shown(
        d, f"tenant {d['tenant']}: assigned {added}; aliases now {', '.join(d['aliases'])}"
    )


def _aliases_unassign(c: AdminClient, args: argparse.Namespace) -> Shown:
    _check_order("unassign", args.tenant, [args.alias])
    path = f"/tenants/{segment(args.tenant)}/aliases/{segment(args.alias)}"
    d = c.call("DELETE", path)
    return Shown(d, f"tenant {d['tenant']}: unassigned {d['unassigned']}")


def _tokens_list(c: AdminClient, args: argparse.Namespace) -> Shown:
    data = c.call("GET", "/tokens", query={"tenant": args.tenant} if args.tenant else None)
    return Shown(data, _tokens_table(data["tokens"]))


def _tokens_issue(c: AdminClient, args: argparse.Namespace) -> Shown:
    body = {"tenant": args.tenant, "aliases": args.aliases, "ttl": args.ttl}
    d = c.call("POST", "/tokens", body)
    aliases = ", ".join(d["aliases"])
    print(
        f"{PROG}: token {d['jti']} for tenant {d['tenant']!r}, aliases {aliases}, "
        f"expires {d['expires_at']}",
        file=sys.stderr,
    )
    return Shown(d, d["token"])


def _tokens_revoke(c: AdminClient, args: argparse.Namespace) -> Shown:
    query = {"unrecorded": "true"} if args.unrecorded else None
    d = c.call("POST", f"/tokens/{segment(args.jti)}/revoke", query=query)
    note = " (it already was)" if d["already_revoked"] else ""
    unknown = "" if d["token"] is not None else " (not in this CSC's records)"
    closed = plural(d["sessions_closed"], "session")
    return Shown(d, f"revoked token {d['jti']}{note}{unknown}; {closed} closed")


def _sessions_list(c: AdminClient, args: argparse.Namespace) -> Shown:
    data = c.call("GET", "/sessions", query={"tenant": args.tenant} if args.tenant else None)
    return Shown(data, _sessions_table(data["sessions"]))


def _sessions_disconnect(c: AdminClient, args: argparse.Namespace) -> Shown:
    d = c.call("DELETE", f"/sessions/{segment(args.session)}")
    return Shown(d, f"disconnected session {d['disconnected']} of tenant {d['tenant']}")


def _audit(c: AdminClient, args: argparse.Namespace) -> Shown:
    data = c.call("GET", "/audit", query={"limit": str(args.limit)})
    rows = [
        (
            e["id"],
            e["at"],
            e["operator"],
            e["remote"],
            e["action"],
            e["target"],
            json.dumps(e["details"], separators=(",", ":")),
        )
        for e in data["entries"]
    ]
    headers = ("ID", "TIME", "OPERATOR", "REMOTE", "ACTION", "TARGET", "DETAILS")
    return Shown(data, table(headers, rows, "(no audit entries)"))


def _drain(c: AdminClient, args: argparse.Namespace) -> Shown:
    d = c.call("POST", "/drain")
    already = " (already draining)" if d["already_draining"] else ""
    text = (
        f"node {d['node']} is draining{already}: {plural(d['sessions'], 'session')}, "
        f"{plural(d['streams'], 'stream')} in flight"
    )
    return Shown(d, text)


# --- the parser --------------------------------------------------------------------------------

UNLIMITED = "unlimited"


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float | str]:
    def parse(text: str) -> int | float | str:
        if text.lower() in ("none", UNLIMITED):
            return UNLIMITED
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a positive number or 'none', not {text!r}"
            ) from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number or 'none', not {text!r}")
        return value

    return parse


def _count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to 1000, not {text!r}")
    return int(text)


#: The options every ``csc admin`` command takes, after ``admin`` or after the command.
def _common() -> argparse.ArgumentParser:
    # SUPPRESS: an option given after ``admin`` is not reset by the command's parser
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    group = common.add_argument_group("admin API")
    group.add_argument("--url", help="admin API URL (or $CSC_ADMIN_URL, or <state-dir>/admin-url)")
    group.add_argument("--token-file", type=Path, metavar="PATH", help="operator token file")
    group.add_argument("--state-dir", metavar="DIR", help="the node's state directory")
    group.add_argument("--ca-file", type=Path, metavar="FILE", help="CA bundle for https")
    group.add_argument("--timeout", type=float, help="seconds per request (default 30)")
    group.add_argument("--json", action="store_true", help="print the API's JSON")
    return common


def _tenant_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", help="display name")
    parser.add_argument("--contact", help="support contact shown to users when the portal is down")
    parser.add_argument("--max-sessions", type=_positive(int), metavar="N|none")
    parser.add_argument("--max-streams", type=_positive(int), metavar="N|none")
    parser.add_argument(
        "--max-request-rate", type=_positive(float), metavar="R|none", help="requests/s"
    )


Setup = Callable[[argparse.ArgumentParser], None]


def _positional(*names: str) -> Setup:
    def setup(parser: argparse.ArgumentParser) -> None:
        for name in names:
            parser.add_argument(name)

    return setup


def _tenant_filter(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenant", help="only this tenant's")


def _create_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tenant", help="tenant id, e.g. acme")
    _tenant_options(parser)


def _update_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tenant")
    _tenant_options(parser)


def _delete_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tenant")
    parser.add_argument(
        "--cascade", action="store_true", help="also free its aliases (refused without, if any)"
    )


def _assign_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tenant")
    parser.add_argument("aliases", nargs="+", metavar="ALIAS")


def _revoke_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("jti")
    parser.add_argument(
        "--unrecorded",
        action="store_true",
        help="revoke an id this CSC has no record of (otherwise an unknown id is an error)",
    )


def _issue_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tenant")
    parser.add_argument("--alias", action="append", required=True, dest="aliases", metavar="ALIAS")
    parser.add_argument("--ttl", default="30d", help="lifetime, e.g. 12h, 30d (default 30d)")


def _audit_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=_count, default=50, metavar="N", help="1..1000")


GROUPS = {
    "tenants": "tenants: list, show, create, update, suspend, resume, delete",
    "aliases": "alias assignments: list, assign, unassign",
    "tokens": "agent tokens: list, issue, revoke",
    "sessions": "live agent sessions: list, disconnect",
}
#: (group or None, command, what it runs, help, its arguments)
COMMANDS: tuple[tuple[str | None, str, Command, str, Setup], ...] = (
    ("tenants", "list", _tenants_list, "list the tenants", _positional()),
    ("tenants", "show", _tenants_show, "a tenant, its tokens and sessions", _positional("tenant")),
    ("tenants", "create", _tenants_create, "create a tenant", _create_args),
    ("tenants", "update", _tenants_update, "change name, contact or limits", _update_args),
    (
        "tenants",
        "suspend",
        _set_state("suspended"),
        "suspend (sessions close)",
        _positional("tenant"),
    ),
    ("tenants", "resume", _set_state("active"), "make it active again", _positional("tenant")),
    ("tenants", "delete", _tenants_delete, "delete (revokes its tokens)", _delete_args),
    ("aliases", "list", _aliases_list, "list assignments", _tenant_filter),
    ("aliases", "assign", _aliases_assign, "assign aliases or *@domain patterns", _assign_args),
    ("aliases", "unassign", _aliases_unassign, "take one back", _positional("tenant", "alias")),
    ("tokens", "list", _tokens_list, "list issued tokens", _tenant_filter),
    ("tokens", "issue", _tokens_issue, "issue a token (alone on stdout)", _issue_args),
    ("tokens", "revoke", _tokens_revoke, "revoke a token by its jti", _revoke_args),
    ("sessions", "list", _sessions_list, "list live sessions", _tenant_filter),
    ("sessions", "disconnect", _sessions_disconnect, "close one", _positional("session")),
    (None, "audit", _audit, "the audit log, newest first", _audit_args),
    (None, "drain", _drain, "drain the node and stop it", _positional()),
)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``admin`` and its commands to the ``csc`` parser."""
    common = _common()
    admin = commands.add_parser("admin", help="drive a running node's admin API", parents=[common])
    admin.set_defaults(handler=_usage_of(admin))
    groups = admin.add_subparsers(dest="group", metavar="GROUP")
    actions: dict[str | None, argparse._SubParsersAction[argparse.ArgumentParser]] = {None: groups}
    for name, help in GROUPS.items():
        parser = groups.add_parser(name, help=help)
        parser.set_defaults(handler=_usage_of(parser))
        actions[name] = parser.add_subparsers(dest="action", metavar="ACTION")
    for group, name, run, help, setup in COMMANDS:
        parser = actions[group].add_parser(name, help=help, parents=[common])
        setup(parser)
        parser.set_defaults(handler=_handler(run))


def _usage_of(
    parser: argparse.ArgumentParser,
) -> Callable[[argparse.Namespace, Mapping[str, str]], int]:
    def usage(args: argparse.Namespace, env: Mapping[str, str]) -> int:
        parser.print_help(sys.stderr)
        return EXIT_USAGE

    return usage


def _handler(run: Command) -> Callable[[argparse.Namespace, Mapping[str, str]], int]:
    def handle(args: argparse.Namespace, env: Mapping[str, str]) -> int:
        with_defaults(args)
        try:
            shown = run(client_for(args, env), args)
        except UsageProblem as exc:
            return fail(PROG, str(exc), EXIT_USAGE)
        except Unreachable as exc:
            return fail(PROG, str(exc))
        except AdminApiError as err:
            print(f"{PROG}: {err.message} ({err.code}, HTTP {err.status})", file=sys.stderr)
            if err.problems != [err.message]:
                for problem in err.problems:
                    print(f"  {problem}", file=sys.stderr)
            return EXIT_FAILURE
        print(json.dumps(shown.data, indent=2) if args.json else shown.text)
        return EXIT_OK

    return handle
