"""Receive-window arithmetic of one stream (docs/protocol.md §5), as pure functions.

:class:`~shared.protocol.mux.Connection` keeps the numbers (window, unacknowledged bytes, the
link's RTT and window total); these functions only decide when credit goes back and by how much
a window grows. No clock, no state.

Invariants: a window grows at most :data:`MAX_GROWTH`-fold per update, never beyond
``max_window`` and never by more than the ``room`` left in the session budget.
"""

from __future__ import annotations

#: At most this factor of window growth per WINDOW update.
MAX_GROWTH = 8


def update_threshold(window: int, initial_window: int) -> int:
    """Credit goes back after half the initial window, or a quarter of a grown one: on a long
    link a grown window must be refilled well before the sender runs dry."""
    return window // 2 if window <= initial_window else window // 4


def window_growth(
    *, window: int, unacked: int, interval: float, rtt: float, max_window: int, room: int
) -> int:
    """Auto-tuning: when the window, not the consumer, limits the rate (``unacked`` bytes were
    consumed within ``interval`` < 2 RTT of the last update), grow it toward twice the measured
    rate x RTT: at least doubling, at most MAX_GROWTH-fold. Returns the growth (0: none)."""
    rtt = max(rtt, 0.001)
    if interval >= 2 * rtt:
        return 0
    rate = unacked / max(interval, 1e-6)  # bytes/s consumed since the last update
    target = min(MAX_GROWTH * window, max(2 * window, int(2 * rate * rtt)))
    return max(min(target - window, max_window - window, room), 0)


class GrowthPool:
    """Bytes by which receive windows may grow beyond ``initial_window``, shared by links.

    A link's ``session_budget`` bounds its own windows; a pool bounds the growth of every link
    that draws on it (the CSC: one per tenant, for the tenant's agent sessions on the node,
    under one for the whole node), so that many sessions do not multiply what one may buffer.
    Invariant: ``held`` is the growth of the live streams of the links on the pool (and its
    children's, for a parent) and never exceeds ``budget`` through :meth:`take` of at most
    :meth:`room`.
    """

    def __init__(self, budget: int, parent: GrowthPool | None = None) -> None:
        self.budget = budget
        self.parent = parent
        self.held = 0

    def room(self) -> int:
        """Growth still allowed, here and in every parent."""
        room = self.budget - self.held
        parent = self.parent
        while parent is not None:
            room = min(room, parent.budget - parent.held)
            parent = parent.parent
        return max(room, 0)

    def take(self, size: int) -> None:
        pool: GrowthPool | None = self
        while pool is not None:
            pool.held += size
            pool = pool.parent

    def give(self, size: int) -> None:
        self.take(-size)
