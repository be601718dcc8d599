"""Routing state in Redis: the node directory, this node's lease, and which nodes serve an alias.

Everything here can be rebuilt from the nodes themselves (DESIGN.md "State and scale-out"): a
Redis flush or failover costs no operator data; each node re-asserts its lease and routes on its
next heartbeat.

Keys (``P`` is ``redis_prefix``; hash tags keep each group in one slot, so Redis Cluster works):

* ``{P:nodes}`` hash: node id -> JSON ``{peer, epoch, draining, since}`` (the directory);
* ``{P:nodes}:lease:<node>``: the node's epoch, expiring ``route_lease`` after its last
  heartbeat; a node is live while this key holds the epoch its directory entry names;
* ``{P:nodes}:epoch``: the counter epochs are taken from (INCR);
* ``{P:nodes}:version``: bumped on every route change (a backstop for missed invalidations);
* ``{P:nodes}:sessions:<node>``: JSON list of the node's live agent sessions (admin views),
  expiring with the lease;
* ``{P:nodes}:routes:<node>``: the grants the node registered, so that the node that finds it
  dead (its lease gone) deletes its routes;
* ``P:r:{<alias>}`` hash: node id -> the epoch under which that node registered the alias.

**Epochs (fencing).** A node takes a fresh epoch from the counter when it starts, and again
whenever it finds its lease gone after a pause longer than the lease (SIGSTOP, a frozen VM): its
old epoch is then void, and so is every route it wrote under it, because a route entry counts
only while its node's live lease carries the same epoch. A node that was paused therefore can
never bring an old route back; it also ends the sessions it held (the agents reconnect). A node
that kept running while Redis was away (its heartbeats simply failed) keeps its epoch and
re-asserts its lease and routes when Redis answers again, without agents reconnecting.

**Lookups** for an alias served by no local session read ``P:r:{alias}`` (and the ``*@domain``
pattern), keep the entries whose node is live, not draining and of the same epoch, and cache
the answer (empty ones too) for ``LOOKUP_TTL``. Invalidation messages on the ``P:events``
channel drop cached answers at once; the version counter, polled with the directory every
heartbeat, drops the whole cache if a message was missed. A lookup deletes a route entry only
once its epoch is void (its node's lease names another epoch, or is gone). When Redis cannot be
read, or does not answer within ``LOOKUP_TIMEOUT`` (a failover under way), the last known answer
is used, however old (tunnels keep working on what the node knows; stale-if-error).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from csc.cluster import ClusterUnavailable
from shared.aliases import domain_of

log = logging.getLogger("csc.cluster.routes")

#: Seconds a lookup answer (positive or negative) is reused without asking Redis.
LOOKUP_TTL = 1.0
#: Lookup answers kept at most (the least recently asked go first): under a ``*@domain`` grant
#: anyone can ask for aliases without end, each one a lookup of its own.
LOOKUP_CACHE_MAX = 10_000
#: Longest wait for Redis on a request's path before the last known answer is used instead.
LOOKUP_TIMEOUT = 1.0
#: A directory read older than this is not trusted to tell dead route entries apart.
DIRECTORY_FRESH = 5.0
PREFIX_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

#: Deletes a hash field only if it still holds the given value (a route's stale epoch, a dead
#: node's directory entry): what a node wrote since stays.
_DELETE_IF = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Keys:
    """Key and channel names under one prefix."""

    prefix: str

    def __post_init__(self) -> None:
        if PREFIX_RE.fullmatch(self.prefix) is None:
            raise ValueError(f"redis_prefix {self.prefix!r}: use letters, digits and _.:- only")

    @property
    def nodes(self) -> str:
        return f"{{{self.prefix}:nodes}}"

    @property
    def epoch(self) -> str:
        return f"{self.nodes}:epoch"

    @property
    def version(self) -> str:
        return f"{self.nodes}:version"

    def lease(self, node: str) -> str:
        return f"{self.nodes}:lease:{node}"

    def sessions(self, node: str) -> str:
        return f"{self.nodes}:sessions:{node}"

    def disconnects(self, node: str) -> str:
        """Session ids operators asked ``node`` to end, until it takes them."""
        return f"{self.nodes}:disconnects:{node}"

    def routes_of(self, node: str) -> str:
        return f"{self.nodes}:routes:{node}"

    def route(self, grant: str) -> str:
        return f"{self.prefix}:r:{{{grant}}}"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A node as the directory shows it."""

    id: str
    peer: str
    epoch: int
    draining: bool = False
    since: float = 0.0

    def to_json(self) -> str:
        return json.dumps(
            {"peer": self.peer, "epoch": self.epoch, "draining": self.draining, "since": self.since}
        )

    @classmethod
    def from_json(cls, node: str, raw: str | bytes) -> NodeInfo | None:
        try:
            data = json.loads(raw)
            return cls(
                node,
                str(data["peer"]),
                int(data["epoch"]),
                bool(data.get("draining", False)),
                float(data.get("since", 0.0)),
            )
        except (ValueError, KeyError, TypeError):
            return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(eq=False)
class RouteTable:
    """This node's lease and routes in Redis, and its cached view of the others'."""

    redis: Any  # redis.asyncio.Redis | redis.asyncio.RedisCluster
    keys: Keys
    node_id: str
    lease: float
    on_error: Callable[[Exception], None] = lambda exc: None
    clock: Callable[[], float] = time.monotonic
    epoch: int = 0
    info: NodeInfo | None = None
    #: live nodes (this one included) from the last directory read
    directory: dict[str, NodeInfo] = field(default_factory=dict)
    directory_read_at: float = float("-inf")
    #: until then (``clock``), a node whose lease is missing but whose entry is there stays
    #: live: set while Redis lost or could not keep this node's own lease (an outage, a
    #: failover, a flush), when every node's lease went for the same reason (Cluster.beat)
    grace_until: float = float("-inf")
    _version: int | None = None
    _cache: dict[str, tuple[float, tuple[NodeInfo, ...]]] = field(default_factory=dict)
    _delete_if: Any = None

    # -- this node ---------------------------------------------------------------------------

    async def join(self, peer: str, *, draining: bool = False) -> int:
        """Take a fresh epoch and write this node's lease and directory entry.

        An epoch is never one this node had before, even when the counter was lost with a
        Redis flush: the counter is then moved past this node's last epoch.
        """
        epoch = int(await self.redis.incr(self.keys.epoch))
        if epoch <= self.epoch:
            epoch = int(await self.redis.incrby(self.keys.epoch, self.epoch - epoch + 1))
        self.epoch = epoch
        self.info = NodeInfo(self.node_id, peer, self.epoch, draining, time.time())
        await self._write_lease()
        return self.epoch

    @property
    def me(self) -> NodeInfo:
        """This node's directory entry (after :meth:`join`)."""
        if self.info is None:
            raise RuntimeError("RouteTable.join() must come first")
        return self.info

    async def _write_lease(self) -> None:
        await self.redis.set(self.keys.lease(self.node_id), self.epoch, px=self._lease_ms)
        await self.redis.hset(self.keys.nodes, self.node_id, self.me.to_json())

    @property
    def _lease_ms(self) -> int:
        return max(1, int(self.lease * 1000))

    async def heartbeat(self) -> str:
        """Refresh the lease: ``ok``, ``lost`` (the key was gone: flush, failover or expiry;
        re-created) or ``taken`` (another node holds this id's lease under another epoch)."""
        old = await self.redis.set(
            self.keys.lease(self.node_id), self.epoch, px=self._lease_ms, xx=True, get=True
        )
        if old is None:  # the lease first, so no reader finds the entry without it
            await self.redis.set(self.keys.lease(self.node_id), self.epoch, px=self._lease_ms)
        await self.redis.hset(self.keys.nodes, self.node_id, self.me.to_json())
        if old is None:
            return "lost"
        return "ok" if _text(old) == str(self.epoch) else "taken"

    async def set_draining(self) -> None:
        me = self.me
        self.info = NodeInfo(self.node_id, me.peer, self.epoch, True, me.since)
        await self.redis.hset(self.keys.nodes, self.node_id, self.info.to_json())

    async def leave(self, grants: Iterable[str]) -> None:
        """Remove this node's routes, lease and directory entry (a clean stop)."""
        for grant in grants:
            await self.redis.hdel(self.keys.route(grant), self.node_id)
        await self.redis.delete(
            self.keys.lease(self.node_id),
            self.keys.sessions(self.node_id),
            self.keys.routes_of(self.node_id),
        )
        await self.redis.hdel(self.keys.nodes, self.node_id)
        await self.redis.incr(self.keys.version)

    async def publish_sessions(self, views: list[dict[str, Any]]) -> None:
        await self.redis.set(self.keys.sessions(self.node_id), json.dumps(views), px=self._lease_ms)

    # -- routes of this node -----------------------------------------------------------------

    async def register(self, grants: Iterable[str]) -> None:
        grants = list(grants)
        if grants:  # the list lets the others clean up after this node if it dies
            await self.redis.sadd(self.keys.routes_of(self.node_id), *grants)
        for grant in grants:
            await self.redis.hset(self.keys.route(grant), self.node_id, self.epoch)
        await self.redis.incr(self.keys.version)

    async def unregister(self, grants: Iterable[str]) -> None:
        grants = list(grants)
        for grant in grants:
            await self.redis.hdel(self.keys.route(grant), self.node_id)
        if grants:
            await self.redis.srem(self.keys.routes_of(self.node_id), *grants)
        await self.redis.incr(self.keys.version)

    # -- the directory -----------------------------------------------------------------------

    async def read_directory(self) -> dict[str, NodeInfo]:
        """Re-read the live nodes; drops the lookup cache when the route version moved."""
        raw = {
            _text(node): value
            for node, value in (await self.redis.hgetall(self.keys.nodes)).items()
        }
        entries = {
            info.id: info
            for node, value in raw.items()
            if (info := NodeInfo.from_json(node, value)) is not None
        }
        names = sorted(entries)
        leases = await self.redis.mget([self.keys.lease(n) for n in names]) if names else []
        version = await self.redis.get(self.keys.version)
        live: dict[str, NodeInfo] = {}
        if self.node_id in names and leases[names.index(self.node_id)] is None:
            # this node's own lease is gone too (its heartbeat has not re-asserted it yet):
            # whatever took it took the others', who get a lease period to renew theirs
            self.grace_until = max(self.grace_until, self.clock() + self.lease)
        waiting = self.clock() < self.grace_until  # for the others to re-assert their leases
        for name, lease in zip(names, leases, strict=True):
            info = entries[name]
            renewed = lease is not None and _text(lease) == str(info.epoch)
            if renewed or (lease is None and waiting):
                live[name] = info
        dead = [n for n in names if n not in live]
        for name, lease in zip(names, leases, strict=True):
            if lease is None and name not in live and name != self.node_id:  # gone for good:
                await self._clean_after(entries[name])  # its routes go too
        for name in dead:  # their entries go, unless rewritten since (a node back under its id)
            await self._delete_field_if(self.keys.nodes, name, raw[name])
        self.directory = live
        self.directory_read_at = self.clock()
        current = int(version) if version is not None else 0
        if current != self._version:
            self._version = current
            self.forget()
        return live

    def live_nodes(self, *, accepting: bool = False) -> list[NodeInfo]:
        return [n for n in self.directory.values() if not (accepting and n.draining)]

    # -- lookups -----------------------------------------------------------------------------

    def forget(self, grant: str | None = None) -> None:
        """Drop cached answers: for one alias (a pattern drops them all), or all of them.

        A dropped answer naming nodes is no longer fresh but stays the last known one, which
        a lookup falls back on while Redis cannot answer (empty answers simply go)."""
        if grant is None or grant.startswith("*@"):
            self._cache = {a: (float("-inf"), n) for a, (_, n) in self._cache.items() if n}
        elif (hit := self._cache.pop(grant, None)) is not None and hit[1]:
            self._cache[grant] = (float("-inf"), hit[1])

    def cached(self, alias: str) -> tuple[NodeInfo, ...] | None:
        hit = self._cache.get(alias)
        if hit is None or hit[0] < self.clock():
            return None
        return hit[1]

    def last_known(self, alias: str) -> tuple[NodeInfo, ...] | None:
        """The last answer for ``alias``, however old (None: there is none)."""
        hit = self._cache.get(alias)
        return hit[1] if hit is not None else None

    async def nodes_for(self, alias: str) -> tuple[NodeInfo, ...]:
        """Other live, accepting nodes that registered ``alias`` (or its ``*@domain``)."""
        hit = self.cached(alias)
        if hit is not None:
            return hit
        grants = [alias]
        domain = domain_of(alias)
        if domain is not None:
            grants.append(f"*@{domain}")
        try:
            found: list[NodeInfo] = []
            async with asyncio.timeout(LOOKUP_TIMEOUT):
                for grant in grants:
                    entries = await self.redis.hgetall(self.keys.route(grant))
                    found += await self._valid(grant, entries)
        except (RedisError, TimeoutError) as exc:
            slow = f"no answer to a route lookup within {LOOKUP_TIMEOUT:g} s"
            self.on_error(exc if isinstance(exc, RedisError) else RedisTimeoutError(slow))
            return self.last_known(alias) or ()
        answer = tuple({n.id: n for n in found}.values())
        cache = self._cache
        cache.pop(alias, None)  # to the end: the order is the order of asking
        if len(cache) >= LOOKUP_CACHE_MAX:
            del cache[next(iter(cache))]
        cache[alias] = (self.clock() + LOOKUP_TTL, answer)
        return answer

    async def _valid(self, grant: str, entries: dict[Any, Any]) -> list[NodeInfo]:
        fresh = self.clock() - self.directory_read_at < DIRECTORY_FRESH
        result: list[NodeInfo] = []
        for raw_node, raw_epoch in entries.items():
            node, epoch = _text(raw_node), _text(raw_epoch)
            info = self.directory.get(node)
            if info is not None and str(info.epoch) == epoch:
                if node != self.node_id and not info.draining:
                    result.append(info)
            elif fresh and (info is None or str(info.epoch) != epoch):
                await self._delete_stale(grant, node, epoch)
        return result

    async def _clean_after(self, dead: NodeInfo) -> None:
        """Delete the routes a node without a lease left (those of its epoch only: were it to
        come back, it would register under a new one), and take them out of its route list:
        only those read, since the node back under its id may have listed routes since, and
        not one it registered again meanwhile (its route names the node still)."""
        routes = self.keys.routes_of(dead.id)
        grants = await self.redis.smembers(routes)
        for grant in grants:
            await self._delete_stale(_text(grant), dead.id, str(dead.epoch))
        if grants:
            await self.redis.srem(routes, *grants)
        for grant in grants:  # listed again meanwhile by the node back under its id: it stays
            if await self.redis.hget(self.keys.route(_text(grant)), dead.id) is not None:
                await self.redis.sadd(routes, grant)

    async def _delete_stale(self, grant: str, node: str, epoch: str) -> None:
        if node == self.node_id and epoch == str(self.epoch):
            return
        # a node missing from this node's directory read may have re-asserted its lease since
        # (after a Redis restart or failover): its entry stays while its lease names the epoch
        lease = await self.redis.get(self.keys.lease(node))
        if lease is not None and _text(lease) == epoch:
            return
        await self._delete_field_if(self.keys.route(grant), node, epoch)

    async def _delete_field_if(self, key: str, name: str, value: Any) -> None:
        if self._delete_if is None:
            self._delete_if = self.redis.register_script(_DELETE_IF)
        await self._delete_if(keys=[key], args=[name, value])

    async def other_sessions(self) -> dict[str, list[dict[str, Any]]]:
        """The session views other live nodes published: node id -> sessions
        (:class:`~csc.cluster.ClusterUnavailable` while Redis cannot be read)."""
        names = [n for n in sorted(self.directory) if n != self.node_id]
        if not names:
            return {}
        try:
            raws = await self.redis.mget([self.keys.sessions(n) for n in names])
        except RedisError as exc:
            raise ClusterUnavailable(str(exc)) from None
        result: dict[str, list[dict[str, Any]]] = {}
        for name, raw in zip(names, raws, strict=True):
            if raw is None:
                continue
            try:
                views = json.loads(raw)
            except ValueError:
                continue
            if isinstance(views, list):
                result[name] = [v for v in views if isinstance(v, dict)]
        return result
