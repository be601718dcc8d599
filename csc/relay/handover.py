"""A session's place against its tenant's session limit, handed to the session renewing it.

An agent renews its token by dialling a session with the new token beside the old one, then
closing the old one once its streams finished. A tenant whose sessions fill its
``max_sessions`` (or, without a cap of its own, the node's ``default_max_sessions``) has no
room for the new one. So the renewal's dial names the session it replaces (the
``CSC-Replaces`` header: its session id), and the new session takes that one's place, while
the old one keeps serving until the agent, once the new one is up, sends it GOAWAY: there is
no moment without a session. A dial that names none (an agent of an earlier version, or a
retry after a refusal) takes the place of a session whose agent sent GOAWAY.

The place is the session's count on this node (:class:`Seat` ``local``) or, in a cluster, its
slot (``slot``, moved in Redis by csc/cluster/limits.py; the node holding the old session
finds out at its next heartbeat). The old session keeps running so that its streams finish,
but only for ``grace`` seconds (the node's ``drain_timeout``); then the node closes it.

The bounds, against a tenant that would use this to hold more than its limit: only a session
of the same tenant that the dial names, or whose agent sent GOAWAY, can give its place; a
tenant has at most one session at a time that gave its place and still runs (a second
hand-over waits until it ended), so it holds at most its limit plus one session, the extra
one for at most ``grace`` seconds (and a heartbeat, in a cluster).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from shared.errors import CSCError, GoingAway

log = logging.getLogger("csc.relay.handover")


@dataclass(eq=False, slots=True)
class Seat:
    """What one agent session holds against its tenant's session limits."""

    tenant: str
    #: the session's id, given at admission (in a cluster also its slot's member)
    id: str = ""
    #: counted in the node's sessions of the tenant (csc/relay/limits.py)
    local: bool = False
    #: its member in the cluster's session slots of the tenant; None: none (no cap, no cluster,
    #: or given to a successor)
    slot: str | None = None
    #: the member it gave to a successor (the cluster's record of the hand-over, dropped when
    #: the session ends so that the tenant's next hand-over need not wait for it to expire)
    gave: str | None = None
    #: its agent sent GOAWAY: it may have given its place before this node heard of it
    yielded: bool = False


class Giver(Protocol):
    """The side of an agent session this module uses (csc/relay/gateway.py's AgentSession)."""

    @property
    def id(self) -> str: ...

    @property
    def seat(self) -> Seat: ...

    @property
    def closed(self) -> bool: ...

    def end(self, err: CSCError) -> None: ...


class Handovers:
    """The sessions of this node whose agent sent GOAWAY (they may give their place), and per
    tenant the one that gave it and still runs."""

    def __init__(self, grace: float, counted: Callable[[str], None] = lambda tenant: None) -> None:
        self.grace = grace
        #: called with the tenant of each session that gave its place (a metric)
        self._counted = counted
        self._yielding: dict[str, dict[str, Giver]] = {}
        self._given: dict[str, tuple[Giver, asyncio.TimerHandle]] = {}

    def yielding(self, session: Giver) -> None:
        """``session``'s agent sent GOAWAY: it may give its place to a new session."""
        session.seat.yielded = True
        self._yielding.setdefault(session.seat.tenant, {})[session.id] = session

    def ended(self, session: Giver) -> None:
        """``session`` is down: forget it (and its deadline)."""
        tenant = session.seat.tenant
        self._not_yielding(session)
        given = self._given.get(tenant)
        if given is not None and given[0] is session:
            given[1].cancel()
            del self._given[tenant]

    def waiting(self, tenant: str) -> int:
        """How many sessions of ``tenant`` may give their place."""
        return len(self._yielding.get(tenant, {}))

    def can_give(self, tenant: str) -> bool:
        """Whether a session of ``tenant`` may give its place now (none that gave it runs)."""
        return tenant not in self._given

    def take_local(self, tenant: str, named: Giver | None = None) -> Giver | None:
        """A session of ``tenant`` counted on this node whose count a new session takes over
        (given: it ends within ``grace``): ``named`` (the session the new one says it
        replaces, a session of ``tenant``) or else one that yields; None if there is none."""
        if not self.can_give(tenant):
            return None
        candidates = list(self._yielding.get(tenant, {}).values())
        if named is not None and named.seat.tenant == tenant:
            candidates.insert(0, named)
        for session in candidates:
            if session.seat.local and not session.closed:
                session.seat.local = False
                self.give(session)
                return session
        return None

    def slot_taken(self, session: Giver) -> None:
        """The cluster moved ``session``'s slot to a new session: it is given."""
        session.seat.slot, session.seat.gave = None, session.seat.slot
        self.give(session)

    def give(self, session: Giver) -> None:
        """``session`` gave its place: close it ``grace`` seconds from now if still running."""
        tenant = session.seat.tenant
        self._not_yielding(session)
        self._counted(tenant)
        timer = asyncio.get_running_loop().call_later(self.grace, self._deadline, session)
        self._given[tenant] = (session, timer)  # one that gave it before still ends in time
        log.info(
            "agent session %s gave its place to its agent's new session; it ends within %.0f s",
            session.id,
            self.grace,
        )

    def _not_yielding(self, session: Giver) -> None:
        tenant = session.seat.tenant
        waiting = self._yielding.get(tenant)
        if waiting is not None:
            waiting.pop(session.id, None)
            if not waiting:
                del self._yielding[tenant]

    def _deadline(self, session: Giver) -> None:
        given = self._given.get(session.seat.tenant)
        if given is not None and given[0] is session:
            del self._given[session.seat.tenant]
        if not session.closed:
            log.info(
                "agent session %s: it gave its place %.0f s ago; closing it", session.id, self.grace
            )
            session.end(GoingAway("this session gave its place to its agent's new session"))
