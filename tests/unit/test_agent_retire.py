"""A draining session whose WebSocket the CSC closes first ends quietly: ``Agent._retire`` runs
as a background task nobody awaits, so an error escaping it was logged by asyncio as "Task
exception was never retrieved", with a traceback (seen when the CSC and the agent stopped
together: the agent flushed a link whose WebSocket was already closing)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from shared.config import Secret
from shared.errors import AgentLost
from tenant_agent.agent import Agent, CSCSession
from tenant_agent.config import AgentConfig


class _Link:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def wait_idle(self, timeout: float) -> None:
        return None

    async def flush(self) -> None:
        raise self.error


class _WebSocket:
    closed_with: tuple[int, str] | None = None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed_with = (code, reason)


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError("the WebSocket to the CSC is closing"),
        AgentLost("the link ended"),
    ],
)
async def test_a_session_the_csc_closed_first_retires_quietly(error: BaseException) -> None:
    config = AgentConfig(csc="http://127.0.0.1:9", token=Secret("t"), upstream="http://127.0.0.1:9")
    agent = Agent(config)
    ws = _WebSocket()
    session = CSCSession(0, cast(Any, ws), cast(Any, _Link(error)), {"session_id": "s"})
    agent.sessions.add(session)
    run = asyncio.create_task(asyncio.sleep(3600))
    await agent._retire(session, run)  # raised `error` before
    assert run.cancelled()
    assert session not in agent.sessions
    assert agent._retiring[0] == 0
