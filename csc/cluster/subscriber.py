"""Pub/sub that outlives its connection: :class:`Subscriber`.

redis-py's asyncio ``PubSub`` does not come back by itself when its connection is lost (server
restart, ``CLIENT KILL TYPE pubsub``, Sentinel failover, a cluster node killed); when its retry
policy does reconnect it, it resubscribes silently, so its owner cannot know that messages were
missed. A :class:`Subscriber` owns one connection of its own, made *without* command retries, and
runs one task that subscribes, delivers each message to ``on_message``, and on any loss closes
the connection, waits a backoff and subscribes again. After every (re)subscription it awaits
``on_subscribed`` so the owner can resync what it may have missed.

Where it subscribes: a plain or Sentinel-managed client's own address (for Sentinel, the master
the sentinels name at that moment); for a cluster, one node of ``client.get_nodes()``, the next
one after each failure. A plain ``PUBLISH`` in a Redis Cluster reaches every node, so one node
is enough. redis-py 8's asyncio ``RedisCluster.pubsub()`` exists, but it shares the node's pool
and starts topology-repair tasks that its ``aclose()`` does not cancel; a plain connection to one
node is simpler and leaves nothing behind.

A silent peer (a partition, a frozen server) is noticed by a ``PING`` sent after
``ping_interval`` seconds without traffic; no answer within ``ping_interval`` more ends the
connection.

Invariants: at most one connection and one task at a time; :meth:`Subscriber.aclose` cancels the
task and returns only once the connection is closed; a failing callback never ends the task (it
is counted and logged); counters only grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, Self

from redis.asyncio import ConnectionPool, Redis, RedisCluster
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.backoff import EqualJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from csc.cluster.redisconn import RedisClient

__all__ = ["MessageHandler", "SubscribedHandler", "Subscriber"]

log = logging.getLogger("csc.cluster.subscriber")

#: ``on_message(channel, data)``; may be a coroutine function.
MessageHandler = Callable[[str, bytes], Awaitable[None] | None]
#: ``on_subscribed()`` after each (re)subscription; may be a coroutine function.
SubscribedHandler = Callable[[], Awaitable[None] | None]

#: Delays before resubscribing: 0.1-0.2 s, doubling up to 1-2 s (equal jitter).
RESUBSCRIBE_BACKOFF = EqualJitterBackoff(cap=2.0, base=0.1)


class Subscriber:
    """Subscribes to ``channels`` through ``client`` and delivers each message to
    ``on_message(channel, data)``, resubscribing after every loss.

    Use as ``async with Subscriber(...) as sub:`` or ``await sub.start()`` ... ``await
    sub.aclose()``. Counters (plain ints, for metrics): ``subscriptions`` (successful
    subscriptions), ``reconnects`` (those after the first), ``errors`` (lost connections and
    failed attempts, including a raising ``on_subscribed``), ``callback_errors``
    (``on_message`` raised), ``messages`` (delivered).
    """

    def __init__(
        self,
        client: RedisClient,
        channels: Iterable[str],
        on_message: MessageHandler,
        *,
        on_subscribed: SubscribedHandler | None = None,
        timeout: float = 3.0,
        ping_interval: float = 5.0,
    ) -> None:
        self._client = client
        self._channels = tuple(dict.fromkeys(channels))
        if not self._channels:
            raise ValueError("a Subscriber needs at least one channel")
        self._on_message = on_message
        self._on_subscribed = on_subscribed
        self._timeout = timeout
        self._ping_interval = ping_interval
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._subscribed = asyncio.Event()
        self._node_index = 0
        self.subscriptions = 0
        self.reconnects = 0
        self.errors = 0
        self.callback_errors = 0
        self.messages = 0
        #: ``host:port`` or socket path of the current connection ("" while there is none).
        self.where = ""

    @property
    def channels(self) -> tuple[str, ...]:
        return self._channels

    @property
    def subscribed(self) -> bool:
        """Whether the subscription is confirmed on a live connection right now."""
        return self._subscribed.is_set()

    async def wait_subscribed(self) -> None:
        """Return once subscribed (now or after the next resubscription)."""
        await self._subscribed.wait()

    async def start(self) -> None:
        """Start the task (once); it subscribes in the background."""
        if self._closed:
            raise RuntimeError("this Subscriber was closed")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"redis-subscriber {','.join(self._channels)}"
            )

    async def aclose(self) -> None:
        """Stop the task and close the connection; idempotent."""
        self._closed = True
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        if task is asyncio.current_task():  # closed from inside a callback
            return
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- the task ------------------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0  # attempts failed since the last successful subscription
        while True:
            before = self.subscriptions
            try:
                await self._session()
            except (
                RedisError,
                RedisClusterException,
                OSError,
                TimeoutError,
                _CallbackFailed,
            ) as exc:
                self.errors += 1
                failures = 1 if self.subscriptions > before else failures + 1
                delay = RESUBSCRIBE_BACKOFF.compute(failures)
                log.warning(
                    "redis pub/sub on %s lost (%s); subscribing again in %.2fs",
                    self.where or "no connection",
                    " ".join(str(exc).split()) or type(exc).__name__,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _session(self) -> None:
        """One connection: subscribe, report, pump until it fails (always by raising)."""
        connection = await self._connection()
        pubsub = connection.pubsub()
        try:
            async with asyncio.timeout(self._timeout):
                await pubsub.subscribe(*self._channels)
                await self._confirmations(pubsub)
            self.subscriptions += 1
            if self.subscriptions > 1:
                self.reconnects += 1
            self._subscribed.set()
            if self._on_subscribed is not None:
                try:
                    await _maybe_await(self._on_subscribed())
                except Exception as exc:
                    log.exception("redis pub/sub: on_subscribed failed")
                    raise _CallbackFailed(f"on_subscribed raised {exc!r}") from exc
            await self._pump(pubsub)
        finally:
            self._subscribed.clear()
            await _close(pubsub, connection)

    async def _confirmations(self, pubsub: PubSub) -> None:
        pending = set(self._channels)
        while pending:
            message = await pubsub.get_message(timeout=self._timeout)
            if message is None:
                continue
            if message["type"] == "subscribe":
                pending.discard(_text(message["channel"]))
            else:
                await self._deliver(message)

    async def _pump(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        ping_sent: float | None = None
        while True:
            message = await pubsub.get_message(timeout=self._ping_interval)
            if message is not None:
                ping_sent = None
                await self._deliver(message)
                continue
            if ping_sent is None:
                await pubsub.ping()
                ping_sent = loop.time()
            elif loop.time() - ping_sent >= self._ping_interval:
                raise RedisConnectionError(f"no answer to PING within {self._ping_interval}s")

    async def _deliver(self, message: dict[str, Any]) -> None:
        if message["type"] not in ("message", "pmessage"):
            return
        self.messages += 1
        try:
            await _maybe_await(self._on_message(_text(message["channel"]), message["data"]))
        except Exception:
            self.callback_errors += 1
            log.exception("redis pub/sub: on_message failed for %s", _text(message["channel"]))

    async def _connection(self) -> Redis:
        """A client of its own for one pub/sub connection, with no command retries (a loss
        must reach :meth:`_run`, not be papered over by a silent resubscription)."""
        no_retry = Retry(NoBackoff(), 0)
        client = self._client
        if isinstance(client, RedisCluster):
            if not client.get_nodes():
                await client.initialize()
            nodes = client.get_nodes()
            node = nodes[self._node_index % len(nodes)]
            self._node_index += 1
            self.where = f"{node.host}:{node.port}"
            kwargs = {**node.connection_kwargs, "retry": no_retry}
            pool: ConnectionPool = ConnectionPool(connection_class=node.connection_class, **kwargs)
            return Redis.from_pool(pool)
        source = client.connection_pool
        kwargs = {k: v for k, v in source.connection_kwargs.items() if k != "connection_pool"}
        kwargs["retry"] = no_retry
        if isinstance(source, SentinelConnectionPool):
            pool = SentinelConnectionPool(  # type: ignore[no-untyped-call]
                source.service_name,
                source.sentinel_manager,
                connection_class=source.connection_class,
                **kwargs,
            )
            self.where = f"Sentinel master {source.service_name!r}"
        else:
            pool = ConnectionPool(connection_class=source.connection_class, **kwargs)
            self.where = str(kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}")
        return Redis.from_pool(pool)


class _CallbackFailed(Exception):
    """``on_subscribed`` raised: the subscription is started over."""


async def _close(pubsub: PubSub, connection: Redis) -> None:
    try:
        await pubsub.aclose()
    finally:
        await connection.aclose()


async def _maybe_await(result: Awaitable[None] | None) -> None:
    if inspect.isawaitable(result):
        await result


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
