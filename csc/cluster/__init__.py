"""What lets several CSC nodes act as one CSC: the shared connection to Redis (``redisconn``),
pub/sub that survives failovers (``subscriber``), and, on top of them, the cluster registry.

Nothing here runs in a single-node CSC: it is used only when ``redis_url`` is set.
"""
