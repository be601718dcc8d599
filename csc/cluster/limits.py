"""A tenant's limits across the whole cluster: the request rate as one token bucket per tenant
in Redis (:class:`ClusterRate`), concurrent sessions and streams as expiring slots
(:class:`ClusterSlots`).

Only tenants with a ``max_request_rate`` pay for it (one Redis round trip per request); the
bucket lives in one hash (``{P:limit:<tenant>}``) updated by a script with the server's clock,
so every node takes from the same bucket and clock skew between nodes does not matter. Over any
interval of length ``t`` the cluster admits at most ``rate * t + burst`` requests of a tenant
(csc/relay/limits.py ``burst_for``). When Redis cannot be reached the node falls back to a local
bucket at ``rate / live nodes``, which keeps the same bound while every node does the same.
"""

from __future__ import annotations

from typing import Any

from csc.relay.limits import burst_for

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


#: Drop expired members, then add ``ARGV[3]`` unless the set holds ``ARGV[1]`` (the cap)
#: already; members expire ``ARGV[2]`` seconds from the server's now. 1: admitted, 0: full.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000) + 1000)
return 1
"""

#: Push the expiry of the members still held (``ARGV[2..]``) to ``ARGV[1]`` seconds from now;
#: returns those no longer in the set that a hand-over moved to another session (recorded in
#: ``KEYS[2]``; one lost with Redis's data is not named).
_REFRESH = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
local gone = {}
for i = 2, #ARGV do
  if redis.call('ZADD', KEYS[1], 'XX', 'CH', until_, ARGV[i]) == 0
      and not redis.call('ZSCORE', KEYS[1], ARGV[i])
      and redis.call('ZSCORE', KEYS[2], ARGV[i]) then
    table.insert(gone, ARGV[i])
  end
end
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) * 1000) + 1000)
return gone
"""

#: A member (``ARGV[2]``) whose session may give its place: kept ``ARGV[1]`` seconds.
_YIELDING = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) * 1000) + 1000)
return 0
"""

#: The set (``KEYS[1]``) is full: move the place of the member the dial names (``ARGV[5]``,
#: "" for none) if it holds one, or else of a yielding member (``KEYS[2]``) that does, to
#: ``ARGV[3]`` (expiring ``ARGV[2]`` seconds from now), unless a member that gave its place in
#: the last ``ARGV[4]`` seconds (``KEYS[3]``) may still run. Returns the member that gave its
#: place, or false. ``ARGV[1]`` is the cap (room meanwhile: taken, and "" returned).
_TAKE_OVER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[2])
for i = 1, 3 do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
end
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
  return ''
end
if redis.call('ZCARD', KEYS[3]) > 0 then
  return false
end
local candidates = redis.call('ZRANGE', KEYS[2], 0, -1)
if ARGV[5] ~= '' then
  table.insert(candidates, 1, ARGV[5])
end
for _, member in ipairs(candidates) do
  redis.call('ZREM', KEYS[2], member)
  if redis.call('ZREM', KEYS[1], member) == 1 then
    redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), member)
    for i = 1, 3 do
      redis.call('PEXPIRE', KEYS[i], math.ceil(math.max(ttl, tonumber(ARGV[4])) * 1000) + 1000)
    end
    return member
  end
end
return false
"""


class ClusterSlots:
    """A tenant's concurrent agent sessions and streams across the cluster.

    Each held slot is a member of a sorted set (``{P:limit:<tenant>}:<kind>``) scored with its
    expiry; the node that holds it pushes the expiry forward at every heartbeat and removes it
    when the session or stream ends, so the slots of a node that died expire within ``ttl``.
    Admission drops expired members and compares the count with the cap in one script.
    """

    def __init__(self, redis: Any, prefix: str, ttl: float) -> None:
        self._redis = redis
        self._acquire = redis.register_script(_ACQUIRE)
        self._refresh = redis.register_script(_REFRESH)
        self._yielding = redis.register_script(_YIELDING)
        self._take_over = redis.register_script(_TAKE_OVER)
        self._prefix = prefix
        self.ttl = ttl
        #: (tenant, kind) -> members this node holds
        self.held: dict[tuple[str, str], set[str]] = {}

    def key(self, tenant: str, kind: str) -> str:
        return f"{{{self._prefix}:limit:{tenant}}}:{kind}"

    async def acquire(self, tenant: str, kind: str, member: str, cap: int) -> bool:
        """Take a slot (True) unless ``cap`` are held across the cluster (False); raises
        RedisError."""
        taken = await self._acquire(
            keys=[self.key(tenant, kind)], args=[cap, repr(self.ttl), member]
        )
        if int(taken):
            self.held.setdefault((tenant, kind), set()).add(member)
            return True
        return False

    async def release(self, tenant: str, kind: str, member: str) -> None:
        """Give a slot back (raises RedisError; the slot then expires by itself)."""
        members = self.held.get((tenant, kind))
        if members is not None:
            members.discard(member)
            if not members:
                del self.held[(tenant, kind)]
        await self._redis.zrem(self.key(tenant, kind), member)

    async def yielding(self, tenant: str, kind: str, member: str) -> None:
        """``member``'s session may give its place to a new one (:meth:`take_over`), for the
        next ``ttl`` seconds; raises RedisError."""
        await self._yielding(keys=[self.key(tenant, kind) + ":yielding"], args=[self.ttl, member])

    async def take_over(
        self, tenant: str, kind: str, member: str, cap: int, grace: float, named: str | None
    ) -> str | None:
        """With ``cap`` slots held: for ``member``, the place of ``named`` if it holds one, or
        else of a yielding member (:meth:`yielding`); the member that gave it ("" when a slot
        came free meanwhile), or None (none to take, or one that gave its place may still
        run: ``grace`` seconds after it gave it, and ``ttl`` more for its node to find out).
        Raises RedisError."""
        key = self.key(tenant, kind)
        keys = [key, key + ":yielding", key + ":given"]
        args = [cap, repr(self.ttl), member, grace + self.ttl, named or ""]
        taken = await self._take_over(keys=keys, args=args)
        if taken is None:
            return None
        self.held.setdefault((tenant, kind), set()).add(member)
        return taken.decode() if isinstance(taken, bytes) else str(taken)

    async def given_ended(self, tenant: str, kind: str, member: str) -> None:
        """The session that gave ``member``'s place ended: the tenant's next hand-over
        (:meth:`take_over`) need not wait for its record to expire. Raises RedisError."""
        await self._redis.zrem(self.key(tenant, kind) + ":given", member)

    async def refresh(self) -> list[tuple[str, str, str]]:
        """Keep this node's slots alive (called at every heartbeat); returns those that
        :meth:`take_over` moved to another session (tenant, kind, member), no longer held from
        then on."""
        gone: list[tuple[str, str, str]] = []
        for (tenant, kind), members in list(self.held.items()):
            if members:
                key = self.key(tenant, kind)
                lost = await self._refresh(
                    keys=[key, key + ":given"], args=[repr(self.ttl), *sorted(members)]
                )
                for raw in lost:
                    member = raw.decode() if isinstance(raw, bytes) else str(raw)
                    members.discard(member)
                    gone.append((tenant, kind, member))
                if not members:
                    self.held.pop((tenant, kind), None)
        return gone
