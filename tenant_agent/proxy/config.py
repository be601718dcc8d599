"""The local/DMZ proxy's configuration (``csc-agent proxy``): :class:`ProxyConfig` and its loader.

Defaults live in the dataclass; :func:`load_proxy_config` overlays a TOML file,
``CSC_AGENT_PROXY_*`` environment variables and command-line overrides (see
:mod:`shared.config`). The prefix is distinct from the agent's ``CSC_AGENT_*`` so one
environment can hold both; the agent ignores ``CSC_AGENT_PROXY_*``.

Invariants of a loaded config: ``listen`` parses as host:port; ``upstream`` is an
``http(s)://host[:port][/prefix]`` URL without query or fragment, or ``tcp://host:port`` with
nothing else; ``ca_file`` is set only for an ``https`` upstream and loads as a CA bundle;
``tls_cert`` and ``tls_key`` are both set (and load as a key pair) or both unset.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from shared.config import (
    KIB,
    MIB,
    duration_field,
    load_config,
    log_format_field,
    log_level_field,
    meta,
    parse_hostport,
    size_field,
)

ENV_PREFIX = "CSC_AGENT_PROXY_"


@dataclass(frozen=True, kw_only=True)
class ProxyConfig:
    """Every setting of ``csc-agent proxy``; see README.md's configuration section."""

    listen: str = field(metadata=meta(kind="hostport", help="HOST:PORT where bootloaders connect"))
    upstream: str = field(
        metadata=meta(
            kind="url",
            schemes=("http", "https", "tcp"),
            help="portal URL (`http(s)://host:port[/prefix]`), or `tcp://host:port` to forward TCP",
        )
    )
    ca_file: Path | None = field(
        default=None, metadata=meta(help="PEM CA bundle to verify an https upstream")
    )
    tls_cert: Path | None = field(
        default=None,
        metadata=meta(help="PEM certificate chain; with `tls_key` the listener speaks TLS"),
    )
    tls_key: Path | None = field(default=None, metadata=meta(help="PEM private key of `tls_cert`"))
    upstream_connect_timeout: float = duration_field(5.0, "timeout connecting to the upstream")
    upstream_timeout: float = duration_field(
        60.0, "timeout waiting for the upstream's answer (HTTP)"
    )
    header_timeout: float = duration_field(
        10.0, "a client must send a whole request head (and TLS handshake) within this"
    )
    idle_timeout: float = duration_field(
        60.0, "an idle keep-alive connection, or a client that stops sending or reading, is closed"
    )
    max_header_size: int = size_field(
        32 * KIB, "largest request head (1KiB..1MiB)", minimum=KIB, maximum=MIB
    )
    max_body_size: int | None = field(
        default=None,
        metadata=meta(kind="size", minimum=0, help="largest request body; unset means unlimited"),
    )
    drain_timeout: float = duration_field(
        30.0, "on SIGTERM, how long requests in flight may finish", minimum=0
    )
    log_level: str = log_level_field()
    log_format: str = log_format_field()

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_hostport(self.listen)

    @property
    def mode(self) -> str:
        """``"http"`` (a reverse proxy) or ``"tcp"`` (bytes forwarded both ways)."""
        return "tcp" if urlsplit(self.upstream).scheme.lower() == "tcp" else "http"

    @property
    def tcp_address(self) -> tuple[str, int]:
        """Host and port of a ``tcp://`` upstream."""
        parts = urlsplit(self.upstream)
        assert parts.hostname is not None and parts.port is not None
        return parts.hostname, parts.port

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None and self.tls_key is not None

    def validate(self) -> list[str]:
        """Cross-field checks; single-field ranges are checked by the loader."""
        problems = self._upstream_problems()
        if self.ca_file is not None:
            if not self.upstream.lower().startswith("https://"):
                problems.append("ca_file is only used with an https:// upstream")
            else:
                problems += _load_problems({"ca_file": self.ca_file}, self.client_ssl)
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("tls_cert and tls_key must be set together (or neither)")
        elif self.tls_cert is not None and self.tls_key is not None:
            pair = {"tls_cert": self.tls_cert, "tls_key": self.tls_key}
            problems += _load_problems(pair, self.server_ssl)
        return problems

    def _upstream_problems(self) -> list[str]:
        parts = urlsplit(self.upstream)
        if parts.query or parts.fragment:
            return [f"upstream {self.upstream!r}: a query or fragment is not allowed"]
        if self.mode != "tcp":
            return []
        if parts.port is None:
            return [f"upstream {self.upstream!r}: a tcp:// upstream needs a port"]
        if parts.path not in ("", "/") or parts.username is not None:
            return [f"upstream {self.upstream!r}: a tcp:// upstream is only tcp://HOST:PORT"]
        return []

    def server_ssl(self) -> ssl.SSLContext | None:
        """The listener's TLS context, or None without ``tls_cert``/``tls_key``."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.tls_cert, self.tls_key)
        return ctx

    def client_ssl(self) -> ssl.SSLContext | None:
        """The context verifying an https upstream with ``ca_file`` (None: the system's CAs)."""
        if self.ca_file is None:
            return None
        return ssl.create_default_context(cafile=str(self.ca_file))


def _load_problems(files: Mapping[str, Path], load: Callable[[], object]) -> list[str]:
    """Problems of loading TLS material from ``files`` (setting name -> path)."""
    missing = [f"{name} {path}: no such file" for name, path in files.items() if not path.is_file()]
    if missing:
        return missing
    try:
        load()
    except (OSError, ssl.SSLError, ValueError) as exc:
        named = " and ".join(f"{name} {path}" for name, path in files.items())
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        return [f"{named}: cannot be loaded ({reason})"]
    return []


def load_proxy_config(
    *, file: Path | None, env: Mapping[str, str], overrides: Mapping[str, object] | None = None
) -> ProxyConfig:
    """Load :class:`ProxyConfig`; raises :class:`shared.config.ConfigError` with every problem."""
    return load_config(ProxyConfig, file=file, env=env, env_prefix=ENV_PREFIX, overrides=overrides)
