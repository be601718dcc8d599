"""Which tenant owns an alias and which live agent sessions serve it (the embedded registry).

An alias (or a ``*@domain`` grant) belongs to exactly one tenant. Ownership comes from the
assignments recorded by ``csc token issue`` (``tenants.json`` in the state directory, re-read
when it changes) and from the grants bound by agent sessions since the node started, so an
alias stays *known* (503 ``portal_offline``) after its agent goes away rather than turning into
404 ``unknown_alias``.

Invariants: a grant bound by one tenant's session is never bound by another tenant's session
at the same time; :meth:`MemoryRegistry.pick` returns only live, non-draining sessions of the
alias's owner.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from shared.aliases import domain_of, grant_covers, is_pattern
from shared.errors import AliasTaken


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


S = TypeVar("S", bound=Session)


@dataclass(frozen=True, slots=True)
class Lookup(Generic[S]):
    """The answer to "who serves this alias": its owner (None: unknown) and live sessions."""

    tenant: str | None
    sessions: tuple[S, ...] = ()


@dataclass(slots=True)
class MemoryRegistry(Generic[S]):
    """The one-node registry: everything in this process's memory."""

    load_assignments: Callable[[], dict[str, str]] = dict
    _assigned: dict[str, str] = field(default_factory=dict)
    _learned: dict[str, str] = field(default_factory=dict)
    _live: dict[str, list[S]] = field(default_factory=dict)

    def refresh(self) -> None:
        """Re-read the recorded assignments (grant -> tenant)."""
        self._assigned = dict(self.load_assignments())

    def owner(self, alias: str) -> str | None:
        """The tenant owning ``alias`` (a normalised alias or grant), or None."""
        for table in (self._assigned, self._learned):
            tenant = table.get(alias)
            if tenant is not None:
                return tenant
        domain = domain_of(alias)
        if domain is not None and not is_pattern(alias):
            pattern = f"*@{domain}"
            for table in (self._assigned, self._learned):
                tenant = table.get(pattern)
                if tenant is not None:
                    return tenant
        return None

    def _conflict(self, tenant: str, grant: str) -> str | None:
        """Another tenant that holds ``grant`` or an alias it covers, if any."""
        owner = self.owner(grant)
        if owner is not None and owner != tenant:
            return owner
        if is_pattern(grant):
            for table in (self._assigned, self._learned):
                for other, other_tenant in table.items():
                    if other_tenant != tenant and grant_covers(grant, other):
                        return other_tenant
        return None

    def bind(self, session: S) -> None:
        """Register a live session for its grants; raise AliasTaken naming the first conflict."""
        for grant in session.grants:
            other = self._conflict(session.tenant, grant)
            if other is not None:
                raise AliasTaken(f"alias {grant} is held by another tenant")
        for grant in session.grants:
            self._learned[grant] = session.tenant
            self._live.setdefault(grant, []).append(session)

    def unbind(self, session: S) -> None:
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
            self.refresh()
            tenant = self.owner(alias)
            if tenant is None:
                return Lookup(None)
        found: list[S] = list(self._live.get(alias, ()))
        domain = domain_of(alias)
        if domain is not None:
            found.extend(self._live.get(f"*@{domain}", ()))
        sessions = [s for s in found if s.tenant == tenant and s.accepting]
        random.shuffle(sessions)  # equally loaded sessions take turns (the sort is stable)
        sessions.sort(key=lambda s: s.load)
        return Lookup(tenant, tuple(sessions))

    def sessions(self) -> Iterable[S]:
        seen: dict[int, S] = {}
        for live in self._live.values():
            for s in live:
                seen[id(s)] = s
        return seen.values()
