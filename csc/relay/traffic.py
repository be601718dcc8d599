"""Per-tenant traffic of the last 15 minutes and when each grant's agent was last seen.

:class:`TrafficHistory` keeps, per tenant, a ring of :data:`POINTS` buckets of
:data:`BUCKET_SECONDS` each (requests, error answers, body bytes both ways); the admin API serves
it (``GET /v1/admin/traffic``) and the web console draws it. :class:`LastSeen` remembers when a
session that served a tenant's grant last went down, so an offline alias can say since when.

Both are this node's own view: in a cluster each node counts only the requests it received and
the sessions it held (the console reads the node it is served by).

Invariants: memory is bounded: at most ``max_tenants`` tenants (the one updated longest ago is
dropped first) of at most :data:`POINTS` buckets each, and at most ``capacity`` tenants'
last-seen times (their grants are those their tokens hold); buckets older than the window are never reported; recording never blocks nor does I/O.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from shared.aliases import covered
from shared.timefmt import iso

BUCKET_SECONDS = 30
POINTS = 30  # 15 minutes
DEFAULT_MAX_TENANTS = 500
DEFAULT_LAST_SEEN = 10_000


@dataclass(slots=True)
class _Bucket:
    start: int
    requests: int = 0
    errors: int = 0
    bytes: int = 0


@dataclass(eq=False)
class TrafficHistory:
    """Requests, errors and bytes per tenant in :data:`BUCKET_SECONDS` buckets."""

    max_tenants: int = DEFAULT_MAX_TENANTS
    clock: Callable[[], float] = time.time
    _tenants: OrderedDict[str, list[_Bucket]] = field(default_factory=OrderedDict, repr=False)

    def record(self, tenant: str | None, *, error: bool, nbytes: int) -> None:
        """Count one request of ``tenant`` (none: the alias had no tenant, not counted)."""
        if not tenant:
            return
        start = int(self.clock()) // BUCKET_SECONDS * BUCKET_SECONDS
        buckets = self._tenants.get(tenant)
        if buckets is None:
            buckets = self._tenants[tenant] = []
            while len(self._tenants) > self.max_tenants:
                self._tenants.popitem(last=False)
        else:
            self._tenants.move_to_end(tenant)
        if not buckets or buckets[-1].start != start:
            buckets.append(_Bucket(start))
            if len(buckets) > POINTS:
                del buckets[0]
        last = buckets[-1]
        last.requests += 1
        last.errors += int(error)
        last.bytes += max(0, nbytes)

    def series(self, tenant: str | None = None) -> dict[str, Any]:
        """The window as JSON: every bucket start (ISO 8601) and, per tenant, its series."""
        end = int(self.clock()) // BUCKET_SECONDS * BUCKET_SECONDS
        starts = [end - BUCKET_SECONDS * i for i in range(POINTS - 1, -1, -1)]
        index = {start: i for i, start in enumerate(starts)}
        tenants = []
        for name in sorted(self._tenants):
            if tenant is not None and name != tenant:
                continue
            requests, errors, nbytes = [0] * POINTS, [0] * POINTS, [0] * POINTS
            for bucket in self._tenants[name]:
                i = index.get(bucket.start)
                if i is not None:
                    requests[i], errors[i], nbytes[i] = bucket.requests, bucket.errors, bucket.bytes
            if any(requests):
                tenants.append(
                    {"tenant": name, "requests": requests, "errors": errors, "bytes": nbytes}
                )
        return {
            "bucket_seconds": BUCKET_SECONDS,
            "points": [iso(start) for start in starts],
            "tenants": tenants,
        }

    def __len__(self) -> int:
        return len(self._tenants)


@dataclass(eq=False)
class LastSeen:
    """When a session serving a tenant's grant last went down on this node."""

    capacity: int = DEFAULT_LAST_SEEN
    clock: Callable[[], float] = time.time
    _seen: OrderedDict[str, dict[str, float]] = field(default_factory=OrderedDict, repr=False)

    def session_down(self, tenant: str, grants: Iterable[str]) -> None:
        now = self.clock()
        seen = self._seen.setdefault(tenant, {})
        self._seen.move_to_end(tenant)
        for grant in grants:
            seen[grant] = now
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def alias(self, tenant: str, alias: str) -> float | None:
        """The last time a session of ``tenant`` whose grant covers ``alias`` went down."""
        seen = self._seen.get(tenant, {})
        return max((t for g, t in seen.items() if covered((g,), alias)), default=None)
