"""The node's recent errors: a bounded ring of the error answers its ingresses gave, and of
agent sessions that went down.

Each answer entry is what a bootloader was told (error code, status, message) plus when, on
which surface (``resolve``, ``http`` for the tunnel, ``tcp`` for the TCP ingress), the tenant
when the alias has one, and the request id of the answer. An ``agent`` entry is an agent session
that ended (code ``agent_disconnected``, the reason as message, no status nor request id). No
client address is kept. The admin API
shows the ring (``GET /v1/admin/errors``) and the web console reads it from there.

Invariants: the ring never holds more than ``capacity`` entries (the oldest goes first);
``total`` counts every entry ever recorded, so a reader can tell how many the ring dropped;
sequence numbers grow by one per entry; recording never blocks nor does I/O.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shared.errors import CSCError
from shared.timefmt import iso

#: the surfaces whose error answers are recorded
KINDS = ("resolve", "http", "tcp", "agent")
AGENT_DISCONNECTED = "agent_disconnected"
DEFAULT_CAPACITY = 200


@dataclass(frozen=True, slots=True)
class ErrorEntry:
    """One error answer, as the admin API shows it."""

    seq: int
    at: float
    kind: str
    code: str
    status: int | None
    message: str
    tenant: str | None
    request_id: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": iso(self.at),
            "kind": self.kind,
            "error": self.code,
            "status": self.status,
            "message": self.message,
            "tenant": self.tenant,
            "request_id": self.request_id,
        }


@dataclass(eq=False)
class ErrorLog:
    """The last ``capacity`` error answers of this node, oldest dropped first."""

    capacity: int = DEFAULT_CAPACITY
    clock: Callable[[], float] = time.time
    total: int = 0
    _ring: deque[ErrorEntry] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError("the error log needs room for at least one entry")
        self._ring = deque(maxlen=self.capacity)

    def record(
        self, kind: str, err: CSCError, *, request_id: str, tenant: str | None = None
    ) -> ErrorEntry:
        """Keep the answer ``err`` given on ``kind`` (one of :data:`KINDS`)."""
        if kind not in KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        return self._add(kind, err.code, err.spec.http_status, err.message, tenant, request_id)

    def agent_disconnected(self, tenant: str, message: str) -> ErrorEntry:
        """Keep an ``agent`` entry: a session of ``tenant`` ended, ``message`` says why."""
        return self._add("agent", AGENT_DISCONNECTED, None, message, tenant, None)

    def _add(
        self,
        kind: str,
        code: str,
        status: int | None,
        message: str,
        tenant: str | None,
        request_id: str | None,
    ) -> ErrorEntry:
        self.total += 1
        entry = ErrorEntry(
            self.total, self.clock(), kind, code, status, message, tenant, request_id
        )
        self._ring.append(entry)
        return entry

    def recent(self, limit: int | None = None, *, tenant: str | None = None) -> list[ErrorEntry]:
        """Entries newest first, only ``tenant``'s when given, at most ``limit`` of them."""
        found: list[ErrorEntry] = []
        for entry in reversed(self._ring):
            if limit is not None and len(found) >= limit:
                break
            if tenant is None or entry.tenant == tenant:
                found.append(entry)
        return found

    def __len__(self) -> int:
        return len(self._ring)
