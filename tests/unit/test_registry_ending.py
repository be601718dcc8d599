"""``MemoryRegistry.ending`` at rest: it walks every session only when the catalog changed or a
token may have expired, else only the sessions bound since its last call, and still names every
session that lost its right to run (csc/relay/registry.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from csc.relay.registry import MemoryRegistry
from csc.tenants import Catalog, Tenant
from shared.tokens import DEFAULT_LEEWAY

NOW = 1_000_000.0


class Counted:
    """Counts how often the registry reads a session's tenant (one read per check)."""

    reads = 0


@dataclass(eq=False)
class Session:
    name: str
    jti: str
    expires_at: float = NOW + 3600
    grants: tuple[str, ...] = ("*@acme.org",)
    accepting: bool = True
    load: int = 0

    @property
    def tenant(self) -> str:
        Counted.reads += 1
        return "acme"


def _catalog(*, revoked: frozenset[str] = frozenset(), state: str = "active") -> Catalog:
    return Catalog(
        tenants={"acme": Tenant("acme", "Acme", state=state)},
        assigned={"*@acme.org": "acme"},
        revoked=revoked,
    )


def _names(found: list[tuple[Session, object]]) -> list[str]:
    return sorted(s.name for s, _ in found)


def test_at_rest_only_new_sessions_are_checked_and_nothing_is_missed() -> None:
    registry: MemoryRegistry[Session] = MemoryRegistry(catalog=_catalog())
    sessions = [Session(f"s{i}", f"j{i}") for i in range(100)]
    sessions.append(Session("soon", "jsoon", expires_at=NOW + 60))
    for s in sessions:
        registry.bind(s)
    assert registry.ending(NOW) == []  # the first call checks all
    Counted.reads = 0
    assert registry.ending(NOW + 1) == [] and Counted.reads == 0  # at rest: none

    # a session bound since is checked alone, even if admitted under an older catalog
    late = Session("late", "jlate")
    registry.catalog = _catalog(revoked=frozenset({"jlate"}))
    assert _names(registry.ending(NOW + 2)) == []  # a new catalog: all checked, late not bound
    registry.bind(late)
    Counted.reads = 0
    assert _names(registry.ending(NOW + 3)) == ["late"] and Counted.reads == 1

    # a changed catalog (revocation, suspension): all checked again
    registry.unbind(late)
    registry.catalog = _catalog(revoked=frozenset({"j7"}))
    assert _names(registry.ending(NOW + 4)) == ["s7"]
    registry.unbind(sessions[7])
    registry.catalog = _catalog(state="suspended")
    assert len(registry.ending(NOW + 5)) == 100

    # an expiry is due: all checked, and the expired token named
    registry.catalog = _catalog()
    assert registry.ending(NOW + 6) == []
    Counted.reads = 0
    assert registry.ending(NOW + 60 + DEFAULT_LEEWAY - 1) == [] and Counted.reads == 0
    found = registry.ending(NOW + 60 + DEFAULT_LEEWAY)
    assert _names(found) == ["soon"] and found[0][1].code == "auth_failed"  # type: ignore[attr-defined]
    registry.unbind(sessions[-1])
    Counted.reads = 0
    assert registry.ending(NOW + 3600) == [] and Counted.reads == 0


def test_a_session_unbound_before_the_check_is_not_named() -> None:
    registry: MemoryRegistry[Session] = MemoryRegistry(catalog=_catalog())
    registry.ending(NOW)
    gone = Session("gone", "jgone")
    registry.bind(gone)
    registry.unbind(gone)
    registry.catalog = dataclasses.replace(registry.catalog)  # same content, a new snapshot
    assert registry.ending(NOW + 1) == []
