"""The node's bounds on stream-window growth: one pool per tenant under one for the node.

A link's windows start at ``initial_window`` per stream and grow, when the consumer keeps up,
within the link's ``session_budget`` (docs/protocol.md §5). The bytes a window allows are what
the node may have to buffer for that stream, and a tenant decides how many sessions it opens
(up to its ``max_sessions``, or the node's ``default_max_sessions``) and, with its own agent
and clients, how far they grow: alone, ``session_budget`` would let one tenant buffer that
much per session. So every agent session of a tenant draws on the tenant's pool
(``tenant_window_growth``), and every tenant's pool on the node's (``node_window_growth``):
a tenant's sessions together never buffer more growth than its pool, and a spent pool only
keeps windows at their initial size (slower transfers, never a failure).

Invariant: a tenant's pool stays registered while a session of the tenant uses it or its
growth is not all given back, so a tenant has one pool at a time.
"""

from __future__ import annotations

from shared.protocol.windows import GrowthPool


class GrowthPools:
    """The node's pool and its tenants' pools (see the module docstring)."""

    def __init__(self, tenant_budget: int, node_budget: int) -> None:
        self.tenant_budget = tenant_budget
        self.node = GrowthPool(node_budget)
        self._tenants: dict[str, tuple[GrowthPool, int]] = {}

    def take(self, tenant: str) -> GrowthPool:
        """The pool of a new session of ``tenant``; :meth:`give` it back when the session ends."""
        pool, users = self._tenants.get(tenant) or (GrowthPool(self.tenant_budget, self.node), 0)
        self._tenants[tenant] = (pool, users + 1)
        return pool

    def give(self, tenant: str) -> None:
        entry = self._tenants.get(tenant)
        if entry is None:
            return
        pool, users = entry
        if users > 1 or pool.held:
            self._tenants[tenant] = (pool, max(users - 1, 0))
        else:
            del self._tenants[tenant]

    def of(self, tenant: str) -> GrowthPool | None:
        entry = self._tenants.get(tenant)
        return entry[0] if entry is not None else None
