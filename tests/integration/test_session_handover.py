"""A session's place handed to the session renewing it (csc/relay/handover.py), against a
tenant that would use it to hold more sessions than its limit: raw agents over real sockets on
one node (tests/support/attacks.py ``Yielder``: GOAWAY right after WELCOME, then it keeps its
link). The agent's own renewal through it is tested in test_agent_token_renewal.py, and across
a cluster in tests/cluster/test_cluster_limits.py."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.attacks import Yielder, raw_agents
from tests.support.inproc import ALIAS, Relay, limit_sessions, make_token, relay
from tests.support.procs import async_wait_until, scaled

GRACE = 4.0


async def _dial(
    r: Relay,
    *,
    go_away: bool = True,
    repeat: int = 1,
    replaces: str | None = None,
    token: str | None = None,
    alias: str = ALIAS,
) -> Yielder:
    """A raw agent of the tenant: welcomed, or refused (its ``refusal``)."""
    host, _, port = r.node.http_address.rpartition(":")
    agent = Yielder(
        host,
        int(port),
        token or r.token,
        alias,
        go_away=go_away,
        repeat=repeat,
        replaces=replaces,
    )
    agent.start()
    deadline = time.monotonic() + scaled(10)
    while not agent.welcomed.is_set() and agent.is_alive() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    if go_away and agent.welcomed.is_set():  # the node has read its GOAWAY
        await async_wait_until(
            lambda: (
                len(r.node.state.handovers._yielding.get("acme", {})) > 0 or not agent.is_alive()
            ),
            10,
            message="the GOAWAY seen",
        )
    return agent


async def test_a_tenant_at_its_limit_holds_one_session_more_only_for_the_grace(
    tmp_path: Path,
) -> None:
    """max_sessions = 1: the first session sends GOAWAY and a second one gets its place; the
    second sends GOAWAY at once too, but a third is refused 429 while the first still runs
    its grace (``drain_timeout``), after which the node closes it; then the third gets the
    second's place."""
    async with relay(tmp_path, start=False, csc={"drain_timeout": GRACE}) as r:
        limit_sessions(r, 1)
        with raw_agents() as agents:
            first = await _dial(r)
            agents.append(first)
            assert first.welcomed.is_set(), first.error
            second = await _dial(r)
            agents.append(second)
            assert second.welcomed.is_set(), second.error  # the first's place
            given_at = time.monotonic()
            third = await _dial(r)
            agents.append(third)
            assert third.refused_status() == 429, third.error
            assert first.closed_at is None  # still in its grace
            await async_wait_until(
                lambda: first.closed_at is not None, GRACE + 10, message="closed"
            )
            assert first.closed_at is not None and first.closed_at - given_at >= GRACE * 0.9
            assert second.closed_at is None
            fourth = await _dial(r)
            agents.append(fourth)
            assert fourth.welcomed.is_set(), fourth.error  # the second's place
            assert r.node.state.limits.sessions("acme") == 1
            async with aiohttp.ClientSession() as http, http.get(r.metrics_url) as resp:
                text = await resp.text()
            assert 'csc_session_handovers_total{tenant="acme"} 2.0' in text


async def test_a_session_that_did_not_go_away_gives_no_place(tmp_path: Path) -> None:
    """max_sessions = 1 and a session that serves on (no GOAWAY): a second dial is refused
    429, and the first is left alone."""
    async with relay(tmp_path, start=False, csc={"drain_timeout": GRACE}) as r:
        limit_sessions(r, 1)
        first = await _dial(r, go_away=False)
        try:
            assert first.welcomed.is_set(), first.error
            second = await _dial(r)
            assert second.refused_status() == 429, second.error
            await asyncio.sleep(scaled(GRACE) + 0.5)
            assert first.closed_at is None and first.is_alive()
            assert [s.accepting for s in r.node.state.sessions.values()] == [True]
        finally:
            first.stop.set()
            first.join(scaled(10))


async def test_a_flood_of_goaway_frames_is_acted_on_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An agent sending a thousand GOAWAY frames in one message: the node logs its draining
    once and records it once (before: one log line, and with the hand-over one Redis call in a
    cluster, per frame), and the session carries on."""
    caplog.set_level(logging.INFO, logger="csc.relay.gateway")
    async with relay(tmp_path, start=False) as r:
        agent = await _dial(r, repeat=1000)
        try:
            assert agent.welcomed.is_set(), agent.error
            await asyncio.sleep(scaled(1))
            draining = [m for m in caplog.messages if "is draining" in m]
            assert len(draining) == 1, len(draining)
            assert r.node.state.handovers.waiting("acme") == 1
            assert agent.closed_at is None and len(r.node.state.sessions) == 1
        finally:
            agent.stop.set()
            agent.join(scaled(10))


async def test_a_dial_takes_the_place_of_the_session_it_names(tmp_path: Path) -> None:
    """max_sessions = 1 and a session that serves on: a dial naming it (``CSC-Replaces``,
    what the agent's renewal sends) takes its place at once, without its GOAWAY, and both
    serve until the node closes the old one at the grace; a dial naming another tenant's
    session takes nothing (429)."""
    async with relay(tmp_path, start=False, csc={"drain_timeout": GRACE}) as r:
        limit_sessions(r, 1)
        other = make_token(r.state_dir, "globex", ["globex@example.com"])
        with raw_agents() as agents:
            theirs = await _dial(r, go_away=False, token=other, alias="globex@example.com")
            agents.append(theirs)
            first = await _dial(r, go_away=False)
            agents.append(first)
            assert first.welcomed.is_set() and theirs.welcomed.is_set(), first.error
            ids = {s.tenant: s.id for s in r.node.state.sessions.values()}
            stranger = await _dial(r, go_away=False, replaces=ids["globex"])
            agents.append(stranger)
            assert stranger.refused_status() == 429, stranger.error
            second = await _dial(r, go_away=False, replaces=ids["acme"])
            agents.append(second)
            assert second.welcomed.is_set(), second.error
            given_at = time.monotonic()
            acme = [s for s in r.node.state.sessions.values() if s.tenant == "acme"]
            assert len(acme) == 2 and all(s.accepting for s in acme)  # no moment without one
            await async_wait_until(
                lambda: first.closed_at is not None, GRACE + 10, message="closed"
            )
            assert first.closed_at is not None and first.closed_at - given_at >= GRACE * 0.9
            assert second.closed_at is None and theirs.closed_at is None
