"""What lets several CSC nodes act as one CSC: the shared connection to Redis (``redisconn``)
and pub/sub that survives failovers (``subscriber``), on which the cluster registry builds.

Nothing here runs in a single-node CSC: it is used only when ``redis_url`` is set, and only
then is redis-py imported (this module and ``peer`` import no Redis code).
"""


class ClusterUnavailable(Exception):
    """What the other nodes published cannot be read right now (Redis is unreachable)."""
