"""A new agent token put in ``token_file`` is taken up without a restart and without a gap
(tenant_agent/token.py, tenant_agent/agent.py), over real sockets: the sessions are replaced
make-before-break, so revoking the old token afterwards cuts nothing; a token the CSC refuses
leaves the agent on the old one; a renewal written only after the old token was revoked is
dialled with instead of stopping the agent."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import jwt

from csc.store import Store
from csc.tenants import Actor
from tests.support.inproc import (
    ALIAS,
    Relay,
    limit_sessions,
    make_token,
    relay,
    start_agent,
    wait_online,
)
from tests.support.procs import async_wait_until, scaled


def _jti(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["jti"])


def _jtis(r: Relay) -> list[str]:
    return sorted(s.jti for s in r.node.state.sessions.values())


def _write(path: Path, text: str) -> None:
    fresh = path.with_suffix(".new")
    fresh.write_text(text + "\n")
    os.replace(fresh, path)


def _revoke(r: Relay, token: str) -> None:
    store = Store(r.state_dir)
    try:
        store.revoke_token(_jti(token), Actor("test", "local"))
    finally:
        store.close()


async def _start(r: Relay, token_file: Path) -> None:
    _write(token_file, r.token)
    await start_agent(r, token_file=token_file, sessions=2)
    await wait_online(r.csc_url)
    await async_wait_until(lambda: len(r.node.state.sessions) == 2, 10, message="2 sessions")


class _Load:
    """Requests one after another through the tunnel, counting those that failed."""

    def __init__(self, http: aiohttp.ClientSession, r: Relay) -> None:
        self.ok = self.failed = 0
        self.failed_at: list[float] = []  # loop time of each failure
        self._task = asyncio.create_task(self._run(http, r.tunnel("/small")))

    async def _run(self, http: aiohttp.ClientSession, url: str) -> None:
        while True:
            try:
                async with http.get(url) as resp:
                    await resp.read()
                    if resp.status == 200:
                        self.ok += 1
                    else:
                        self._fail()
            except aiohttp.ClientError:
                self._fail()
            await asyncio.sleep(0.005)

    def _fail(self) -> None:
        self.failed += 1
        self.failed_at.append(asyncio.get_running_loop().time())

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def _renew_under_load(r: Relay, http: aiohttp.ClientSession, token_file: Path) -> str:
    """Put a new token in ``token_file`` while requests flow: both sessions take it up, the old
    one is revoked, nothing is cut and no request fails. The new token."""
    assert r.agent is not None
    old = r.token
    new = make_token(r.state_dir, "acme", [ALIAS])
    load = _Load(http, r)
    try:
        await async_wait_until(lambda: load.ok > 5, 10, message="requests flowing")
        _write(token_file, new)
        r.agent.check_token()  # what SIGHUP and the periodic look do
        await async_wait_until(
            lambda: _jtis(r) == [_jti(new)] * 2, 30, message="both sessions renewed"
        )
        _revoke(r, old)
        before = load.ok
        await asyncio.sleep(scaled(3))  # past a registry_refresh: the revocation applied
        assert load.ok > before
        assert _jtis(r) == [_jti(new)] * 2
    finally:
        await load.stop()
    assert load.failed == 0, (load.ok, load.failed)
    assert r.agent.fatal is None and r.agent_task is not None and not r.agent_task.done()
    return new


async def test_a_new_token_renews_every_session_without_a_gap(tmp_path: Path) -> None:
    token_file = tmp_path / "agent-token"
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        await _start(r, token_file)
        new = await _renew_under_load(r, http, token_file)
        assert r.agent is not None
        assert r.agent.token.current.reveal() == new and r.agent.token.candidate is None
        assert r.agent.metrics.reconnects.get("token_renewed") == 2


async def test_a_refused_new_token_leaves_the_agent_on_the_old_one(tmp_path: Path) -> None:
    token_file = tmp_path / "agent-token"
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        await _start(r, token_file)
        assert r.agent is not None
        before = _jtis(r)
        bad = make_token(tmp_path / "other-csc", "acme", [ALIAS])  # another signing key
        _write(token_file, bad)
        r.agent.check_token()
        await async_wait_until(
            lambda: r.agent is not None and r.agent.token.candidate is None, 10, message="dropped"
        )
        await asyncio.sleep(scaled(0.5))
        assert r.agent.fatal is None and r.agent.token.current.reveal() == r.token
        assert _jtis(r) == before
        async with http.get(r.tunnel("/small")) as resp:
            assert resp.status == 200
        # a good one written afterwards is taken up
        good = make_token(r.state_dir, "acme", [ALIAS])
        _write(token_file, good)
        r.agent.check_token()
        await async_wait_until(lambda: _jtis(r) == [_jti(good)] * 2, 20, message="renewed")


async def test_a_token_renewed_after_the_revocation_is_dialled_instead_of_stopping(
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "agent-token"
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        await _start(r, token_file)
        assert r.agent is not None
        new = make_token(r.state_dir, "acme", [ALIAS])
        _write(token_file, new)  # not looked at yet: the revocation comes first
        _revoke(r, r.token)
        await async_wait_until(lambda: _jtis(r) == [_jti(new)] * 2, 20, message="back up")
        assert r.agent.fatal is None and r.agent_task is not None and not r.agent_task.done()
        async with http.get(r.tunnel("/small")) as resp:
            assert resp.status == 200


async def test_without_a_new_token_a_revocation_still_stops_the_agent(tmp_path: Path) -> None:
    token_file = tmp_path / "agent-token"
    async with relay(tmp_path, start=False) as r:
        await _start(r, token_file)
        assert r.agent is not None and r.agent_task is not None
        agent, task = r.agent, r.agent_task
        _revoke(r, r.token)
        assert await asyncio.wait_for(task, scaled(15)) == 3
        assert agent.fatal is not None and "token revoked" in agent.fatal
        r.agent = r.agent_task = None


async def test_at_the_session_limit_each_session_is_renewed_in_its_place(
    tmp_path: Path,
) -> None:
    """max_sessions = 2 and two sessions: no room for a new session beside an old one (429
    tenant_limit). Each slot in turn closes its old session (the other one carries the
    requests meanwhile) and dials the new token in its place, so the renewal still happens
    without a failed request, instead of waiting for the old token's expiry to cut both."""
    token_file = tmp_path / "agent-token"
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        limit_sessions(r, 2)
        await _start(r, token_file)
        await _renew_under_load(r, http, token_file)


async def test_a_single_session_at_the_session_limit_hands_its_place_to_the_new_one(
    tmp_path: Path,
) -> None:
    """max_sessions = 1, one session with a request in flight: the renewal's dial names the
    old session and gets its place at once (csc/relay/handover.py); the old one serves until
    the new one is up, then drains, and the request in flight finishes on it. Before the
    hand-over the old session was closed first, after its slow request, and requests failed
    503 for all that time; now none does."""
    token_file = tmp_path / "agent-token"
    async with relay(tmp_path, start=False) as r, aiohttp.ClientSession() as http:
        limit_sessions(r, 1)
        _write(token_file, r.token)
        await start_agent(r, token_file=token_file, sessions=1)
        await wait_online(r.csc_url)
        assert r.agent is not None
        old, new = r.token, make_token(r.state_dir, "acme", [ALIAS])
        delay = scaled(6)
        slow = asyncio.create_task(http.get(r.tunnel(f"/slow-head?delay={delay}")))
        await async_wait_until(
            lambda: any(s.load for s in r.node.state.sessions.values()), 10, message="in flight"
        )
        load = _Load(http, r)
        try:
            await async_wait_until(lambda: load.ok > 5, 10, message="requests flowing")
            _write(token_file, new)
            r.agent.check_token()
            await async_wait_until(
                lambda: _jti(new) in _jtis(r), delay / 2, message="the new session up"
            )
            assert not slow.done()  # the old session still runs it
            async with await slow as resp:
                assert resp.status == 200
                assert await resp.json() == {"delayed": delay}
            await async_wait_until(lambda: _jtis(r) == [_jti(new)], 10, message="old one gone")
            _revoke(r, old)
            before = load.ok
            await asyncio.sleep(scaled(3))  # past a registry_refresh: the revocation applied
            assert load.ok > before
        finally:
            await load.stop()
        assert load.failed == 0, (load.ok, load.failed, load.failed_at)
        assert r.agent.fatal is None and r.agent.token.current.reveal() == new
