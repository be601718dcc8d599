"""A tenant's request rate across the whole cluster: one token bucket per tenant in Redis.

Only tenants with a ``max_request_rate`` pay for it (one Redis round trip per request); the
bucket lives in one hash (``{P:limit:<tenant>}``) updated by a script with the server's clock,
so every node takes from the same bucket and clock skew between nodes does not matter. Over any
interval of length ``t`` the cluster admits at most ``rate * t + burst`` requests of a tenant
(csc/limits.py ``burst_for``). When Redis cannot be reached the node falls back to a local
bucket at ``rate / live nodes``, which keeps the same bound while every node does the same.
"""

from __future__ import annotations

from typing import Any

from csc.limits import burst_for

#: Refill, then take one token; returns the seconds to wait (0: taken), as a string.
_TAKE = """
local now = redis.call('TIME')
local now_s = tonumber(now[1]) + tonumber(now[2]) / 1000000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(b[1])
local stamp = tonumber(b[2])
if tokens == nil or stamp == nil then
  tokens = burst
  stamp = now_s
end
if now_s > stamp then
  tokens = math.min(burst, tokens + (now_s - stamp) * rate)
  stamp = now_s
end
tokens = math.min(tokens, burst)
local wait = 0
if tokens >= 1 - 1e-9 then
  tokens = math.max(0, tokens - 1)
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'stamp', tostring(stamp))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return tostring(wait)
"""


class ClusterRate:
    """The shared token buckets (see the module docstring)."""

    def __init__(self, redis: Any, prefix: str) -> None:
        self._script = redis.register_script(_TAKE)
        self._prefix = prefix

    def key(self, tenant: str) -> str:
        return f"{{{self._prefix}:limit:{tenant}}}"

    async def take(self, tenant: str, rate: float) -> float:
        """Take one token of ``tenant``'s bucket: 0.0, or the seconds until one is there.
        Raises RedisError when Redis cannot be reached."""
        wait = await self._script(keys=[self.key(tenant)], args=[repr(rate), repr(burst_for(rate))])
        return float(wait)
