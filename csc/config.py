"""The switching center's configuration: :class:`CSCConfig` and how it is loaded.

Defaults live in the dataclass; :func:`load_csc_config` overlays a TOML file, ``CSC_*``
environment variables and command-line overrides (see :mod:`shared.config`). ``CSC_AGENT_*``,
``CSC_PORTAL_*`` and ``CSC_BOOTLOADER_*`` variables belong to the other programs and are ignored
here, so no CSC setting may start with ``agent_``, ``portal_`` or ``bootloader_``; nor may one be
named ``admin_url``, ``admin_token*`` or ``admin_ca_file`` (``csc admin`` reads those).

Invariants of a loaded config: addresses parse as host:port, ``initial_window <= max_window <=
session_budget``, ``max_frame`` is within 16 KiB..16 MiB, ``heartbeat_timeout >
heartbeat_interval``, ``tls_cert``/``tls_key`` are both set (to existing files) or both unset,
and so are ``peer_tls_cert``/``peer_tls_key``/``peer_tls_ca`` (set only with ``peer_tls``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import (
    AUTO,
    KIB,
    MIB,
    Secret,
    check_network,
    duration_field,
    load_config,
    log_format_field,
    log_level_field,
    meta,
    parse_hostport,
    size_field,
    xdg_state_dir,
)
from shared.config import LOG_LEVELS as LOG_LEVELS  # re-exported: csc/cli.py lists them
from shared.link_config import link_field, link_problems

ENV_PREFIX = "CSC_"
#: Environment prefixes of the other programs, which share ``CSC_``.
OTHER_PREFIXES = (
    "CSC_AGENT_",
    "CSC_PORTAL_",
    "CSC_BOOTLOADER_",
    "CSC_ADMIN_URL",
    "CSC_ADMIN_TOKEN",  # and CSC_ADMIN_TOKEN_FILE
    "CSC_ADMIN_CA_FILE",
)


def default_state_dir(env: Mapping[str, str]) -> Path:
    """``$XDG_STATE_HOME/csc`` when that is an absolute path, else ``~/.local/state/csc``."""
    return xdg_state_dir(env, "csc")


def _state_dir_from_process_env() -> Path:
    # Only for direct construction (tests, embedding); load_csc_config uses the env passed in.
    return default_state_dir(os.environ)


@dataclass(frozen=True, kw_only=True)
class CSCConfig:
    """Every setting of ``csc serve``; see README.md's configuration section."""

    listen: str = field(
        default="127.0.0.1:8080",
        metadata=meta(kind="hostport", help="HTTP listener: agents' WebSocket and bootloaders"),
    )
    tcp_listen: str | None = field(
        default="127.0.0.1:8081",
        metadata=meta(kind="hostport", help="TCP ingress (`CONNECT alias`); `off` disables it"),
    )
    admin_listen: str | None = field(
        default="127.0.0.1:8082",
        metadata=meta(
            kind="hostport", help="admin API (`/v1/admin/`, operator token); `off` disables it"
        ),
    )
    metrics_listen: str | None = field(
        default="127.0.0.1:9464",
        metadata=meta(
            kind="hostport",
            help="Prometheus `/metrics` (every tenant's traffic: keep it off public networks); "
            "`off` disables it",
        ),
    )
    state_dir: Path = field(
        default_factory=_state_dir_from_process_env,
        metadata=meta(
            env_default=default_state_dir,
            doc_default="`$XDG_STATE_HOME/csc` or `~/.local/state/csc`",
            help="signing key, `csc.db` (tenants, aliases, tokens, audit), `admin-token`",
        ),
    )
    tls_cert: Path | None = field(
        default=None, metadata=meta(help="PEM certificate chain; with `tls_key` enables TLS")
    )
    tls_key: Path | None = field(default=None, metadata=meta(help="PEM private key of `tls_cert`"))
    token_audience: str = field(
        default="csc-agent", metadata=meta(help="`aud` required in agent tokens")
    )
    token_issuer: str = field(default="csc", metadata=meta(help="`iss` required in agent tokens"))
    drain_timeout: float = duration_field(
        30.0, "on SIGTERM, how long in-flight streams may finish", minimum=0
    )
    heartbeat_interval: float = link_field(
        "heartbeat_interval", help="heartbeat period on agent links"
    )
    heartbeat_timeout: float = link_field("heartbeat_timeout")
    open_timeout: float = duration_field(75.0, "how long the agent may take to answer OPEN")
    stuck_timeout: float = duration_field(
        60.0, "an agent link whose sends make no progress this long (it stopped reading) is closed"
    )
    tcp_handshake_timeout: float = duration_field(
        10.0, "how long a TCP client may take to send CONNECT"
    )
    registry_refresh: float = duration_field(
        2.0, "how often revocations, suspensions and token expiry are checked"
    )
    client_stream_share: float = field(
        default=0.5,
        metadata=meta(
            above=0.0,
            maximum=1.0,
            help="share of a tenant's `max_streams` one client address may hold at once "
            "(at least 1 stream; IPv6 by /64; per node in a cluster); 1 turns it off",
        ),
    )
    proxy_protocol: list[str] = field(
        default_factory=list,
        metadata=meta(
            check=check_network,
            help="balancers (IP addresses or networks) that start each connection to the public "
            "and TCP listeners with a PROXY protocol header (v1 or v2), which then names the "
            "client for the bounds per address, the access log and X-Forwarded-For; required "
            "from them, not read from other peers; empty: none",
            doc_default="none",
        ),
    )
    max_connections: int = field(
        default=AUTO,
        metadata=meta(
            kind="count_or_auto",
            minimum=1,
            help="connections the node holds at once on the public and TCP listeners, agent "
            "links included; beyond: 503 node_full at once; auto: the open-file limit "
            "(RLIMIT_NOFILE, whose soft value `csc serve` raises to the hard one at start) "
            "less an eighth of it, at least 64, for everything else",
        ),
    )
    client_max_connections: int | None = field(
        default=1024,
        metadata=meta(
            minimum=1,
            help="connections one client address may hold open at once on the public and TCP "
            "listeners together (IPv6 by /64; an agent's link stops counting once it is one); "
            "beyond: 429 too_many_connections at once; off: no bound",
        ),
    )
    default_max_sessions: int | None = field(
        default=32,
        metadata=meta(
            minimum=1,
            help="agent sessions one tenant may hold at once on one node when it has no "
            "`max_sessions` of its own (its link budgets are the node's memory); beyond: 429 "
            "tenant_limit; off: no bound",
        ),
    )
    max_streams_per_session: int = field(
        default=256, metadata=meta(minimum=1, help="concurrent streams on one agent session")
    )
    initial_window: int = link_field("initial_window")
    max_window: int = link_field("max_window")
    session_budget: int = link_field(
        "session_budget", help="buffered bytes allowed per agent session"
    )
    tenant_window_growth: int = size_field(
        64 * MIB,
        "bytes by which the stream windows of one tenant's agent sessions on this node may "
        "grow beyond `initial_window`, all sessions together",
        minimum=0,
    )
    node_window_growth: int = size_field(
        256 * MIB,
        "bytes by which the stream windows of all agent sessions on this node may grow beyond "
        "`initial_window`, all tenants together",
        minimum=0,
    )
    max_frame: int = link_field("max_frame")
    max_body_size: int | None = field(
        default=None,
        metadata=meta(kind="size", minimum=0, help="largest request body; unset means unlimited"),
    )
    http_head_timeout: float = duration_field(
        10.0,
        "time a client has to send a whole request head (from connect or its first byte); "
        "with TLS, also the time its handshake may take (public and TCP listeners)",
    )
    http_keepalive_timeout: float = duration_field(
        60.0, "an idle keep-alive connection of the public listener is closed after this"
    )
    http_max_head_size: int = size_field(
        16 * KIB,
        "largest request head (line and fields), buffered per connection; beyond: 431",
        minimum=1 * KIB,
    )
    http_head_buffer_total: int = size_field(
        16 * MIB, "bytes of unfinished request heads buffered across all connections", minimum=1
    )
    http_body_timeout: float = duration_field(
        30.0, "longest a request body may stall (no byte while the CSC waits for one); then 408"
    )
    http_body_min_rate: int = size_field(
        1 * KIB,
        "slowest request body, bytes per second, after `http_body_grace`; 0: no floor",
        minimum=0,
    )
    http_body_grace: float = duration_field(
        10.0, "how long a request body may be slower than `http_body_min_rate`"
    )
    client_send_timeout: float = duration_field(
        60.0,
        "longest a client on the public or TCP listener may take none of the bytes waiting for "
        "it (an answer, tunnelled bytes); then its connection is closed and its stream ended",
    )
    client_buffer_limit: int | None = field(
        default=256 * MIB,
        metadata=meta(
            kind="size",
            minimum=0,
            help="bytes the public and TCP listeners hold that the other end does not take "
            "(answers for slow clients: write buffers and their streams; request bodies and "
            "tunnelled bytes for slow portals), all together; past it, connections behind for "
            "a twelfth of `client_send_timeout` are closed: those whose bytes nobody took "
            "meanwhile, then the slowest of the tenant holding the most; off: no bound",
        ),
    )
    log_level: str = log_level_field()
    log_format: str = log_format_field()
    access_log: bool = field(
        default=True,
        metadata=meta(help="log one `info` event per bootloader request (logger `csc.access`)"),
    )
    # -- several nodes as one CSC (docs/operations.md "Running a cluster") --------------------
    redis_url: Secret | None = field(
        default=None,
        metadata=meta(
            help="routing state shared by the nodes: `redis://`, `rediss://`, `unix://`, "
            "`redis+sentinel://H:P,H:P/?sentinel_master_name=NAME` or `redis+cluster://H:P,H:P`; "
            "unset: one node, routes in memory"
        ),
    )
    database_url: Secret | None = field(
        default=None,
        metadata=meta(
            help="`postgresql://…` for tenants, aliases, tokens, operators and audit; "
            "unset: SQLite `csc.db` in `state_dir`"
        ),
    )
    node_id: str | None = field(
        default=None,
        metadata=meta(
            doc_default="host name + a per-boot id",
            help="this node's name in the cluster (sessions, logs, metrics)",
        ),
    )
    peer_listen: str | None = field(
        default=None,
        metadata=meta(kind="hostport", help="node-to-node listener; required with `redis_url`"),
    )
    peer_advertise: str | None = field(
        default=None,
        metadata=meta(
            kind="hostport",
            doc_default="`peer_listen`",
            help="the address other nodes dial to reach this one",
        ),
    )
    cluster_key: Secret | None = field(
        default=None,
        metadata=meta(help="secret shared by the nodes (at least 32 bytes); or `cluster_key_file`"),
    )
    cluster_key_file: Path | None = field(
        default=None, metadata=meta(help="file holding the cluster secret (first line)")
    )
    peer_tls: bool = field(
        default=True,
        metadata=meta(
            help="TLS 1.3 with mutual authentication on peer links (keyed by the cluster secret "
            "unless `peer_tls_cert` is set); `false` only where the network already encrypts "
            "and authenticates pod-to-pod traffic (a service mesh)"
        ),
    )
    peer_tls_cert: Path | None = field(
        default=None,
        metadata=meta(
            doc_default="derived from the cluster secret",
            help="PEM certificate (chain) this node presents on peer links; with "
            "`peer_tls_key` and `peer_tls_ca`; renewed files are loaded without a restart",
        ),
    )
    peer_tls_key: Path | None = field(
        default=None, metadata=meta(help="PEM private key of `peer_tls_cert`")
    )
    peer_tls_ca: Path | None = field(
        default=None,
        metadata=meta(
            help="PEM CA certificate(s) a peer's certificate must chain to (no host name check: "
            "use a CA only for this cluster's nodes)"
        ),
    )
    signing_key_file: Path | None = field(
        default=None,
        metadata=meta(
            doc_default="`signing-key.pem` in `state_dir`",
            help="PEM private key that signs and verifies agent tokens; the same on every node",
        ),
    )
    redis_prefix: str = field(
        default="csc",
        metadata=meta(
            help="prefix of every Redis key and channel (clusters sharing a Redis need their own)"
        ),
    )
    route_lease: float = duration_field(
        6.0, "a node's routes expire this long after its last heartbeat to Redis"
    )

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_hostport(self.listen)

    @property
    def tcp_listen_address(self) -> tuple[str, int] | None:
        return None if self.tcp_listen is None else parse_hostport(self.tcp_listen)

    @property
    def admin_listen_address(self) -> tuple[str, int] | None:
        return None if self.admin_listen is None else parse_hostport(self.admin_listen)

    @property
    def metrics_listen_address(self) -> tuple[str, int] | None:
        return None if self.metrics_listen is None else parse_hostport(self.metrics_listen)

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None and self.tls_key is not None

    def validate(self) -> list[str]:
        """Cross-field checks; single-field ranges are checked by the loader."""
        problems = link_problems(self)
        problems += self._tls_problems()
        problems += self._peer_tls_problems()
        problems += self._cluster_problems()
        for name in ("token_audience", "token_issuer"):
            if not getattr(self, name).strip():
                problems.append(f"{name} must not be empty")
        return problems

    @property
    def clustered(self) -> bool:
        """Whether this node shares routing state with others (``redis_url`` is set)."""
        return self.redis_url is not None

    def _cluster_problems(self) -> list[str]:
        problems: list[str] = []
        if self.database_url is not None and not self.database_url.reveal().startswith(
            ("postgresql://", "postgres://")
        ):
            problems.append("database_url must be a postgresql:// URL")
        if not self.clustered:
            return problems
        from csc.cluster.redisconn import parse_redis_url  # only when clustered: lazy import

        assert self.redis_url is not None
        try:
            parse_redis_url(self.redis_url)
        except ValueError as exc:
            problems.append(str(exc))
        if self.database_url is None:
            problems.append(
                "redis_url needs database_url: every node must read the same tenants, "
                "aliases and tokens (set database_url to the shared PostgreSQL)"
            )
        if self.peer_listen is None:
            problems.append("redis_url needs peer_listen (HOST:PORT of the node-to-node listener)")
        if self.cluster_key is not None and self.cluster_key_file is not None:
            problems.append("set cluster_key or cluster_key_file, not both")
        elif self.cluster_key is None and self.cluster_key_file is None:
            problems.append(
                "redis_url needs a cluster secret: cluster_key_file or CSC_CLUSTER_KEY "
                "(at least 32 bytes, the same on every node)"
            )
        elif self.cluster_key is not None and len(self.cluster_key.reveal().encode()) < 32:
            problems.append("cluster_key must be at least 32 bytes long")
        if re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", self.redis_prefix) is None:
            problems.append("redis_prefix must be 1-64 letters, digits or _.:-")
        return problems

    def cluster_secret(self) -> bytes:
        """The cluster secret from ``cluster_key`` or the first line of ``cluster_key_file``;
        raises ValueError when it cannot be read or is shorter than 32 bytes."""
        if self.cluster_key is not None:
            return self.cluster_key.reveal().encode()
        if self.cluster_key_file is None:
            raise ValueError("no cluster secret: set cluster_key_file or CSC_CLUSTER_KEY")
        try:
            text = self.cluster_key_file.read_text().splitlines()
        except OSError as exc:
            raise ValueError(
                f"cluster_key_file {self.cluster_key_file}: {exc.strerror or exc}"
            ) from None
        secret = (text[0] if text else "").strip().encode()
        if len(secret) < 32:
            raise ValueError(
                f"cluster_key_file {self.cluster_key_file}: the secret must be at least 32 bytes"
            )
        return secret

    def _tls_problems(self) -> list[str]:
        if (self.tls_cert is None) != (self.tls_key is None):
            return ["tls_cert and tls_key must be set together (or neither)"]
        return [
            f"{name} {path}: no such file"
            for name, path in (("tls_cert", self.tls_cert), ("tls_key", self.tls_key))
            if path is not None and not path.is_file()
        ]

    def _peer_tls_problems(self) -> list[str]:
        files = {
            "peer_tls_cert": self.peer_tls_cert,
            "peer_tls_key": self.peer_tls_key,
            "peer_tls_ca": self.peer_tls_ca,
        }
        given = [name for name, path in files.items() if path is not None]
        if not given:
            return []
        if not self.peer_tls:
            return [f"{', '.join(given)} set but peer_tls is false"]
        if len(given) != len(files):
            return ["peer_tls_cert, peer_tls_key and peer_tls_ca must be set together (or none)"]
        return [
            f"{name} {path}: no such file"
            for name, path in files.items()
            if path is not None and not path.is_file()
        ]


def load_csc_config(
    *, file: Path | None, env: Mapping[str, str], overrides: Mapping[str, object] | None = None
) -> CSCConfig:
    """Load :class:`CSCConfig`; raises :class:`shared.config.ConfigError` with every problem."""
    return load_config(
        CSCConfig,
        file=file,
        env=env,
        env_prefix=ENV_PREFIX,
        overrides=overrides,
        ignore_env_prefixes=OTHER_PREFIXES,
    )
