"""Per-tenant limits of one CSC node: request rate, concurrent streams and agent sessions.

The operator sets a tenant's limits through the admin API (:class:`csc.tenants.Limits`:
``max_request_rate`` per second, ``max_streams``, ``max_sessions``; ``None`` is unlimited, the
default). :class:`TenantLimiter` enforces them on the node's hot path, without I/O and with an
injected clock, so every decision costs a few dictionary operations (O(1)):

* **rate**: a token bucket per tenant that refills at ``max_request_rate`` tokens a second and
  holds at most ``burst_for(rate)`` (one second's worth, at least one). A request takes one
  token; without one it is refused with ``rate_limited`` and a ``Retry-After`` of the whole
  seconds until the next token. A request refused for any reason takes no token.
* **streams**: the streams the tenant has in flight on this node, counted whatever the cap; a
  new one beyond ``max_streams`` is refused with ``tenant_limit`` (``Retry-After: 1``).
* **client share**: the streams one client address holds of a tenant with a ``max_streams``
  cap, at most :func:`client_cap` of them (``client_stream_share`` of the cap, at least one;
  the address is the IP, an IPv6 one by its /64: :func:`client_key`); a new one beyond it is
  refused with ``tenant_limit`` (``Retry-After: 1``), so slow clients from one address cannot
  take every slot of a tenant. Counted per node (in a cluster too, against the cluster-wide
  cap: a per-node bound).
* **sessions**: the tenant's agent sessions on this node (from before the WebSocket upgrade to
  the end of the session), refused beyond ``max_sessions`` with ``tenant_limit``.

The limits are read at each decision from the catalog snapshot the caller passes, so a change
made through the admin API applies within the registry refresh period, to new requests and
sessions only: lowering a cap never ends what already runs.

Invariants: counts are never negative (a release without a matching acquire is ignored) and an
acquire never takes a count beyond its cap; over any interval of length ``t`` during which the
rate stays ``r`` a tenant's bucket admits at most ``r * t + burst_for(r)`` requests.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from csc.tenants import Limits
from shared.errors import RateLimited, TenantLimit

#: The limits of a tenant that sets none.
UNLIMITED = Limits()
#: Retry-After of a refusal for concurrency (streams or sessions), in seconds.
RETRY_AFTER_BUSY = 1
#: The ``limit`` labels of ``csc_limit_rejections_total`` this module's refusals count under.
RATE, STREAMS, SESSIONS = "rate", "streams", "sessions"
#: Tolerance for floating-point refills: a bucket this close to one token has one.
EPSILON = 1e-9


def burst_for(rate: float) -> float:
    """How many requests a full bucket lets through at once: one second's worth, at least 1."""
    return max(1.0, rate)


@dataclass(slots=True)
class TokenBucket:
    """A token bucket: ``rate`` tokens a second, at most ``burst`` held, ``tokens`` now."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float, now: float) -> TokenBucket:
        burst = burst_for(rate)
        return cls(rate, burst, burst, now)

    def retune(self, rate: float, now: float) -> None:
        """Change the rate (after refilling at the old one); the tokens held stay, capped."""
        self._refill(now)
        self.rate = rate
        self.burst = burst_for(rate)
        self.tokens = min(self.tokens, self.burst)

    def take(self, now: float) -> float:
        """Take one token: 0.0 when taken, else the seconds until one is available."""
        self._refill(now)
        if self.tokens >= 1.0 - EPSILON:
            self.tokens = max(0.0, self.tokens - 1.0)
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def _refill(self, now: float) -> None:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now


def rate_limited(alias: str, rate: float, wait: float) -> RateLimited:
    """The refusal of a request over its tenant's rate, with the wait until the next token."""
    after = retry_after(wait)
    return RateLimited(
        f"too many requests for {alias} (at most {rate:g} a second); try again in {after} s",
        retry_after=after,
        limit=RATE,
    )


def retry_after(seconds: float) -> int:
    """``Retry-After`` in whole seconds (at least 1) for a wait of ``seconds``."""
    return max(1, math.ceil(seconds))


#: Addresses whose :func:`address_key` is remembered (a few hundred KiB at most).
ADDRESS_KEYS_CACHED = 4096


def client_key(client: str) -> str:
    """The address a client's share is counted by, from ``host:port`` (the ingress's ``client``):
    the IP, an IPv6 one as its /64 network (one host usually holds a whole /64), an
    IPv4-mapped IPv6 one as the IPv4; anything that does not parse, as given."""
    host = client.rpartition(":")[0] if ":" in client else client
    return address_key(host.removeprefix("[").removesuffix("]"), client)


@functools.lru_cache(maxsize=ADDRESS_KEYS_CACHED)
def address_key(host: str, unparsed: str | None = None) -> str:
    """:func:`client_key` of a bare IP (a connection's peer address); anything that does not
    parse as ``unparsed`` (default: as given). Remembered for the most recent addresses: it
    runs for every accepted connection, and parsing costs 5 µs for IPv4, 20-35 for IPv6."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host if unparsed is None else unparsed
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def client_cap(max_streams: int | None, share: float) -> int | None:
    """Streams of a tenant one client address may hold: ``share`` of ``max_streams`` (rounded
    down, at least 1); None (no bound) when the tenant has no stream cap or ``share`` is 1."""
    if max_streams is None or share >= 1.0:
        return None
    return max(1, math.floor(max_streams * share + EPSILON))


def client_limit(alias: str, cap: int) -> TenantLimit:
    return TenantLimit(
        f"too many requests in progress for {alias} from your address (at most {cap} at "
        f"once); try again in {RETRY_AFTER_BUSY} s",
        retry_after=RETRY_AFTER_BUSY,
        limit=STREAMS,
    )


class TenantLimiter:
    """The per-tenant counts and buckets of one node (see the module docstring)."""

    __slots__ = ("_buckets", "_clients", "_clock", "_sessions", "_streams")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._streams: dict[str, int] = {}
        self._sessions: dict[str, int] = {}
        self._clients: dict[tuple[str, str], int] = {}

    # -- a client address's share of a tenant's streams ------------------------------------

    def acquire_client(self, tenant: str, client: str, cap: int, alias: str) -> None:
        """Count one stream of ``tenant`` from the address ``client`` (a :func:`client_key`)
        until :meth:`release_client`, or raise :class:`TenantLimit` when it holds ``cap``."""
        key = (tenant, client)
        held = self._clients.get(key, 0)
        if held >= cap:
            raise client_limit(alias, cap)
        self._clients[key] = held + 1

    def release_client(self, tenant: str, client: str) -> None:
        key = (tenant, client)
        held = self._clients.get(key, 0)
        if held > 1:
            self._clients[key] = held - 1
        else:
            self._clients.pop(key, None)

    def client_streams(self, tenant: str, client: str) -> int:
        """Streams of ``tenant`` the address ``client`` holds on this node."""
        return self._clients.get((tenant, client), 0)

    # -- streams (bootloader requests) -------------------------------------------------------

    def acquire_stream(self, tenant: str, limits: Limits, alias: str) -> None:
        """Admit one stream of ``tenant`` (counted until :meth:`release_stream`), or raise
        :class:`TenantLimit` (streams) or :class:`RateLimited` (rate); ``alias`` is for the
        message."""
        held = self._streams.get(tenant, 0)
        cap = limits.max_streams
        if cap is not None and held >= cap:
            raise TenantLimit(
                f"too many requests in progress for {alias} (at most {cap} at once); "
                f"try again in {RETRY_AFTER_BUSY} s",
                retry_after=RETRY_AFTER_BUSY,
                limit=STREAMS,
            )
        self.take_token(tenant, limits.max_request_rate, alias)
        self._streams[tenant] = held + 1

    def release_stream(self, tenant: str) -> None:
        """One stream of ``tenant`` ended (whatever the outcome)."""
        _decrement(self._streams, tenant)

    def streams(self, tenant: str) -> int:
        """Streams of ``tenant`` in flight on this node."""
        return self._streams.get(tenant, 0)

    def take_token(self, tenant: str, rate: float | None, alias: str) -> None:
        """Take one token of the tenant's bucket at ``rate``, or raise RateLimited."""
        if rate is None:
            self._buckets.pop(tenant, None)
            return
        now = self._clock()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = TokenBucket.full(rate, now)
        elif bucket.rate != rate:
            bucket.retune(rate, now)
        wait = bucket.take(now)
        if wait:
            raise rate_limited(alias, rate, wait)

    # -- agent sessions ----------------------------------------------------------------------

    def acquire_session(self, tenant: str, limits: Limits) -> None:
        """Admit one agent session of ``tenant`` (counted until :meth:`release_session`), or
        raise :class:`TenantLimit` (sessions)."""
        held = self._sessions.get(tenant, 0)
        cap = limits.max_sessions
        if cap is not None and held >= cap:
            raise TenantLimit(
                f"tenant {tenant!r} already has {held} agent sessions on this node "
                f"(at most {cap}); try again later",
                retry_after=RETRY_AFTER_BUSY,
                limit=SESSIONS,
            )
        self._sessions[tenant] = held + 1

    def release_session(self, tenant: str) -> None:
        _decrement(self._sessions, tenant)

    def sessions(self, tenant: str) -> int:
        """Agent sessions of ``tenant`` on this node, including those still in the handshake."""
        return self._sessions.get(tenant, 0)


def _decrement(counts: dict[str, int], tenant: str) -> None:
    held = counts.get(tenant, 0)
    if held > 1:
        counts[tenant] = held - 1
    else:
        counts.pop(tenant, None)


@dataclass(slots=True, eq=False, init=False)
class Admission:
    """What one admitted request holds besides its tenant's node count: its client address's
    share (``client``, None when unbounded) and, in a cluster, its stream slot (``slot``).

    It belongs to the request's ``info`` (kept here, so its ``id`` stays unique while held):
    a request the HTTP ingress opens again on another session keeps its admission, and it is
    given back once, with the last stream (``stream``: the ``id`` of the current one).
    """

    info: dict[str, Any]
    tenant: str
    client: str | None
    slot: str | None
    stream: int

    # written out: mypyc compiles it (see shared/protocol/events.py)
    def __init__(
        self, info: dict[str, Any], tenant: str, client: str | None, slot: str | None = None
    ) -> None:
        self.info = info
        self.tenant = tenant
        self.client = client
        self.slot = slot
        self.stream = 0


@dataclass(slots=True)
class Admissions:
    """The admissions in force on a node, by request (``id(info)``) and by current stream."""

    by_request: dict[int, Admission] = field(default_factory=dict)
    by_stream: dict[int, Admission] = field(default_factory=dict)

    def of_request(self, info: dict[str, Any]) -> Admission | None:
        held = self.by_request.get(id(info))
        return held if held is not None and held.info is info else None

    def bind(self, admission: Admission, stream: object) -> None:
        """``stream`` (a new one, or the one reopened for the same request) now holds it."""
        self.by_stream.pop(admission.stream, None)
        admission.stream = id(stream)
        self.by_request[id(admission.info)] = admission
        self.by_stream[admission.stream] = admission

    def pop(self, stream: object) -> Admission | None:
        """The admission ``stream`` held, forgotten (None when it held none)."""
        admission = self.by_stream.pop(id(stream), None)
        if admission is not None:
            self.by_request.pop(id(admission.info), None)
        return admission
