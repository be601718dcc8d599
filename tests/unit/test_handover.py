"""csc/relay/handover.py: which session may give its place, and the bound on those that gave it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from csc.relay.handover import Handovers, Seat
from shared.errors import CSCError


@dataclass(eq=False)
class _Session:
    id: str
    seat: Seat
    closed: bool = False
    ended_with: list[CSCError] = field(default_factory=list)

    def end(self, err: CSCError) -> None:
        self.ended_with.append(err)
        self.closed = True


def _session(name: str, tenant: str = "acme", *, slot: str | None = None) -> _Session:
    return _Session(name, Seat(tenant, local=True, slot=slot))


async def test_only_a_yielding_session_gives_its_count_and_it_ends_after_the_grace() -> None:
    handovers = Handovers(0.05)
    serving, yielding = _session("a"), _session("b")
    assert handovers.take_local("acme") is None  # nobody sent GOAWAY
    handovers.yielding(yielding)
    assert handovers.waiting("acme") == 1
    assert handovers.take_local("globex") is None  # another tenant's place is not ours
    assert handovers.take_local("acme") is yielding
    assert not yielding.seat.local and serving.seat.local
    assert handovers.waiting("acme") == 0 and not handovers.can_give("acme")
    await asyncio.sleep(0.15)
    assert yielding.closed and len(yielding.ended_with) == 1 and not serving.closed
    handovers.ended(yielding)
    assert handovers.can_give("acme")


async def test_one_session_that_gave_its_place_at_a_time_per_tenant() -> None:
    handovers = Handovers(60)
    first, second, other = _session("a"), _session("b"), _session("c", "globex")
    for session in (first, second, other):
        handovers.yielding(session)
    assert handovers.take_local("acme") is first
    assert handovers.take_local("acme") is None  # the first still runs its grace
    assert handovers.take_local("globex") is other  # other tenants are not held up
    handovers.ended(first)  # it finished its streams: the next hand-over may happen
    assert handovers.take_local("acme") is second
    handovers.ended(second)
    handovers.ended(other)


async def test_a_session_that_ended_is_no_candidate_and_its_deadline_is_dropped() -> None:
    handovers = Handovers(0.05)
    gone, given = _session("a"), _session("b")
    handovers.yielding(gone)
    gone.closed = True
    assert handovers.take_local("acme") is None
    handovers.ended(gone)
    assert handovers.waiting("acme") == 0
    handovers.yielding(given)
    assert handovers.take_local("acme") is given
    handovers.ended(given)  # ended by itself before the grace: nothing left to close
    await asyncio.sleep(0.15)
    assert given.ended_with == []


async def test_a_slot_moved_by_the_cluster_starts_the_grace_of_the_session_holding_it() -> None:
    handovers = Handovers(0.05)
    holder, bystander = _session("a", slot="A-1-aa"), _session("b", slot="A-2-bb")
    handovers.slot_taken(holder)
    assert holder.seat.slot is None and holder.seat.gave == "A-1-aa"
    assert bystander.seat.slot == "A-2-bb" and not handovers.can_give("acme")
    await asyncio.sleep(0.15)
    assert holder.closed and not bystander.closed


async def test_the_session_a_dial_names_gives_its_place_before_one_that_yields() -> None:
    handovers = Handovers(60)
    yielding, named, foreign = _session("a"), _session("b"), _session("c", "globex")
    handovers.yielding(yielding)
    assert handovers.take_local("acme", foreign) is yielding  # another tenant's: not taken
    handovers.ended(yielding)
    handovers.yielding(yielding := _session("d"))
    assert handovers.take_local("acme", named) is named  # named first, without GOAWAY
    assert not named.seat.local and yielding.seat.local and foreign.seat.local
    assert handovers.take_local("acme", yielding) is None  # one at a time
    handovers.ended(named)
    handovers.ended(yielding)
