"""The agent honours ``Retry-After`` when the CSC refuses its upgrade with 429 or 503: a real
agent dials a real HTTP server on loopback that refuses it, and the next dial comes no sooner
than the refusal asked (bounded by ``retry_after_max``), with the wait in the log."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from shared.config import Secret
from tenant_agent.agent import Agent
from tenant_agent.config import AgentConfig
from tests.support.procs import async_wait_until, scaled


@contextlib.asynccontextmanager
async def _refusing_csc(status: int, retry_after: str) -> AsyncIterator[tuple[str, list[float]]]:
    """A CSC stand-in that refuses every agent upgrade; yields its URL and the dial times."""
    dials: list[float] = []

    async def refuse(request: web.Request) -> web.Response:
        dials.append(asyncio.get_running_loop().time())
        return web.json_response(
            {"error": "tenant_limit", "message": "try again later"},
            status=status,
            headers={"Retry-After": retry_after},
        )

    app = web.Application()
    app.router.add_get("/v1/agent/connect", refuse)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", dials
    finally:
        await runner.cleanup()


def _config(csc: str, **over: Any) -> AgentConfig:
    return AgentConfig(
        csc=csc,
        token=Secret("token"),
        upstream="http://127.0.0.1:9",  # never dialled: no session comes up
        sessions=1,
        backoff_initial=0.05,
        backoff_max=0.1,
        **over,
    )


@contextlib.asynccontextmanager
async def _running(agent: Agent) -> AsyncIterator[None]:
    task = asyncio.create_task(agent.run())
    try:
        yield
    finally:
        agent.stop()
        await asyncio.wait_for(task, scaled(10.0))


@pytest.mark.parametrize("status", [429, 503])
async def test_the_next_dial_waits_for_retry_after(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="csc_agent")
    async with _refusing_csc(status, "1") as (url, dials), _running(Agent(_config(url))):
        await async_wait_until(lambda: len(dials) >= 2, 15.0, message="a second dial")
    # without Retry-After the backoff alone would redial within 0.1 s
    assert dials[1] - dials[0] >= 1.0
    assert any("Retry-After: 1 s" in r.getMessage() for r in caplog.records)


async def test_retry_after_is_bounded_by_retry_after_max(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="csc_agent")
    refusing = _refusing_csc(429, "86400")
    async with refusing as (url, dials), _running(Agent(_config(url, retry_after_max=0.2))):
        await async_wait_until(lambda: len(dials) >= 2, 15.0, message="a second dial")
    assert dials[1] - dials[0] >= 0.2
    [line] = [r.getMessage() for r in caplog.records if "Retry-After" in r.getMessage()][:1]
    assert "Retry-After: 86400 s, at most 0.2" in line
    retrying = float(line.rsplit("retrying in ", 1)[1].split()[0])
    assert 0.2 <= retrying <= 0.25
