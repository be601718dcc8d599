"""The provisioning portal's configuration: :class:`PortalConfig` and how it is loaded.

Defaults live in the dataclass; :func:`load_portal_config` overlays a TOML file, ``CSC_PORTAL_*``
environment variables and command-line overrides (see :mod:`shared.config`).

Invariants of a loaded config: ``listen`` parses as host:port; ``get_url`` (when set) is an
http/https URL; ``sms_alias`` is a normalised alias; ``sms_host`` and ``sms_port`` are set together
and never together with ``sms_alias``; every ``trusted_proxies`` entry is an IP network;
``throttle_lockout <= throttle_max_lockout``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared.aliases import normalise_alias
from shared.config import (
    check_network,
    duration_field,
    load_config,
    log_format_field,
    log_level_field,
    meta,
    parse_hostport,
    xdg_state_dir,
)

ENV_PREFIX = "CSC_PORTAL_"
#: Password hashing profiles (see :mod:`portal.passwords`); ``test`` is for tests only.
HASH_COSTS = ("standard", "test")
#: Default of ``hash_queue``: waiting logons per hashing worker (1-2 s of argon2 work each).
HASH_QUEUE_PER_WORKER = 16


def default_state_dir(env: Mapping[str, str]) -> Path:
    """``$XDG_STATE_HOME/csc-portal`` when that is absolute, else ``~/.local/state/csc-portal``."""
    return xdg_state_dir(env, "csc-portal")


def _state_dir_from_process_env() -> Path:
    # Only for direct construction (tests, embedding); the loader uses the env passed in.
    return default_state_dir(os.environ)


@dataclass(frozen=True, kw_only=True)
class PortalConfig:
    """Every setting of ``csc-portal``; see README.md's "Portal" section."""

    name: str = field(
        default="Provisioning portal",
        metadata=meta(help="the portal's name, shown to users and signed into packages"),
    )
    listen: str = field(
        default="127.0.0.1:8000", metadata=meta(kind="hostport", help="HTTP listener")
    )
    state_dir: Path = field(
        default_factory=_state_dir_from_process_env,
        metadata=meta(
            env_default=default_state_dir,
            doc_default="`$XDG_STATE_HOME/csc-portal` or `~/.local/state/csc-portal`",
            help="`portal.db`, `portal-key.pem`, `blobs/`, `packages/`",
        ),
    )
    get_url: str | None = field(
        default=None,
        metadata=meta(kind="url", help="public URL of the bootloader download site, for the SMS"),
    )
    csc_ca_file: Path | None = field(
        default=None,
        metadata=meta(
            help="PEM CA bundle of the CSC's TLS certificate, built into the bootloader the get "
            "site serves through the CSC"
        ),
    )
    sms_alias: str | None = field(
        default=None,
        metadata=meta(check=normalise_alias, help="alias the SMS names (or `sms_host`)"),
    )
    sms_host: str | None = field(
        default=None, metadata=meta(help="host of the local/DMZ proxy the SMS names")
    )
    sms_port: int | None = field(
        default=None,
        metadata=meta(minimum=1, maximum=65535, help="port of that proxy (with `sms_host`)"),
    )
    session_ttl: float = duration_field(900.0, "lifetime of a logon session (package download)")
    throttle_failures: int = field(
        default=5,
        metadata=meta(
            minimum=1,
            help="failed logons of one user from one client address before that user is "
            "locked out at that address",
        ),
    )
    throttle_address_failures: int = field(
        default=20,
        metadata=meta(minimum=1, help="failed logons from one client address before a lockout"),
    )
    throttle_window: float = duration_field(300.0, "period in which those failures count")
    throttle_lockout: float = duration_field(60.0, "first lockout; doubles with each further one")
    throttle_max_lockout: float = duration_field(3600.0, "longest lockout")
    trusted_proxies: list[str] = field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        metadata=meta(
            check=check_network,
            help="peers whose `X-Forwarded-For` (rightmost entry) names the client",
        ),
    )
    password_hash_cost: str = field(
        default="standard",
        metadata=meta(
            choices=HASH_COSTS,
            help="argon2id cost: `standard` (RFC 9106, 64 MiB); `test` only for tests",
        ),
    )
    hash_workers: int = field(
        default=4,
        metadata=meta(minimum=1, maximum=64, help="password verifications run at once"),
    )
    hash_queue: int | None = field(
        default=None,
        metadata=meta(
            minimum=0,
            doc_default=f"{HASH_QUEUE_PER_WORKER} per hash worker",
            help="logons that may wait for a password verification; beyond, 503 `busy` with "
            "`Retry-After`",
        ),
    )
    log_level: str = log_level_field()
    log_format: str = log_format_field()

    @property
    def hash_queue_limit(self) -> int:
        """Logons that may wait for a verification (``hash_queue``, or its default)."""
        if self.hash_queue is not None:
            return self.hash_queue
        return HASH_QUEUE_PER_WORKER * self.hash_workers

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_hostport(self.listen)

    def validate(self) -> list[str]:
        """Cross-field checks; single-field ranges are checked by the loader."""
        problems: list[str] = []
        if not self.name.strip():
            problems.append("name must not be empty")
        if (self.sms_host is None) != (self.sms_port is None):
            problems.append("sms_host and sms_port must be set together (or neither)")
        if self.sms_alias is not None and self.sms_host is not None:
            problems.append("set sms_alias or sms_host/sms_port, not both")
        if self.sms_host is not None and not _valid_host(self.sms_host):
            problems.append(f"sms_host {self.sms_host!r} is not a host name or IP address")
        if self.throttle_lockout > self.throttle_max_lockout:
            problems.append(
                f"throttle_lockout ({self.throttle_lockout:g}s) must not exceed "
                f"throttle_max_lockout ({self.throttle_max_lockout:g}s)"
            )
        return problems


def _valid_host(host: str) -> bool:
    try:
        parse_hostport(f"[{host}]:1" if ":" in host else f"{host}:1")
    except ValueError:
        return False
    return True


def load_portal_config(
    *, file: Path | None, env: Mapping[str, str], overrides: Mapping[str, object] | None = None
) -> PortalConfig:
    """Load :class:`PortalConfig`; raises :class:`shared.config.ConfigError` with every problem."""
    return load_config(PortalConfig, file=file, env=env, env_prefix=ENV_PREFIX, overrides=overrides)
