"""``csc-agent``: the tenant agent's command line.

Builds an :class:`~tenant_agent.config.AgentConfig` from ``--config`` (or ``$CSC_AGENT_CONFIG``),
``CSC_AGENT_*`` environment variables and the flags, then runs the agent until it is stopped.
``csc-agent proxy`` instead runs the local/DMZ proxy (:mod:`tenant_agent.proxy.server`), configured by
a :class:`~tenant_agent.proxy.config.ProxyConfig` from ``--config`` (or
``$CSC_AGENT_PROXY_CONFIG``), ``CSC_AGENT_PROXY_*`` variables and its own flags.

Invariants: only this module (the entry point) reads ``os.environ``; every configuration problem
is printed at once (exit 2); the token never appears in output. Prefer ``--token-file`` or
``CSC_AGENT_TOKEN`` to ``--token``, which other local users can see in the process list.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from shared import checks
from shared.allocator import keep_freed_memory
from shared.cli_support import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    add_log_format_arg,
    add_version_arg,
    config_file,
    load_or_report,
    run_parser,
)
from shared.config import LOG_LEVELS, ConfigError
from shared.logsetup import configure_logging
from tenant_agent.config import ENV_PREFIX, load_agent_config
from tenant_agent.proxy.config import ENV_PREFIX as PROXY_ENV_PREFIX
from tenant_agent.proxy.config import load_proxy_config

PROG = "csc-agent"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="The CSC tenant agent: dials out to the CSC and relays its streams to the "
        "tenant's portal. Every option can also be set in the config file or as CSC_AGENT_<NAME>.",
        epilog=f"The local/DMZ proxy mode has its own options: {PROG} proxy --help. "
        f"{PROG} check [OPTIONS] tries the configuration once without serving.",
    )
    add_version_arg(parser)
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML file (or $CSC_AGENT_CONFIG)"
    )
    parser.add_argument("--csc", metavar="URL", help="URL of the CSC, e.g. wss://csc.example.com")
    token = parser.add_mutually_exclusive_group()
    token.add_argument(
        "--token", metavar="TOKEN", help="agent token (visible in ps: prefer a file)"
    )
    token.add_argument("--token-file", metavar="PATH", help="file holding the agent token")
    parser.add_argument("--upstream", metavar="URL", help="URL of the tenant portal")
    parser.add_argument("--tcp-upstream", metavar="HOST:PORT", help="target of TCP streams")
    parser.add_argument(
        "--sessions", metavar="N", help="parallel links to the CSC (1..16, or auto: one per node)"
    )
    parser.add_argument(
        "--alias",
        action="append",
        dest="aliases",
        metavar="ALIAS",
        help="alias to bind (repeatable; default: all the token grants)",
    )
    parser.add_argument("--ca-file", metavar="PATH", help="CA bundle to verify the CSC's TLS")
    parser.add_argument(
        "--metrics-listen", metavar="HOST:PORT|off", help="serve Prometheus /metrics there"
    )
    parser.add_argument("--log-level", metavar="LEVEL", help="/".join(LOG_LEVELS))
    add_log_format_arg(parser)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    names = ("csc", "token", "token_file", "upstream", "tcp_upstream", "sessions", "aliases")
    overrides: dict[str, object] = {name: getattr(args, name) for name in names}
    overrides["ca_file"] = args.ca_file
    overrides["metrics_listen"] = args.metrics_listen
    overrides["log_level"] = args.log_level
    overrides["log_format"] = args.log_format
    return overrides


def build_proxy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} proxy",
        description="The local/DMZ proxy: bootloaders configured with Host and Port connect "
        "here and are forwarded to the portal (HTTP reverse proxy for an http(s):// upstream, "
        "byte forwarding for tcp://HOST:PORT). Every option can also be set in the config file "
        "or as CSC_AGENT_PROXY_<NAME>.",
    )
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML file (or $CSC_AGENT_PROXY_CONFIG)"
    )
    parser.add_argument("--listen", metavar="HOST:PORT", help="where bootloaders connect")
    parser.add_argument(
        "--upstream", metavar="URL", help="http(s)://HOST:PORT[/PREFIX] or tcp://HOST:PORT"
    )
    parser.add_argument("--ca-file", metavar="PATH", help="CA bundle to verify an https upstream")
    parser.add_argument("--tls-cert", metavar="PATH", help="certificate chain: the listener's TLS")
    parser.add_argument("--tls-key", metavar="PATH", help="private key of --tls-cert")
    parser.add_argument(
        "--ready-file", type=Path, metavar="PATH", help="write the bound address when up"
    )
    parser.add_argument("--log-level", metavar="LEVEL", help="/".join(LOG_LEVELS))
    add_log_format_arg(parser)
    return parser


def _proxy_main(argv: list[str], environ: Mapping[str, str]) -> int:
    """``csc-agent proxy ...``: load the proxy's configuration and run it."""
    parsed = run_parser(build_proxy_parser(), argv)
    if isinstance(parsed, int):
        return parsed
    file = config_file(parsed.config, environ, PROXY_ENV_PREFIX)
    names = ("listen", "upstream", "ca_file", "tls_cert", "tls_key", "log_level", "log_format")
    overrides: dict[str, object] = {name: getattr(parsed, name) for name in names}
    config = load_or_report(
        f"{PROG} proxy", lambda: load_proxy_config(file=file, env=environ, overrides=overrides)
    )
    if config is None:
        return EXIT_USAGE
    configure_logging(config.log_level, PROG, fmt=config.log_format)
    from tenant_agent.proxy.server import run  # lazy, like the agent

    try:
        return run(config, ready_file=parsed.ready_file)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _check_main(argv: list[str], environ: Mapping[str, str]) -> int:
    """``csc-agent check ...``: load the configuration, try the CSC and the upstream once."""
    parser = build_parser()
    parser.prog = f"{PROG} check"
    parser.description = (
        "Check the agent's configuration without serving: load it, reach the CSC's /healthz, "
        "try one handshake with the token and connect to the upstream once. Exit 0 or 1."
    )
    parsed = run_parser(parser, argv)
    if isinstance(parsed, int):
        return parsed
    file = config_file(parsed.config, environ, ENV_PREFIX)
    try:
        config = load_agent_config(file=file, env=environ, overrides=_overrides(parsed))
    except ConfigError as exc:
        return checks.report(f"{PROG} check", checks.config_problems(exc.problems))
    configure_logging("error", PROG, fmt=config.log_format)  # the findings say it all
    from tenant_agent.check import check_agent  # lazy, like the agent

    where = f"{file} loads" if file is not None else "flags and CSC_AGENT_* variables load"
    found = [checks.ok("configuration", where), *check_agent(config)]
    return checks.report(f"{PROG} check", found)


def main(argv: Sequence[str] | None = None, *, env: Mapping[str, str] | None = None) -> int:
    """Entry point of ``csc-agent`` (and ``csc-agent proxy``); returns the exit code."""
    args = list(argv) if argv is not None else sys.argv[1:]
    environ = os.environ if env is None else env
    if args[:1] == ["proxy"]:
        return _proxy_main(args[1:], environ)
    if args[:1] == ["check"]:
        return _check_main(args[1:], environ)
    parsed = run_parser(build_parser(), args)
    if isinstance(parsed, int):
        return parsed
    file = config_file(parsed.config, environ, ENV_PREFIX)
    overrides = _overrides(parsed)
    config = load_or_report(
        PROG, lambda: load_agent_config(file=file, env=environ, overrides=overrides)
    )
    if config is None:
        return EXIT_USAGE
    configure_logging(config.log_level, PROG, fmt=config.log_format)
    keep_freed_memory()
    from tenant_agent.agent import run  # lazy: the CLI and config stay importable on their own

    try:
        return run(config)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
