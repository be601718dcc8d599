"""The tenant agent's configuration: :class:`AgentConfig` and how it is loaded.

Defaults live in the dataclass; :func:`load_agent_config` overlays a TOML file, ``CSC_AGENT_*``
environment variables and command-line overrides (see :mod:`shared.config`).

Invariants of a loaded config: ``csc`` is an http/https/ws/wss URL and ``upstream`` an http/https
URL; ``token`` holds the agent token (read from ``token_file`` when that is given; setting both is
an error); ``aliases`` are normalised grants; ``initial_window <= max_window <= session_budget``;
``backoff_initial <= backoff_max``; ``heartbeat_timeout > heartbeat_interval``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared.aliases import normalise_grant
from shared.config import (
    ConfigError,
    Secret,
    duration_field,
    load_config,
    log_format_field,
    log_level_field,
    meta,
    parse_hostport,
)
from shared.link_config import link_field, link_problems

ENV_PREFIX = "CSC_AGENT_"
#: The proxy mode's prefix (tenant_agent/proxy/config.py): no agent setting starts `proxy_`.
PROXY_ENV_PREFIX = "CSC_AGENT_PROXY_"
#: ``sessions`` at most; ``sessions = auto`` starts with AUTO_SESSIONS and grows to one per
#: CSC node (tenant_agent/agent.py), never past this.
MAX_SESSIONS = 16
AUTO_SESSIONS = 2


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """Every setting of ``csc-agent``; see README.md's configuration section."""

    csc: str = field(
        metadata=meta(kind="url", schemes=("http", "https", "ws", "wss"), help="URL of the CSC")
    )
    token: Secret = field(
        default=Secret(""),
        metadata=meta(
            required_unless=("token_file",),
            doc_default="(required unless `token_file`)",
            help="agent token (a JWT)",
        ),
    )
    token_file: Path | None = field(
        default=None,
        metadata=meta(
            help="file holding the agent token; a new token written there is taken up "
            "without a restart (looked at every 10 s and on SIGHUP)"
        ),
    )
    upstream: str = field(
        metadata=meta(kind="url", schemes=("http", "https"), help="URL of the tenant portal")
    )
    tcp_upstream: str | None = field(
        default=None,
        metadata=meta(kind="hostport", help="HOST:PORT for TCP streams; unset refuses them"),
    )
    sessions: int = field(
        default=2,
        metadata=meta(
            kind="count_or_auto",
            minimum=1,
            maximum=MAX_SESSIONS,
            help="parallel links to the CSC (1..16), or auto: one per CSC node, at least 2",
        ),
    )
    aliases: list[str] = field(
        default_factory=list,
        metadata=meta(
            check=normalise_grant,
            doc_default="[] (all the token grants)",
            help="aliases to bind; comma-separated in the environment",
        ),
    )
    ca_file: Path | None = field(
        default=None, metadata=meta(help="PEM CA bundle to verify the CSC's certificate")
    )
    connect_timeout: float = duration_field(10.0, "timeout of one connection attempt to the CSC")
    upstream_connect_timeout: float = duration_field(5.0, "timeout connecting to the upstream")
    upstream_timeout: float = duration_field(60.0, "timeout waiting for the upstream's answer")
    heartbeat_interval: float = link_field("heartbeat_interval")
    heartbeat_timeout: float = link_field("heartbeat_timeout")
    backoff_initial: float = duration_field(0.5, "first reconnect delay")
    backoff_max: float = duration_field(30.0, "largest reconnect delay")
    backoff_reset_after: float = duration_field(
        60.0, "a link up this long resets the reconnect delay"
    )
    retry_after_max: float = duration_field(
        300.0, "longest `Retry-After` of a 429/503 refusal the agent waits for"
    )
    drain_timeout: float = duration_field(
        30.0, "on SIGTERM, how long in-flight streams may finish", minimum=0
    )
    initial_window: int = link_field("initial_window")
    max_window: int = link_field("max_window")
    session_budget: int = link_field("session_budget")
    max_frame: int = link_field("max_frame")
    metrics_listen: str | None = field(
        default=None,
        metadata=meta(
            kind="hostport",
            doc_default="off",
            help="HOST:PORT serving Prometheus `/metrics`, e.g. 127.0.0.1:9465",
        ),
    )
    log_level: str = log_level_field()
    log_format: str = log_format_field()

    @property
    def tcp_upstream_address(self) -> tuple[str, int] | None:
        return None if self.tcp_upstream is None else parse_hostport(self.tcp_upstream)

    @property
    def metrics_listen_address(self) -> tuple[str, int] | None:
        return None if self.metrics_listen is None else parse_hostport(self.metrics_listen)

    def resolve(self) -> AgentConfig:
        """Read ``token_file`` into ``token`` (called by the loader before :meth:`validate`)."""
        if self.token_file is None:
            return self
        if self.token:
            raise ConfigError(["set token or token_file, not both"])
        try:
            text = self.token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError([f"token_file {self.token_file}: cannot read: {reason}"]) from None
        if not text:
            raise ConfigError([f"token_file {self.token_file}: the file is empty"])
        return dataclasses.replace(self, token=Secret(text))

    def validate(self) -> list[str]:
        """Cross-field checks; single-field ranges are checked by the loader."""
        problems: list[str] = []
        if not self.token and self.token_file is None:
            problems.append("token must not be empty")
        problems += link_problems(self)
        if self.backoff_initial > self.backoff_max:
            problems.append(
                f"backoff_initial ({self.backoff_initial:g}s) must not exceed "
                f"backoff_max ({self.backoff_max:g}s)"
            )
        if self.ca_file is not None and not self.ca_file.is_file():
            problems.append(f"ca_file {self.ca_file}: no such file")
        return problems


def load_agent_config(
    *, file: Path | None, env: Mapping[str, str], overrides: Mapping[str, object] | None = None
) -> AgentConfig:
    """Load :class:`AgentConfig`; raises :class:`shared.config.ConfigError` with every problem.

    ``CSC_AGENT_PROXY_*`` variables belong to ``csc-agent proxy`` and are ignored here.
    """
    return load_config(
        AgentConfig,
        file=file,
        env=env,
        env_prefix=ENV_PREFIX,
        overrides=overrides,
        ignore_env_prefixes=(PROXY_ENV_PREFIX,),
    )
