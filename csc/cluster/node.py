"""A CSC node's membership of the cluster: lease heartbeats, routes, events and peer links.

:class:`Cluster` is created by ``csc serve`` when ``redis_url`` is set and lives as long as the
node's app (a ``cleanup_ctx``). It owns

* the :class:`~csc.cluster.routes.RouteTable` (this node's lease and routes in Redis, the
  directory of live nodes, cached lookups of other nodes' routes);
* the peer listener (:class:`~csc.cluster.peer.PeerServer`), which relays streams other nodes
  forward to this node's agent sessions, and the :class:`~csc.cluster.peer.PeerPool` of links
  to the other nodes;
* the heartbeat task (every third of ``route_lease``: refresh the lease, re-read the directory,
  bring this node's routes in line with its live sessions, publish its sessions for the admin
  views) and the subscription to the cluster's event channel.

Events (JSON on ``P:events``, received through a
:class:`~csc.cluster.subscriber.Subscriber`, which subscribes again after any loss and then
triggers a full resync: directory, route cache and store): ``route`` (an alias's routes changed: drop the cached answer),
``nodes`` (the directory changed: re-read it), ``catalog`` (tenants, aliases or tokens changed
in the store: re-read them and end the sessions that lost their right to run) and
``disconnect`` (an operator ended a session by id, on whichever node holds it; the request is
also kept in Redis under ``P:nodes:disconnects:<node>`` until that node takes it on its next
heartbeat or subscription, so a node that missed the event still acts on it).

Invariants: this node's routes in Redis name exactly the grants for which it has a live
accepting session, as of its last heartbeat or session change (``sync_routes``); a Redis failure
never ends a tunnel or a session by itself: the node keeps serving on what it knows, counts the
error, and re-asserts its lease and routes when Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from redis.exceptions import RedisError

from csc.cluster import ClusterUnavailable, peertls
from csc.cluster.limits import ClusterRate, ClusterSlots
from csc.cluster.peer import PeerPool, PeerServer
from csc.cluster.peerstream import PeerStream
from csc.cluster.peertls import PeerTLS
from csc.cluster.routes import Keys, NodeInfo, RouteTable
from csc.cluster.subscriber import Subscriber
from shared.errors import CSCError, PortalOffline
from shared.linkstream import LinkStream
from shared.protocol import LinkSettings
from shared.units import parse_hostport

log = logging.getLogger("csc.cluster.node")

#: Streams one peer link may carry at once (each node's bootloader traffic to one other node).
PEER_MAX_STREAMS = 8192
#: How long a stopping node tries to withdraw itself from Redis before it lets the lease expire.
STOP_TIMEOUT = 5.0
#: An operator's request to end a session waits this long (seconds) for the node holding it.
DISCONNECT_TTL = 60
_ASK_DISCONNECT = """
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
"""
_TAKE_DISCONNECTS = """
local asked = redis.call('SMEMBERS', KEYS[1])
redis.call('DEL', KEYS[1])
return asked
"""


@dataclass(eq=False)
class ClusterHooks:
    """What the node does for the cluster (wired by csc/server.py)."""

    #: grants with at least one live, accepting session on this node
    local_grants: Callable[[], set[str]]
    #: open a stream on one of this node's sessions for a forwarded OPEN
    open_local: Callable[[dict[str, Any]], LinkStream]
    #: the admin views of this node's sessions
    session_views: Callable[[], list[dict[str, Any]]]
    #: the store changed somewhere: re-read it and end sessions that may no longer run
    catalog_changed: Callable[[], Awaitable[None]]
    #: an operator asked to end session ``id`` (True: it was here)
    disconnect: Callable[[str], bool]
    #: this node was paused past its lease: end every session it holds
    fenced: Callable[[], None]
    #: the count of live nodes that take agents changed: tell this node's sessions (how many
    #: were told)
    cluster_size: Callable[[int], int]
    stream_started: Callable[[], None]
    stream_finished: Callable[[], None]
    #: a slot of this node (tenant, kind, member) went to another node's session by a
    #: hand-over (csc/relay/handover.py)
    slot_gone: Callable[[str, str, str], None] = lambda tenant, kind, member: None


@dataclass(eq=False)
class ClusterStats:
    """Plain counters the metrics read at scrape time."""

    redis_errors: int = 0
    lookups: dict[str, int] = field(default_factory=lambda: {"local": 0, "remote": 0, "miss": 0})
    fenced: int = 0


@dataclass(eq=False)
class Cluster:
    node_id: str
    redis: Any
    keys: Keys
    key: bytes
    lease: float
    settings: LinkSettings
    hooks: ClusterHooks
    #: TLS of the peer links (csc/cluster/peertls.py); None: plain TCP (``peer_tls=false``)
    tls: PeerTLS | None = None
    stats: ClusterStats = field(default_factory=ClusterStats)
    routes: RouteTable = field(init=False)
    rate: ClusterRate = field(init=False)
    slots: ClusterSlots = field(init=False)
    peers: PeerPool = field(init=False)
    server: PeerServer = field(init=False)
    registered: set[str] = field(default_factory=set)
    healthy: bool = True
    draining: bool = False
    #: the peer address other nodes dial (known once started)
    advertised: str = ""
    subscriber: Subscriber | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stopping: bool = False
    _sync_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _sync_wanted: asyncio.Event = field(default_factory=asyncio.Event)
    _last_beat: float = 0.0
    #: the count of nodes that take agents this node's sessions were told last
    _told: int = 1
    _ask_disconnect: Any = field(init=False)
    _take_disconnect: Any = field(init=False)

    def __post_init__(self) -> None:
        self.routes = RouteTable(self.redis, self.keys, self.node_id, self.lease, self._redis_error)
        self.rate = ClusterRate(self.redis, self.keys.prefix)
        self.slots = ClusterSlots(self.redis, self.keys.prefix, self.lease)
        self._ask_disconnect = self.redis.register_script(_ASK_DISCONNECT)
        self._take_disconnect = self.redis.register_script(_TAKE_DISCONNECTS)
        peer_settings = replace(self.settings, max_streams=PEER_MAX_STREAMS)
        tls = self.tls
        self.peers = PeerPool(
            self.node_id, self.key, peer_settings, tls=None if tls is None else tls.client
        )
        self.server = PeerServer(
            self.node_id,
            self.key,
            peer_settings,
            self.hooks.open_local,
            self.hooks.stream_started,
            self.hooks.stream_finished,
            tls=None if tls is None else tls.server,
        )

    # -- life cycle --------------------------------------------------------------------------

    async def start(self, peer_listen: str, peer_advertise: str | None) -> str:
        """Listen for peers, join the directory, start the heartbeat and the subscription;
        returns the advertised peer address."""
        host, port = parse_hostport(peer_listen)
        if peer_advertise is None and host in ("0.0.0.0", "::", ""):
            raise ValueError(
                f"peer_listen {peer_listen} is a wildcard address: set peer_advertise to the "
                "address other nodes can dial"
            )
        _, bound_port = await self.server.start(host, port)
        advertise = peer_advertise or _hostport(host, bound_port)
        self.advertised = advertise
        await self.routes.join(advertise)
        await self.routes.read_directory()
        self._told = self.accepting_nodes
        await self.publish({"t": "nodes"})
        self._last_beat = time.monotonic()
        loop = asyncio.get_running_loop()
        self.subscriber = Subscriber(
            self.redis,
            [self.keys.events],
            lambda _channel, data: self._on_event(data),
            on_subscribed=self._resync,
        )
        await self.subscriber.start()
        self._tasks = [
            loop.create_task(self._heartbeat_forever(), name="cluster-heartbeat"),
            loop.create_task(self._sync_forever(), name="cluster-routes"),
        ]
        log.info(
            "node %s joined the cluster (epoch %d, peer %s, %d live nodes)",
            self.node_id,
            self.routes.epoch,
            advertise,
            len(self.routes.directory),
        )
        return advertise

    async def drain(self) -> None:
        """Tell the others this node takes no new work: directory flag and routes withdrawn."""
        self.draining = True
        with contextlib.suppress(RedisError):
            await self.routes.set_draining()
            await self.routes.unregister(self.registered)
            self.registered.clear()
            await self.publish({"t": "nodes"})

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            await _end_task(task)
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                if self.subscriber is not None:
                    await self.subscriber.aclose()
                await self.routes.leave(self.registered | self.hooks.local_grants())
                await self.publish({"t": "nodes"})
        except (RedisError, TimeoutError) as exc:
            log.warning("could not withdraw this node from Redis (%r); its lease expires", exc)
        await self.server.stop()
        await self.peers.aclose()

    # -- what the metrics read (csc.metrics.ClusterView) ---------------------------------------

    @property
    def redis_errors(self) -> int:
        sub = self.subscriber
        return self.stats.redis_errors + (sub.errors if sub is not None else 0)

    @property
    def redis_reconnects(self) -> int:
        return self.subscriber.reconnects if self.subscriber is not None else 0

    @property
    def lookups(self) -> dict[str, int]:
        return self.stats.lookups

    @property
    def live_nodes(self) -> int:
        return len(self.routes.directory)

    @property
    def peer_links(self) -> int:
        return self.peers.up

    @property
    def peer_streams(self) -> int:
        return self.server.relaying

    # -- routes ------------------------------------------------------------------------------

    def routes_changed(self) -> None:
        """A session came or went: bring the routes in Redis in line soon (never waits, so a
        slow or failing Redis cannot hold up a session; the heartbeat re-asserts what fails)."""
        self._sync_wanted.set()

    async def _sync_forever(self) -> None:
        while not self._stopping:
            await self._sync_wanted.wait()
            self._sync_wanted.clear()
            try:
                await self.sync_routes()
            except RedisError as exc:
                self._redis_error(exc)

    async def sync_routes(self, *, reassert: bool = False) -> None:
        """Make this node's routes in Redis match its live sessions (all again if
        ``reassert``); raises RedisError (the caller decides what that means)."""
        async with self._sync_lock:
            desired = set() if self.draining else self.hooks.local_grants()
            changed = desired ^ self.registered
            removed = self.registered - desired
            added = desired if reassert else desired - self.registered
            if added:
                await self.routes.register(added)
            if removed:
                await self.routes.unregister(removed)
            self.registered = desired
            for grant in sorted(changed):
                await self.publish({"t": "route", "alias": grant})

    async def nodes_for(self, alias: str) -> list[NodeInfo]:
        """Other nodes that can serve ``alias`` now, those recently unreachable left out.
        While Redis is known to be away, the last known answer if there is one, without
        waiting for Redis."""
        known = None if self.healthy else self.routes.last_known(alias)
        found = known if known is not None else await self.routes.nodes_for(alias)
        nodes = [n for n in found if not self.peers.suspect(n.id, n.epoch)]
        random.shuffle(nodes)
        return nodes

    async def open_remote(self, alias: str, tenant: str, info: dict[str, Any]) -> PeerStream:
        """Forward a stream to another node that serves ``alias``; the refusal of the last
        one tried (or PortalOffline) when none admits it."""
        last: CSCError | None = None
        forwarded = {**info, "tenant": tenant}
        for node in await self.nodes_for(alias):
            try:
                return await self.peers.open(node.id, node.peer, node.epoch, forwarded)
            except CSCError as err:
                last = err
                log.info("node %s did not take a stream for %s: %s", node.id, alias, err.code)
        if last is not None and not isinstance(last, PortalOffline):
            raise last
        raise PortalOffline(f"no node serves {alias}")

    async def take_token(self, tenant: str, rate: float) -> float | None:
        """The cluster-wide bucket of ``tenant``: 0.0 (taken), the seconds to wait, or None
        when Redis cannot answer (the caller then uses its share of the rate locally)."""
        try:
            return await self.rate.take(tenant, rate)
        except RedisError as exc:
            self._redis_error(exc)
            return None

    async def acquire_slot(self, tenant: str, kind: str, member: str, cap: int) -> bool | None:
        """A cluster-wide slot of ``kind`` (``sessions``, ``streams``) for ``tenant``: True
        (taken), False (``cap`` are held), None (Redis cannot answer: the caller counts
        locally)."""
        try:
            return await self.slots.acquire(tenant, kind, member, cap)
        except RedisError as exc:
            self._redis_error(exc)
            return None

    async def yielding_slot(self, tenant: str, kind: str, member: str) -> None:
        """Let ``member``'s place go to a new session of the tenant (csc/relay/handover.py;
        if Redis cannot be told, no hand-over: the agent closes the old session first)."""
        await self._best_effort(self.slots.yielding(tenant, kind, member))

    async def take_over_slot(
        self, tenant: str, kind: str, member: str, cap: int, grace: float, named: str | None
    ) -> str | None:
        """With ``cap`` slots of ``tenant`` held: for ``member``, the place of ``named`` or of
        a yielding member (see ClusterSlots.take_over); the member that gave it, or None."""
        try:
            return await self.slots.take_over(tenant, kind, member, cap, grace, named)
        except RedisError as exc:
            self._redis_error(exc)
            return None

    async def given_ended(self, tenant: str, kind: str, member: str) -> None:
        """The session that gave slot ``member`` to a successor ended (ClusterSlots.given_ended;
        else its record expires by itself)."""
        await self._best_effort(self.slots.given_ended(tenant, kind, member))

    async def release_slot(self, tenant: str, kind: str, member: str) -> None:
        """Give a slot back (else it expires with the next missed refresh)."""
        await self._best_effort(self.slots.release(tenant, kind, member))

    async def _best_effort(self, write: Awaitable[None]) -> None:
        """A write to Redis that may fail (counted): within STOP_TIMEOUT, or not at all."""
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await write
        except (RedisError, TimeoutError) as exc:
            if isinstance(exc, RedisError):
                self._redis_error(exc)

    @property
    def accepting_nodes(self) -> int:
        """Live nodes that take agents (this one included while it is not draining)."""
        return max(1, len(self.routes.live_nodes(accepting=True)))

    def _tell_size(self) -> None:
        """After a directory read: when the count of nodes that take agents changed, tell
        this node's sessions (CLUSTER), so that their agents spread over a cluster that grew
        and stop looking for nodes that left. A draining node tells nothing: its sessions
        are on their way to other nodes."""
        count = self.accepting_nodes
        if count == self._told or self.draining:
            return
        before, self._told = self._told, count
        told = self.hooks.cluster_size(count)
        log.info("%d live nodes take agents now (%d before); told %d sessions", count, before, told)

    # -- events ------------------------------------------------------------------------------

    async def request_disconnect(self, node: str, session_id: str) -> None:
        """Ask ``node`` to end its session ``session_id``: the request is kept in Redis until
        that node takes it (its next heartbeat, or its next subscription), and an event asks
        at once. A node whose subscription was down when the event went out still ends the
        session. :class:`ClusterUnavailable` when Redis cannot take the request."""
        try:
            await self._ask_disconnect(
                keys=[self.keys.disconnects(node)], args=[session_id, DISCONNECT_TTL]
            )
        except RedisError as exc:
            self._redis_error(exc)
            raise ClusterUnavailable(f"cannot pass the request on: {exc}") from None
        await self.publish({"t": "disconnect", "session": session_id})

    async def _take_disconnects(self) -> None:
        """End the sessions operators asked this node to end (see :meth:`request_disconnect`);
        raises RedisError."""
        for raw in await self._take_disconnect(keys=[self.keys.disconnects(self.node_id)]):
            self.hooks.disconnect(raw.decode() if isinstance(raw, bytes) else str(raw))

    async def publish(self, event: dict[str, Any]) -> None:
        try:
            await self.redis.publish(self.keys.events, json.dumps(event))
        except RedisError as exc:
            self._redis_error(exc)

    async def _on_event(self, raw: bytes) -> None:
        try:
            event = json.loads(raw)
            kind = event["t"]
        except (ValueError, KeyError, TypeError):
            return
        if kind == "route":
            self.routes.forget(str(event.get("alias", "")) or None)
        elif kind == "nodes":
            with contextlib.suppress(RedisError):
                await self.routes.read_directory()
                self._tell_size()
                await self.peers.retain(set(self.routes.directory))
        elif kind == "catalog":
            await self.hooks.catalog_changed()
        elif kind == "disconnect":
            self.hooks.disconnect(str(event.get("session", "")))

    async def _resync(self) -> None:
        self.routes.forget()
        with contextlib.suppress(RedisError):
            await self.routes.read_directory()
            self._tell_size()
            await self._take_disconnects()  # asked while this node heard no events
        await self.hooks.catalog_changed()

    # -- heartbeat ---------------------------------------------------------------------------

    async def _heartbeat_forever(self) -> None:
        period = self.lease / 3
        while not self._stopping:
            await asyncio.sleep(period * random.uniform(0.9, 1.1))
            if self.tls is not None:
                peertls.reload(self.tls)  # renewed peer_tls_* files (three small reads)
            await self.beat()

    async def beat(self) -> None:
        """One heartbeat: lease, directory, routes, session views.

        The gap that reveals a pause counts from the end of the previous heartbeat: one that
        spent seconds waiting for Redis (an outage, a failover) is no pause, and a node that
        kept running re-asserts its lease and routes under its epoch, sessions untouched."""
        now = time.monotonic()
        gap, self._last_beat = now - self._last_beat, now
        try:
            status = await self.routes.heartbeat()
            if status != "ok" and (gap > self.lease or status == "taken"):
                await self._fence(gap, status)
            reassert = status != "ok" or not self.healthy
            if reassert:  # whatever took this node's lease took the others' too: give them
                self.routes.grace_until = self.routes.clock() + self.lease  # a lease to renew
            await self.routes.read_directory()
            self._tell_size()
            await self.peers.retain(set(self.routes.directory))
            await self.sync_routes(reassert=reassert)
            for tenant, kind, member in await self.slots.refresh():
                self.hooks.slot_gone(tenant, kind, member)
            if reassert:  # back after a flush or an outage: the others re-read the directory
                await self.publish({"t": "nodes"})
            await self.routes.publish_sessions(self.hooks.session_views())
            await self._take_disconnects()
        except RedisError as exc:
            self._redis_error(exc)
            return
        finally:
            self._last_beat = time.monotonic()
        if not self.healthy:
            log.info("Redis answers again; lease and routes re-asserted")
        self.healthy = True

    async def _fence(self, gap: float, status: str) -> None:
        """This node's epoch is void (it was paused past its lease, or its id was taken):
        take a new one and end the sessions it held; their agents reconnect."""
        self.stats.fenced += 1
        old = self.routes.epoch
        await self.routes.join(self.routes.me.peer)
        self.registered.clear()
        if status == "taken":
            log.error(
                "another node runs with node_id %s: every node needs its own (node_id)",
                self.node_id,
            )
        log.warning(
            "node %s lost its lease (%s after %.1f s without a heartbeat): epoch %d is void, "
            "now %d; ending its agent sessions",
            self.node_id,
            status,
            gap,
            old,
            self.routes.epoch,
        )
        self.hooks.fenced()
        await self.publish({"t": "nodes"})

    def _redis_error(self, exc: Exception) -> None:
        self.stats.redis_errors += 1
        self.routes.grace_until = float("inf")  # until a heartbeat gets through (beat())
        if self.healthy:
            log.warning("Redis error: %s; serving on what this node knows", exc)
        self.healthy = False


async def _end_task(task: asyncio.Task[None], patience: float = 2.0) -> None:
    """Cancel ``task`` and wait for it, at most ``patience`` seconds: a task inside a library
    call that swallows a cancellation (and retries) must not hold up the node's stop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while not task.done() and loop.time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=0.2)
    if not task.done():
        log.warning("task %s did not end when cancelled; leaving it", task.get_name())
    elif not task.cancelled() and task.exception() is not None:
        log.warning("task %s failed: %r", task.get_name(), task.exception())


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
