"""The Redis connection layer against real servers: a single server, a Sentinel set, a Cluster
(tests/support/redis.py): connect, the start-up check, and pub/sub that survives losses."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from csc.cluster.redisconn import (
    RedisClient,
    RedisUnavailable,
    connect_redis,
    server_versions,
    version_tuple,
)
from csc.cluster.subscriber import Subscriber
from tests.support.procs import async_wait_until, scaled
from tests.support.redis import RedisClusterSet, RedisSentinelSet, RedisTopology, free_port

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def client_name() -> str:
    return f"csctest-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def client(redis_topology: RedisTopology, client_name: str) -> AsyncIterator[RedisClient]:
    connection = await connect_redis(redis_topology.url, client_name=client_name)
    yield connection
    await connection.aclose()


class Inbox:
    """Collects messages and counts ``on_subscribed`` calls."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.subscribed_calls = 0

    async def on_message(self, channel: str, data: bytes) -> None:
        await self.messages.put((channel, data))

    def on_subscribed(self) -> None:
        self.subscribed_calls += 1

    async def expect(self, channel: str, data: bytes, timeout: float = 5.0) -> None:
        async with asyncio.timeout(scaled(timeout)):
            while True:
                if await self.messages.get() == (channel, data):
                    return


async def _publish_until_received(
    client: RedisClient, inbox: Inbox, channel: str, timeout: float = 5.0
) -> None:
    """Publish a new payload every 0.1 s until one arrives (messages sent while no subscriber
    listens are lost by design); fail after ``timeout`` seconds (scaled)."""
    async with asyncio.timeout(scaled(timeout)):
        for n in range(1_000_000):
            payload = f"after-{n}".encode()
            await client.publish(channel, payload)
            try:
                await inbox.expect(channel, payload, 0.1)
                return
            except TimeoutError:
                continue


def _total_clients(topology: RedisTopology) -> int:
    return sum(
        len(str(node.execute("CLIENT", "LIST")).splitlines()) for node in topology.live_nodes()
    )


async def test_connect_and_roundtrip(
    redis_topology: RedisTopology, client: RedisClient, redis_prefix: str
) -> None:
    key = "{" + redis_prefix + "}:value"
    await client.set(key, b"hello", ex=60)
    assert await client.get(key) == b"hello"
    versions = await server_versions(client)
    expected = 3 if redis_topology.kind == "cluster" else 1
    assert len(versions) == expected
    assert all(version_tuple(v) >= (7, 0) for v in versions.values())


async def test_connect_unix_socket(redis_single: RedisTopology, redis_prefix: str) -> None:
    client = await connect_redis(redis_single.unix_url)  # type: ignore[attr-defined]
    try:
        await client.set(redis_prefix + "sock", b"1", ex=60)
        assert await client.get(redis_prefix + "sock") == b"1"
    finally:
        await client.aclose()


@pytest.mark.parametrize("form", ["server", "unix", "sentinel", "cluster"])
async def test_unreachable_is_one_clear_line(form: str, tmp_path: object) -> None:
    port, other = free_port(), free_port()
    url, tried = {
        "server": (f"redis://:s3cret@127.0.0.1:{port}/0", f"127.0.0.1:{port}"),
        "unix": (f"unix://:s3cret@/nonexistent/{port}.sock", f"socket /nonexistent/{port}.sock"),
        "sentinel": (
            f"redis+sentinel://:s3cret@127.0.0.1:{port},127.0.0.1:{other}"
            "?sentinel_master_name=main&sentinel_password=s3cret",
            f"sentinels 127.0.0.1:{port}, 127.0.0.1:{other} for master 'main'",
        ),
        "cluster": (
            f"redis+cluster://:s3cret@127.0.0.1:{port},127.0.0.1:{other}",
            f"cluster nodes 127.0.0.1:{port}, 127.0.0.1:{other}",
        ),
    }[form]
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(RedisUnavailable) as caught:
        await connect_redis(url, timeout=1.0)
    message = str(caught.value)
    assert "\n" not in message
    assert "s3cret" not in message
    assert ":***@" in message
    assert tried in message, message
    assert loop.time() - began < scaled(10)


async def test_subscriber_resubscribes_after_client_kill(
    redis_topology: RedisTopology, client_name: str
) -> None:
    channel = f"csctest:{uuid.uuid4().hex}"
    inbox = Inbox()
    clients_before = _total_clients(redis_topology)
    tasks_before = asyncio.all_tasks()
    client = await connect_redis(redis_topology.url, client_name=client_name)
    sub = Subscriber(client, [channel], inbox.on_message, on_subscribed=inbox.on_subscribed)
    async with sub:
        async with asyncio.timeout(scaled(10)):
            await sub.wait_subscribed()
        assert inbox.subscribed_calls == 1
        await client.publish(channel, b"first")
        await inbox.expect(channel, b"first")
        assert redis_topology.client_count(client_name) >= 1

        killed = await asyncio.to_thread(redis_topology.kill_pubsub_clients)
        assert killed >= 1
        await async_wait_until(
            lambda: sub.subscriptions >= 2 and sub.subscribed, 10, message="resubscribed"
        )
        await client.publish(channel, b"second")
        await inbox.expect(channel, b"second")
        assert sub.reconnects >= 1
        assert sub.errors >= 1
        assert inbox.subscribed_calls == sub.subscriptions
        assert sub.messages >= 2

    assert asyncio.all_tasks() == tasks_before
    await client.aclose()
    await async_wait_until(
        lambda: redis_topology.client_count(client_name) == 0, 10, message="no client left"
    )
    await async_wait_until(
        lambda: _total_clients(redis_topology) == clients_before,
        10,
        message="the client count is back where it was",
    )


async def test_subscriber_callbacks_failing_are_counted(
    redis_single: RedisTopology, redis_prefix: str
) -> None:
    client = await connect_redis(redis_single.url)
    channel = redis_prefix + "chan"
    calls: list[bytes] = []

    def explode(channel: str, data: bytes) -> None:
        calls.append(data)
        raise RuntimeError("boom")

    try:
        async with Subscriber(client, [channel], explode) as sub:
            async with asyncio.timeout(scaled(10)):
                await sub.wait_subscribed()
            await client.publish(channel, b"a")
            await client.publish(channel, b"b")
            await async_wait_until(lambda: len(calls) == 2, 5, message="both delivered")
            assert sub.callback_errors == 2
            assert sub.subscriptions == 1 and sub.errors == 0
    finally:
        await client.aclose()


@pytest.mark.parametrize("kind", ["sentinel", "cluster"])
async def test_failover_keeps_commands_and_pubsub_working(
    kind: str, request: pytest.FixtureRequest, redis_prefix: str
) -> None:
    topology: RedisTopology = request.getfixturevalue(f"redis_{kind}")
    request.addfinalizer(topology.heal)
    client = await connect_redis(topology.url)
    channel = f"csctest:{uuid.uuid4().hex}"
    inbox = Inbox()
    key = "{" + redis_prefix + "}:k"
    tasks_before = asyncio.all_tasks()
    try:
        await client.set(key, b"before", ex=60)
        async with Subscriber(
            client, [channel], inbox.on_message, on_subscribed=inbox.on_subscribed
        ) as sub:
            async with asyncio.timeout(scaled(10)):
                await sub.wait_subscribed()
            await _publish_until_received(client, inbox, channel)

            where = sub.where
            if isinstance(topology, RedisSentinelSet):
                killed = await asyncio.to_thread(topology.failover)
                lost = True  # its connection was to the master
            else:
                assert isinstance(topology, RedisClusterSet)
                killed = await asyncio.to_thread(topology.kill_master, where)
                lost = killed.addr == where

            await _publish_until_received(client, inbox, channel)
            await client.set(key, b"after", ex=60)
            assert await client.get(key) == b"after"
            if lost:
                assert sub.subscriptions >= 2 and sub.reconnects >= 1
            assert inbox.subscribed_calls == sub.subscriptions
        assert asyncio.all_tasks() == tasks_before
    finally:
        await client.aclose()
