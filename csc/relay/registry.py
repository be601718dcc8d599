"""The node's registry: which tenant owns an alias, which live agent sessions serve it, and
which sessions have lost the right to run.

:class:`Registry` is the interface the gateway, the ingresses and the admin API use.
:class:`MemoryRegistry` is the one-node implementation (DESIGN.md "State and scale-out"): live
sessions in this process's memory, and a :class:`~csc.tenants.Catalog` snapshot of the managed
objects (tenants, assignments, revoked token ids, operators) from a :class:`CatalogSource` (the
store: SQLite or PostgreSQL). The snapshot is re-read when the source changed: on a lookup miss, before an agent
is admitted, after every admin change (``refresh(force=True)``) and periodically; a change made
by another process (``csc token issue``) is therefore seen at once by a lookup that needs it.
While the source is unavailable (PostgreSQL down: ``StoreUnavailable``) the last snapshot is
kept and served.
A Redis implementation for several nodes keeps this interface and adds leases and pub/sub.

Invariants: :meth:`MemoryRegistry.lookup` returns only live, accepting sessions of the tenant
that owns the alias *now* (an alias reassigned or unassigned stops reaching the old tenant's
sessions at once); :meth:`MemoryRegistry.ending` names every live session whose tenant is gone
or suspended, or whose token is revoked or expired, at its first call after that became so.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from csc.store.backend import StoreUnavailable
from csc.tenants import Catalog, Tenant
from shared.aliases import domain_of
from shared.errors import AliasForbidden, AliasTaken, AuthFailed, CSCError, TenantSuspended
from shared.tokens import DEFAULT_LEEWAY


class Session(Protocol):
    """What the registry needs to know of an agent session."""

    @property
    def tenant(self) -> str: ...

    @property
    def grants(self) -> tuple[str, ...]: ...

    @property
    def accepting(self) -> bool: ...

    @property
    def load(self) -> int: ...

    @property
    def jti(self) -> str: ...

    @property
    def expires_at(self) -> float: ...


S = TypeVar("S", bound=Session)


class CatalogSource(Protocol):
    """Where the managed objects come from (:class:`csc.store.Store`)."""

    def data_version(self) -> int: ...

    def catalog(self) -> Catalog: ...


@dataclass(frozen=True, slots=True)
class Lookup(Generic[S]):
    """Who serves an alias: its owner's id (None: unknown), live sessions, the owner itself."""

    tenant: str | None
    sessions: tuple[S, ...] = ()
    owner: Tenant | None = None


class Registry(Protocol[S]):
    """The registry interface (one node: :class:`MemoryRegistry`). The node's state, the
    gateway and the cluster code know only this, so another implementation drops in."""

    #: Whether a lookup that finds nothing re-reads the catalog's source first (a local
    #: database), or never does on a request's path (a remote one, re-read by events).
    refresh_on_miss: bool

    @property
    def catalog(self) -> Catalog: ...

    def refresh(self, *, force: bool = False) -> bool: ...

    def owner(self, alias: str) -> str | None: ...

    def local_grants(self) -> set[str]: ...

    def lookup(self, alias: str) -> Lookup[S]: ...

    def tenant(self, tenant_id: str) -> Tenant | None: ...

    def operator(self, token_sha256: str) -> str | None: ...

    def bind(self, session: S) -> None: ...

    def unbind(self, session: S) -> None: ...

    def sessions(self) -> Iterable[S]: ...

    def ending(self, now: float) -> list[tuple[S, CSCError]]: ...


def admission_error(catalog: Catalog, tenant: str, jti: str) -> CSCError | None:
    """Why a session of ``tenant`` with token ``jti`` may not run now (None: it may)."""
    record = catalog.tenants.get(tenant)
    if record is None:
        return AuthFailed(f"tenant {tenant!r} does not exist", reason="unknown_tenant")
    if jti in catalog.revoked:
        return AuthFailed("token revoked", reason="revoked")
    if record.suspended:
        return TenantSuspended(f"tenant {tenant!r} is suspended")
    return None


@dataclass(eq=False)
class MemoryRegistry(Generic[S]):
    """The one-node registry: sessions in memory, the catalog cached from ``source``."""

    source: CatalogSource | None = None
    catalog: Catalog = field(default_factory=Catalog)
    #: re-read the source when a lookup misses (False when the source is a remote database:
    #: then only the refresh loop and change events re-read it, never a request)
    refresh_on_miss: bool = True
    _version: int | None = None
    _live: dict[str, list[S]] = field(default_factory=dict)
    _sessions: dict[int, S] = field(default_factory=dict)
    #: :meth:`ending`'s bookkeeping: the catalog it last checked every session against, the
    #: earliest token expiry among the sessions it found fine then, and the sessions bound
    #: since (admitted against whatever catalog was current at their handshake)
    _checked: Catalog | None = None
    _next_expiry: float = math.inf
    _fresh: dict[int, S] = field(default_factory=dict)

    def refresh(self, *, force: bool = False) -> bool:
        """Re-read the catalog if the source changed (or ``force``); whether it was re-read."""
        if self.source is None:
            return False
        try:
            version = self.source.data_version()
            if not force and version == self._version:
                return False
            self.catalog = self.source.catalog()
        except StoreUnavailable:  # logged by the store: keep serving the last catalog
            return False
        self._version = version
        return True

    def owner(self, alias: str) -> str | None:
        """The tenant owning a normalised alias or pattern, re-reading the catalog on a miss."""
        owner = self.catalog.owner(alias)
        if owner is None and self.refresh_on_miss and self.refresh():
            owner = self.catalog.owner(alias)
        return owner

    def tenant(self, tenant_id: str) -> Tenant | None:
        found = self.catalog.tenants.get(tenant_id)
        if found is None and self.refresh_on_miss and self.refresh():
            found = self.catalog.tenants.get(tenant_id)
        return found

    def operator(self, token_sha256: str) -> str | None:
        name = self.catalog.operators.get(token_sha256)
        if name is None and self.refresh_on_miss and self.refresh():
            name = self.catalog.operators.get(token_sha256)
        return name

    def bind(self, session: S) -> None:
        """Register a live session for its grants, each of which must be its tenant's."""
        for grant in session.grants:
            owner = self.owner(grant)
            if owner is None:
                raise AliasForbidden(f"alias {grant} is not assigned to tenant {session.tenant}")
            if owner != session.tenant:
                raise AliasTaken(f"alias {grant} is held by another tenant")
        for grant in session.grants:
            self._live.setdefault(grant, []).append(session)
        self._sessions[id(session)] = session
        self._fresh[id(session)] = session

    def unbind(self, session: S) -> None:
        self._sessions.pop(id(session), None)
        self._fresh.pop(id(session), None)
        for grant in session.grants:
            live = self._live.get(grant)
            if live is None:
                continue
            if session in live:
                live.remove(session)
            if not live:
                del self._live[grant]

    def lookup(self, alias: str) -> Lookup[S]:
        """Owner and live accepting sessions of a normalised alias, least loaded first."""
        tenant = self.owner(alias)
        if tenant is None:
            return Lookup(None)
        found: list[S] = list(self._live.get(alias, ()))
        domain = domain_of(alias)
        if domain is not None:
            found.extend(self._live.get(f"*@{domain}", ()))
        sessions = [s for s in found if s.tenant == tenant and s.accepting]
        if len(sessions) == 2:  # the common case (an agent's two sessions), without a shuffle
            first, second = sessions
            if second.load < first.load or (second.load == first.load and random.getrandbits(1)):
                sessions.reverse()
        elif len(sessions) > 2:
            random.shuffle(sessions)  # equally loaded sessions take turns (the sort is stable)
            sessions.sort(key=lambda s: s.load)
        return Lookup(tenant, tuple(sessions), self.catalog.tenants.get(tenant))

    def sessions(self) -> Iterable[S]:
        return list(self._sessions.values())

    def local_grants(self) -> set[str]:
        """Grants with at least one live session that takes new streams."""
        return {grant for grant, live in self._live.items() if any(s.accepting for s in live)}

    def ending(self, now: float) -> list[tuple[S, CSCError]]:
        """Live sessions that must end now, each with the error to close it with.

        A token expires ``DEFAULT_LEEWAY`` after its ``exp``, as at connect time, so a session
        ended for expiry cannot come straight back.

        Every session is checked when the catalog changed or a token of a session found fine
        before may have expired since; else only the sessions bound since the last call (the
        others were found fine against this very catalog, and nothing else can end them), so
        a node at rest with many sessions does not walk them all at every refresh. A session
        named once is named again only when all are checked again.
        """
        catalog, expired_before = self.catalog, now - DEFAULT_LEEWAY
        if catalog is self._checked and expired_before < self._next_expiry:
            sessions: Iterable[S] = self._fresh.values()
        else:
            sessions = self._sessions.values()
            self._checked, self._next_expiry = catalog, math.inf
        result: list[tuple[S, CSCError]] = []
        for session in sessions:
            err = admission_error(catalog, session.tenant, session.jti)
            if err is None and session.expires_at <= expired_before:
                err = AuthFailed("token expired", reason="expired")
            if err is not None:
                result.append((session, err))
            elif session.expires_at < self._next_expiry:
                self._next_expiry = session.expires_at
        self._fresh.clear()
        return result
