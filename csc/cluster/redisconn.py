"""Connecting to Redis (provisional: a single server URL only)."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis


async def connect_redis(url: str, *, timeout: float = 3.0) -> Any:
    client = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    await client.ping()
    return client
