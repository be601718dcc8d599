"""The connection to the Redis that CSC nodes share: URL parsing, one client factory, the
start-up check.

``redis_url`` takes five forms (docs/operations.md "Redis"):

* ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`` and ``rediss://...`` (TLS; options
  ``ssl_ca_certs=PATH`` and ``ssl_cert_reqs=required|optional|none``);
* ``unix://[[USER]:PASSWORD@]/PATH/TO/SOCKET[?db=N]``;
* ``redis+sentinel://[[USER]:PASSWORD@]H1:P1,H2:P2[/DB]?sentinel_master_name=NAME`` (options
  ``sentinel_username``, ``sentinel_password``: the sentinels' own credentials; the user info
  authenticates against the master);
* ``redis+cluster://[[USER]:PASSWORD@]H1:P1,H2:P2`` (startup nodes; database 0 only).

:func:`connect_redis` returns a ``redis.asyncio.Redis`` (server, socket, Sentinel master) or a
``redis.asyncio.RedisCluster`` whose commands are retried with backoff on connection errors and
timeouts (and, for a cluster, on ``CLUSTERDOWN``; ``MOVED``/``ASK`` are followed by redis-py), for
about :data:`RETRY_SECONDS` in all, which covers a Sentinel or Cluster failover with short
timeouts. It first checks that every server it will write to runs Redis 7.0 or newer.

Invariants: a password never appears in a message, a log line or a ``repr`` (``redacted`` masks
it, :class:`RedisTarget` keeps it as a :class:`~shared.config.Secret`); a failed
:func:`connect_redis` leaves no connection open; every socket operation has a deadline.
"""

from __future__ import annotations

import asyncio
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from redis.asyncio import Redis, RedisCluster, Sentinel
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.config import Secret
from shared.units import parse_hostport

__all__ = [
    "MIN_VERSION",
    "RETRY_SECONDS",
    "STARTUP_RETRIES",
    "RedisClient",
    "RedisKind",
    "RedisTarget",
    "RedisUnavailable",
    "build_client",
    "check_versions",
    "command_retry",
    "connect_redis",
    "parse_redis_url",
    "redacted",
    "server_versions",
    "version_tuple",
]

#: The oldest Redis server the CSC runs against (functions, ``SET ... GET``, sharded pub/sub).
MIN_VERSION: tuple[int, int] = (7, 0)

#: The client every caller gets: a plain (or Sentinel-managed) client, or a cluster client.
RedisClient = Redis | RedisCluster

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379

# Command retries: the first delay is 0.1-0.2 s, doubling, capped at 0.5-1 s (EqualJitterBackoff),
# so 15 retries span about 7-13 s of connection errors, longer than a failover with
# down-after-milliseconds / cluster-node-timeout of a second or two.
RETRY_BASE = 0.1
RETRY_CAP = 1.0
RETRIES = 15
RETRY_SECONDS = 10.0
STARTUP_RETRIES = 2


class RedisUnavailable(RuntimeError):
    """Redis cannot be used: unreachable, refused the credentials, or too old. One line."""


class RedisKind(StrEnum):
    """How the nodes reach Redis, from the URL's scheme."""

    SERVER = "server"  # redis://, rediss://
    UNIX = "unix"  # unix://
    SENTINEL = "sentinel"  # redis+sentinel://
    CLUSTER = "cluster"  # redis+cluster://


_SCHEMES: dict[str, RedisKind] = {
    "redis": RedisKind.SERVER,
    "rediss": RedisKind.SERVER,
    "unix": RedisKind.UNIX,
    "redis+sentinel": RedisKind.SENTINEL,
    "redis+cluster": RedisKind.CLUSTER,
}
_OPTIONS: dict[RedisKind, frozenset[str]] = {
    RedisKind.SERVER: frozenset({"db"}),
    RedisKind.UNIX: frozenset({"db"}),
    RedisKind.SENTINEL: frozenset(
        {"db", "sentinel_master_name", "sentinel_username", "sentinel_password"}
    ),
    RedisKind.CLUSTER: frozenset(),
}
_TLS_OPTIONS = frozenset({"ssl_ca_certs", "ssl_cert_reqs"})
_CERT_REQS = ("required", "optional", "none")
_SECRET_OPTION = re.compile(r"(?i)((?:^|[?&])[^=&]*password=)[^&#]*")


@dataclass(frozen=True)
class RedisTarget:
    """What a ``redis_url`` names. Passwords are :class:`~shared.config.Secret`."""

    kind: RedisKind
    #: ``(host, port)`` of the server, the sentinels or the cluster's startup nodes; empty for UNIX.
    addresses: tuple[tuple[str, int], ...] = ()
    socket_path: str | None = None
    tls: bool = False
    db: int = 0
    username: str | None = None
    password: Secret | None = None
    master_name: str | None = None
    sentinel_username: str | None = None
    sentinel_password: Secret | None = None
    ssl_ca_certs: str | None = None
    ssl_cert_reqs: str | None = None

    def describe(self) -> str:
        """What a connection tries, for messages: addresses, socket path, master name."""
        hosts = ", ".join(_hostport(host, port) for host, port in self.addresses)
        if self.kind is RedisKind.UNIX:
            return f"socket {self.socket_path}"
        if self.kind is RedisKind.SENTINEL:
            return f"sentinels {hosts} for master {self.master_name!r}"
        if self.kind is RedisKind.CLUSTER:
            return f"cluster nodes {hosts}"
        return f"{hosts}{' (TLS)' if self.tls else ''}"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def redacted(url: str | Secret) -> str:
    """``url`` with its password (and any ``*password=`` option) replaced by ``***``.

    Works on any text, even one that is no valid URL: whatever stands between ``://`` and the
    last ``@`` after it is user info, and all of it but the user name is masked.
    """
    text = url.reveal() if isinstance(url, Secret) else str(url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return _SECRET_OPTION.sub(r"\1***", text)
    userinfo, at, tail = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}:***@{tail}" if colon else f"***@{tail}"
    return scheme + "://" + _SECRET_OPTION.sub(r"\1***", rest)


def parse_redis_url(url: str | Secret) -> RedisTarget:
    """The :class:`RedisTarget` of ``url``; :class:`ValueError` names the problem (the URL is
    shown redacted)."""
    text = (url.reveal() if isinstance(url, Secret) else url).strip()
    try:
        return _parse(text)
    except ValueError as exc:
        raise ValueError(f"redis_url {redacted(text)!r}: {exc}") from None


def _parse(text: str) -> RedisTarget:
    scheme, sep, rest = text.partition("://")
    kind = _SCHEMES.get(scheme.lower()) if sep else None
    if kind is None:
        raise ValueError(f"the scheme must be one of {', '.join(s + '://' for s in _SCHEMES)}")
    if "#" in rest:
        raise ValueError("a fragment (#...) has no meaning here")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    if "@" in query or (kind is not RedisKind.UNIX and "@" in path):
        # most likely an unencoded "/" or "?" in a password: say so without echoing any of it
        raise ValueError("percent-encode '/', '?', '#' and '@' in user names and passwords")
    userinfo, at, hosts_text = netloc.rpartition("@")
    username, password = _userinfo(userinfo) if at else (None, None)
    options = _options(query, kind, tls=scheme.lower() == "rediss")
    fields: dict[str, Any] = {"username": username, "password": password}

    if kind is RedisKind.UNIX:
        if hosts_text:
            raise ValueError("a unix:// URL has no host: write unix:///path/to/redis.sock")
        if not path:
            raise ValueError("the socket path is missing: write unix:///path/to/redis.sock")
        return RedisTarget(
            kind, socket_path="/" + urllib.parse.unquote(path), db=_db(None, options), **fields
        )

    default_port = DEFAULT_SENTINEL_PORT if kind is RedisKind.SENTINEL else DEFAULT_PORT
    addresses = _addresses(hosts_text, default_port)
    if kind is RedisKind.SERVER and len(addresses) > 1:
        raise ValueError(
            "several hosts need redis+sentinel:// (sentinels) or redis+cluster:// (cluster nodes)"
        )
    db = _db(path if slash else None, options)
    if kind is RedisKind.CLUSTER:
        if db:
            raise ValueError("a Redis Cluster has only database 0")
        return RedisTarget(kind, addresses, db=0, **fields)
    if kind is RedisKind.SENTINEL:
        master = options.get("sentinel_master_name", "")
        if not master:
            raise ValueError("the Sentinel master name is missing: add ?sentinel_master_name=NAME")
        sentinel_password = options.get("sentinel_password")
        return RedisTarget(
            kind,
            addresses,
            db=db,
            master_name=master,
            sentinel_username=options.get("sentinel_username") or None,
            sentinel_password=Secret(sentinel_password) if sentinel_password else None,
            **fields,
        )
    cert_reqs = options.get("ssl_cert_reqs")
    if cert_reqs is not None and cert_reqs not in _CERT_REQS:
        raise ValueError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}")
    return RedisTarget(
        kind,
        addresses,
        tls=scheme.lower() == "rediss",
        db=db,
        ssl_ca_certs=options.get("ssl_ca_certs"),
        ssl_cert_reqs=cert_reqs,
        **fields,
    )


def _userinfo(userinfo: str) -> tuple[str | None, Secret | None]:
    user, colon, password = userinfo.partition(":")
    if not colon:
        raise ValueError(
            "the user info has no password: write redis://USER:PASSWORD@HOST "
            "or redis://:PASSWORD@HOST"
        )
    if not password:
        raise ValueError("the password after ':' is empty")
    return urllib.parse.unquote(user) or None, Secret(urllib.parse.unquote(password))


def _options(query: str, kind: RedisKind, *, tls: bool) -> dict[str, str]:
    allowed = _OPTIONS[kind] | (_TLS_OPTIONS if tls else frozenset())
    options: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key not in allowed:
            accepted = ", ".join(sorted(allowed)) or "none"
            raise ValueError(f"unknown option {key!r} (accepted here: {accepted})")
        if key in options:
            raise ValueError(f"option {key!r} is given twice")
        options[key] = value
    if query and not options:
        raise ValueError(f"cannot read the options {query!r} (expected KEY=VALUE&...)")
    return options


def _addresses(text: str, default_port: int) -> tuple[tuple[str, int], ...]:
    if not text:
        raise ValueError("the host is missing")
    addresses: list[tuple[str, int]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ValueError("an empty host in the host list")
        has_port = item.rfind(":") > item.rfind("]")
        host, port = parse_hostport(item if has_port else f"{item}:{default_port}")
        if not 1 <= port <= 65535:
            raise ValueError(f"{item!r}: the port must be from 1 to 65535")
        addresses.append((host, port))
    if len(set(addresses)) != len(addresses):
        raise ValueError("a host:port is listed twice")
    return tuple(addresses)


def _db(path: str | None, options: Mapping[str, str]) -> int:
    candidates = [v for v in (path or None, options.get("db")) if v is not None]
    numbers: set[int] = set()
    for value in candidates:
        if not value.isdigit() or len(value) > 5:
            raise ValueError(f"the database must be a number, got {value!r}")
        numbers.add(int(value))
    if len(numbers) > 1:
        raise ValueError("the path and ?db= name different databases")
    return numbers.pop() if numbers else 0


# --- versions ----------------------------------------------------------------------------------


def version_tuple(text: str) -> tuple[int, ...]:
    """``"7.0.15"`` -> ``(7, 0, 15)``; :class:`ValueError` for anything else."""
    parts = str(text).strip().split(".")
    if not all(part.isdigit() for part in parts):
        raise ValueError(f"{text!r} is not a Redis version")
    return tuple(int(part) for part in parts)


def check_versions(versions: Mapping[str, str], shown_url: str) -> None:
    """Raise :class:`RedisUnavailable` unless every server in ``versions`` (``"host:port"`` ->
    ``redis_version``) runs :data:`MIN_VERSION` or newer."""
    required = ".".join(map(str, MIN_VERSION))
    if not versions:
        raise RedisUnavailable(f"Redis at {shown_url} named no server to check the version of")
    for server, version in sorted(versions.items()):
        try:
            too_old = version_tuple(version) < MIN_VERSION
        except ValueError:
            raise RedisUnavailable(
                f"Redis at {shown_url}: {server} reports an unreadable version {version!r}; "
                f"Redis {required} or newer is required"
            ) from None
        if too_old:
            raise RedisUnavailable(
                f"Redis at {shown_url}: {server} runs Redis {version}; "
                f"Redis {required} or newer is required"
            )


async def server_versions(client: RedisClient) -> dict[str, str]:
    """``redis_version`` of the server a plain client writes to, or of every cluster master."""
    if isinstance(client, RedisCluster):
        await client.initialize()
        versions: dict[str, str] = {}
        for node in client.get_primaries():
            info = await client.info("server", target_nodes=node)
            versions[_hostport(node.host, int(node.port))] = str(info.get("redis_version", "?"))
        return versions
    info = await client.info("server")
    conn_kwargs = client.connection_pool.connection_kwargs
    where = conn_kwargs.get("path") or _hostport(
        str(conn_kwargs.get("host")), int(str(conn_kwargs.get("port", 0)))
    )
    pool_master = getattr(client.connection_pool, "master_address", None)
    if pool_master:
        where = _hostport(str(pool_master[0]), int(pool_master[1]))
    return {str(where): str(info.get("redis_version", "?"))}


# --- the client factory ------------------------------------------------------------------------


def command_retry(retries: int = RETRIES) -> Retry:
    """The retry policy of every command (a new object per client: redis-py mutates it)."""
    return Retry(
        EqualJitterBackoff(cap=RETRY_CAP, base=RETRY_BASE),
        retries,
        supported_errors=(RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError),
    )


class _SentinelRedis(Redis):
    """A Sentinel master client that also closes its connections to the sentinels."""

    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            if self.sentinel_manager is not None:
                for sentinel_client in self.sentinel_manager.sentinels:
                    await sentinel_client.aclose()


def build_client(
    target: RedisTarget,
    *,
    timeout: float = 3.0,
    client_name: str | None = None,
    retries: int = RETRIES,
) -> RedisClient:
    """A client for ``target`` with socket/connect deadlines of ``timeout`` seconds and the
    :func:`command_retry` policy; no connection is made yet (use :func:`connect_redis`)."""
    common: dict[str, Any] = {
        "username": target.username,
        "password": target.password.reveal() if target.password else None,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "client_name": client_name,
        "retry": command_retry(retries),
    }
    if target.kind is RedisKind.CLUSTER:
        nodes = [ClusterNode(host, port) for host, port in target.addresses]
        return RedisCluster(startup_nodes=nodes, **common)
    if target.kind is RedisKind.SENTINEL:
        sentinel = Sentinel(
            list(target.addresses),
            sentinel_kwargs={
                "username": target.sentinel_username,
                "password": (
                    target.sentinel_password.reveal() if target.sentinel_password else None
                ),
                "socket_timeout": timeout,
                "socket_connect_timeout": timeout,
                "retry": Retry(EqualJitterBackoff(cap=RETRY_CAP, base=RETRY_BASE), 1),
            },
            db=target.db,
            **common,
        )
        client = sentinel.master_for(str(target.master_name), redis_class=_SentinelRedis)
        if not isinstance(client, _SentinelRedis):  # pragma: no cover - redis-py contract
            raise TypeError("Sentinel.master_for ignored redis_class")
        client.sentinel_manager = sentinel
        return client
    if target.kind is RedisKind.UNIX:
        return Redis(unix_socket_path=target.socket_path, db=target.db, **common)
    host, port = target.addresses[0]
    tls: dict[str, Any] = {}
    if target.tls:
        tls = {"ssl": True, "ssl_cert_reqs": target.ssl_cert_reqs or "required"}
        if target.ssl_ca_certs:
            tls["ssl_ca_certs"] = target.ssl_ca_certs
    return Redis(host=host, port=port, db=target.db, **common, **tls)


async def connect_redis(
    url: str | Secret, *, timeout: float = 3.0, client_name: str | None = None
) -> RedisClient:
    """Connect to the Redis that ``url`` names and check it runs Redis 7.0 or newer (on every
    master of a cluster).

    ``timeout`` bounds each connect and each socket read or write. The check retries a
    connection error only :data:`STARTUP_RETRIES` times (well under a second), so a Redis that
    is down is reported at once with its real reason; the client returned then retries every
    command for about :data:`RETRY_SECONDS`.
    ``client_name`` is set on every connection (``CLIENT LIST`` shows it). Raises
    :class:`ValueError` for a bad URL and :class:`RedisUnavailable` (one line: the redacted URL,
    what was tried, the reason) when Redis is unreachable, refuses the credentials or is too old.
    """
    target = parse_redis_url(url)
    shown = redacted(url)
    client = build_client(target, timeout=timeout, client_name=client_name, retries=STARTUP_RETRIES)
    try:
        async with asyncio.timeout(timeout * 4 + 1.0):
            versions = await server_versions(client)
        check_versions(versions, shown)
        client.set_retry(command_retry())
    except BaseException as exc:
        await client.aclose()
        if isinstance(exc, RedisUnavailable):
            raise
        if isinstance(exc, RedisError | RedisClusterException | OSError | TimeoutError):
            reason = _one_line(str(exc) or type(exc).__name__, target)
            raise RedisUnavailable(
                f"Redis at {shown} is unavailable (tried {target.describe()}): {reason}"
            ) from None
        raise
    return client


def _one_line(text: str, target: RedisTarget) -> str:
    for secret in (target.password, target.sentinel_password):
        if secret:
            text = text.replace(secret.reveal(), "***")
    return " ".join(text.split())
