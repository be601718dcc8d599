"""The agent spreads its sessions over CSC nodes: a real agent against a fake cluster.

:class:`FakeCluster` is one loopback WebSocket endpoint that speaks the agent-link handshake
(the real ``Connection``/``Link`` on the server side) and plays a cluster behind a round-robin
load balancer: each new connection is "on" the next node of a script, and its WELCOME carries
``node`` and, when set, ``cluster_nodes``. Until the cluster code exists this is the seam
where the agent's placement is checked over real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from csc.relay.websocket import run_websocket
from shared.config import AUTO
from shared.errors import CSCError
from shared.link import Link
from shared.protocol import Connection, HelloReceived, LinkSettings, Side
from tenant_agent import agent as agent_module
from tenant_agent.agent import Agent
from tenant_agent.spread import SpreadPolicy
from tests.support.inproc import agent_config
from tests.support.procs import async_wait_until, scaled
from tests.support.upstream import start_upstream_server

FAST = SpreadPolicy(redial_min=0.0, redial_max=0.02, max_redials=8, move_interval=30.0)


async def _until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    await async_wait_until(predicate, timeout, 0.01)


class _Payloads:
    """aiohttp's server WebSocket as csc.relay.websocket.run_websocket reads it."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws

    @property
    def closed(self) -> bool:
        return self.ws.closed

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool:
        return await self.ws.close(code=code, message=message)

    async def receive_payload(self) -> bytes | None:
        msg = await self.ws.receive()
        return msg.data if msg.type == WSMsgType.BINARY else None


@dataclass(eq=False)
class FakeSession:
    node: str
    link: Link
    ws: web.WebSocketResponse
    #: the nodes of the cluster's live sessions when the agent's GOAWAY arrived, else None
    goaway_seen_with: list[str] | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def live(self) -> bool:
        return not self.ended.is_set() and self.goaway_seen_with is None


class FakeCluster:
    def __init__(self, nodes: Iterable[str], cluster_nodes: int | None) -> None:
        self.nodes = iter(nodes)
        self.cluster_nodes = cluster_nodes
        self.sessions: list[FakeSession] = []
        #: open a TCP stream on each session right after WELCOME (a request racing the GOAWAY)
        self.open_at_once = False
        #: per session: "served" or the error code of the stream opened at once
        self.outcomes: dict[int, str] = {}
        #: refuse an upgrade (429 tenant_limit) while this many sessions are live
        self.session_limit: int | None = None
        self.admitted = self.refused = 0  # upgrades let through (and not ended yet), refused
        self._tasks: set[asyncio.Task[None]] = set()

    def live_nodes(self) -> list[str]:
        return sorted(s.node for s in self.sessions if s.live)

    def announce(self, count: int) -> None:
        """Every node now counts ``count`` nodes: WELCOMEs say so, and each live session is
        told (CLUSTER), as csc/cluster/node.py does after a directory read."""
        self.cluster_nodes = count
        for session in self.sessions:
            if not session.ended.is_set() and session.link.conn.send_cluster(count):
                session.link.kick()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.session_limit is not None and self.admitted >= self.session_limit:
            self.refused += 1
            body = {"error": "tenant_limit", "message": "the tenant has its agent sessions"}
            return web.json_response(body, status=429, headers={"Retry-After": "1"})
        self.admitted += 1
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        loop = asyncio.get_running_loop()
        conn = Connection(Side.SERVER, LinkSettings(), accept_streams=False, now=loop.time())
        while not any(isinstance(e, HelloReceived) for e in conn.events()):
            msg = await ws.receive()
            conn.receive_data(msg.data, loop.time())

        async def send(chunks: Sequence[bytes | memoryview]) -> None:
            await ws.send_bytes(b"".join(chunks))

        session = FakeSession(next(self.nodes), Link(conn, send, name="fake"), ws)
        session.link.on_goaway = lambda _ev: self._goaway(session)
        welcome: dict[str, Any] = {"session_id": f"s{len(self.sessions)}", "node": session.node}
        if self.cluster_nodes is not None:
            welcome["cluster_nodes"] = self.cluster_nodes
        conn.send_welcome(welcome, loop.time())
        session.link.kick()
        self.sessions.append(session)
        if self.open_at_once:
            task = asyncio.create_task(self._echo(len(self.sessions) - 1, session.link))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            await run_websocket(_Payloads(ws), session.link)
        finally:
            session.ended.set()
            self.admitted -= 1
            await session.link.aclose()
        return ws

    async def _echo(self, index: int, link: Link) -> None:
        info = {"kind": "tcp", "alias": "acme@example.com", "client": "127.0.0.1:1"}
        stream = link.open(info)
        try:
            await stream.opened
            await stream.write(b"ping")
            stream.write_eof()
            received = b""
            while chunk := await stream.read():
                received += chunk
                stream.consumed(len(chunk))
            self.outcomes[index] = "served" if received == b"ping" else f"got {received!r}"
        except CSCError as err:
            self.outcomes[index] = err.code

    def _goaway(self, session: FakeSession) -> None:
        session.goaway_seen_with = self.live_nodes()


@contextlib.asynccontextmanager
async def fake_cluster(
    nodes: Iterable[str],
    cluster_nodes: int | None,
    policy: SpreadPolicy = FAST,
    sessions: int = 2,
    open_at_once: bool = False,
    session_limit: int | None = None,
) -> AsyncIterator[tuple[FakeCluster, Agent]]:
    cluster = FakeCluster(nodes, cluster_nodes)
    cluster.open_at_once = open_at_once
    cluster.session_limit = session_limit
    app = web.Application()
    app.router.add_get("/v1/agent/connect", cluster.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream = await start_upstream_server(tcp_echo_port=0)
    agent = Agent(
        agent_config(
            f"http://127.0.0.1:{runner.addresses[0][1]}", "token", upstream, sessions=sessions
        ),
        spread=policy,
    )
    task = asyncio.create_task(agent.run())
    try:
        yield cluster, agent
    finally:
        agent.stop()
        assert await asyncio.wait_for(task, scaled(30)) == 0
        await runner.cleanup()
        await upstream.close()


def _agent_nodes(agent: Agent) -> list[str | None]:
    return sorted((s.node for s in agent.sessions if s.live), key=str)


async def test_a_second_session_on_the_same_node_is_dialled_again() -> None:
    async with fake_cluster(itertools.chain("aa", itertools.repeat("b")), 2) as (cluster, agent):
        await _until(lambda: cluster.live_nodes() == ["a", "b"] and len(cluster.sessions) == 3)
        await _until(lambda: _agent_nodes(agent) == ["a", "b"])
        # the second session the agent saw on a (which of the two depends on timing)
        (duplicate,) = [s for s in cluster.sessions if not s.live]
        await asyncio.wait_for(duplicate.ended.wait(), scaled(10))
        # dismissed politely: GOAWAY first, then a normal close, no stream ever opened
        assert duplicate.goaway_seen_with is not None
        assert duplicate.ws.close_code == 1001
        assert duplicate.link.conn.active_streams == 0
        assert agent.metrics.reconnects == {"duplicate_node": 1}


async def test_a_request_racing_the_goaway_is_served_or_refused_never_cut() -> None:
    nodes = itertools.chain("aa", itertools.repeat("b"))
    async with fake_cluster(nodes, 2, open_at_once=True) as (cluster, _):
        await _until(lambda: cluster.live_nodes() == ["a", "b"] and len(cluster.outcomes) == 3)
        dismissed = {i for i, s in enumerate(cluster.sessions) if not s.live}
        assert len(dismissed) == 1
        for i, outcome in cluster.outcomes.items():
            if i not in dismissed:
                assert outcome == "served", cluster.outcomes
            else:
                # the duplicate serves what reached it before its GOAWAY and refuses the rest
                # with going_away (a refusal the CSC may retry elsewhere), never cuts a stream
                assert outcome in ("served", "going_away"), cluster.outcomes


async def test_a_single_node_keeps_both_sessions() -> None:
    async with fake_cluster(itertools.repeat("a"), None) as (cluster, agent):
        await _until(lambda: _agent_nodes(agent) == ["a", "a"])
        assert agent.metrics.reconnects == {}
        assert cluster.live_nodes() == ["a", "a"]


async def test_three_sessions_on_two_nodes_share_one() -> None:
    nodes = itertools.chain("aab", itertools.repeat("a"))
    async with fake_cluster(nodes, 2, sessions=3) as (cluster, agent):
        await _until(lambda: len(_agent_nodes(agent)) == 3)
        assert _agent_nodes(agent).count("b") == 1
        await _until(lambda: len(cluster.live_nodes()) == 3)


async def test_after_the_bound_the_duplicate_is_kept_then_moved_make_before_break() -> None:
    policy = SpreadPolicy(redial_min=0.0, redial_max=0.02, max_redials=3, move_interval=0.3)
    nodes = itertools.chain("a" * 6, itertools.repeat("b"))  # 1 + 3 re-dials + kept + a probe
    async with fake_cluster(nodes, 2, policy) as (cluster, agent):
        await _until(lambda: _agent_nodes(agent) == ["a", "b"])
        await _until(lambda: cluster.live_nodes() == ["a", "b"])
        assert agent.metrics.reconnects["duplicate_node"] >= 3 + 2
        moved = [
            s
            for s in cluster.sessions
            if s.goaway_seen_with is not None and s.node == "a" and "b" in s.goaway_seen_with
        ]
        # the duplicate was sent away only once its replacement on b was up
        assert moved, [(s.node, s.goaway_seen_with) for s in cluster.sessions]
        kept = [s for s in cluster.sessions[:5] if s.live]
        assert len(kept) == 1


async def test_goaway_stays_make_before_break_and_a_returning_node_is_used_again() -> None:
    """A rolling restart of a two-node cluster: b drains, its session's successor lands on a
    (the only node left), and once b is back one session moves there."""
    script: list[str] = ["a", "b"]
    policy = SpreadPolicy(redial_min=0.0, redial_max=0.02, max_redials=8, move_interval=0.3)
    async with fake_cluster(_follow(script), 2, policy) as (cluster, agent):
        await _until(lambda: cluster.live_nodes() == ["a", "b"])
        b = next(s for s in cluster.sessions if s.node == "b")
        cluster.cluster_nodes = 1
        script.append("a")  # the load balancer has taken b out
        b.link.go_away("going_away", "node b drains")
        await _until(lambda: _agent_nodes(agent) == ["a", "a"])
        successor = cluster.sessions[2]
        assert successor.node == "a"
        assert successor.goaway_seen_with is None  # one node left: kept, not re-dialled
        await asyncio.wait_for(b.ended.wait(), scaled(10))  # b drained and closed
        assert agent.metrics.reconnects["goaway"] == 1
        # b is back: the next probe's WELCOME comes from b
        cluster.cluster_nodes = 2
        script.append("b")
        await _until(lambda: _agent_nodes(agent) == ["a", "b"])
        await _until(lambda: cluster.live_nodes() == ["a", "b"])


async def test_auto_sessions_grow_to_one_per_node() -> None:
    """``sessions = auto``: two slots, then one per node the WELCOMEs report, each on a node
    of its own, so no request needs a hop between nodes."""
    async with fake_cluster(itertools.cycle("abcd"), 4, sessions=AUTO) as (cluster, agent):
        await _until(lambda: _agent_nodes(agent) == ["a", "b", "c", "d"])
        await _until(lambda: cluster.live_nodes() == ["a", "b", "c", "d"])
        assert agent.slots == 4
        assert sorted(agent.metrics.slots) == [0, 1, 2, 3]


async def test_auto_sessions_stay_two_on_a_single_node() -> None:
    async with fake_cluster(itertools.repeat("a"), None, sessions=AUTO) as (cluster, agent):
        await _until(lambda: _agent_nodes(agent) == ["a", "a"])
        await asyncio.sleep(0.2)  # a window for a wrong third slot to show up
        assert agent.slots == 2
        assert len(cluster.sessions) == 2


async def test_auto_sessions_stop_at_the_tenants_session_limit() -> None:
    """A slot added for a node that the tenant's session limit refuses ends (and is not
    reported), instead of knocking every Retry-After; the sessions it has serve on."""
    nodes = itertools.cycle("abcd")
    async with fake_cluster(nodes, 4, sessions=AUTO, session_limit=3) as (cluster, agent):
        await _until(lambda: len(_agent_nodes(agent)) == 3 and cluster.refused >= 1)
        # slots 2 and 3 are added together: either may be the one refused
        await _until(lambda: len(agent.metrics.slots) == 3 and {0, 1} <= set(agent.metrics.slots))
        assert agent.slots == 4
        refused = cluster.refused
        await asyncio.sleep(1.5)  # past the refusal's Retry-After: no slot tries again
        assert cluster.refused == refused
        assert len(cluster.live_nodes()) == 3


async def test_auto_sessions_grow_again_once_the_limit_is_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After ``LIMIT_RETRY`` the agent tries the refused slot again: the operator raised the
    tenant's ``max_sessions`` meanwhile, so every node gets its session."""
    monkeypatch.setattr(agent_module, "LIMIT_RETRY", 0.5)
    nodes = itertools.cycle("abcd")
    async with fake_cluster(nodes, 4, sessions=AUTO, session_limit=3) as (cluster, agent):
        await _until(lambda: len(agent.metrics.slots) == 3 and cluster.refused >= 1)
        cluster.session_limit = None  # max_sessions raised
        await _until(lambda: len(_agent_nodes(agent)) == 4 and len(agent.metrics.slots) == 4)
        assert agent.slots == 4
        assert len(cluster.live_nodes()) == 4


def _follow(script: list[str]) -> Iterable[str]:
    """The script's nodes in order; past its end, its last node again."""
    for i in itertools.count():
        yield script[min(i, len(script) - 1)]


# -- the cluster's size told after the WELCOME (CLUSTER, protocol 1.2) -------------------------


async def test_auto_sessions_grow_when_the_cluster_tells_it_grew() -> None:
    """A node joined: the nodes tell the agent's sessions, and ``sessions = auto`` adds one
    for it at once (before 1.2 the WELCOMEs of the sessions it held said two, for good)."""
    script = ["a", "b"]
    async with fake_cluster(_cycle(script), 2, sessions=AUTO) as (cluster, agent):
        await _until(lambda: cluster.live_nodes() == ["a", "b"])
        script.append("c")  # the load balancer sends new connections to c too
        cluster.announce(3)
        await _until(lambda: _agent_nodes(agent) == ["a", "b", "c"])
        await _until(lambda: cluster.live_nodes() == ["a", "b", "c"])
        assert agent.slots == 3
        assert agent.metrics.spread == (3, 3)


async def test_a_duplicate_moves_at_once_when_the_cluster_grows() -> None:
    """Both sessions on the only node; a second node joins: one session moves there without
    waiting out ``move_interval`` (30 s here)."""
    script = ["a"]
    async with fake_cluster(_cycle(script), 1) as (cluster, agent):
        await _until(lambda: _agent_nodes(agent) == ["a", "a"])
        assert agent.metrics.spread == (1, 1)
        script[:] = ["b"]
        cluster.announce(2)
        await _until(lambda: _agent_nodes(agent) == ["a", "b"], timeout=scaled(10))
        await _until(lambda: cluster.live_nodes() == ["a", "b"])
        assert agent.metrics.spread == (2, 2)


async def test_no_more_moves_once_the_cluster_shrank() -> None:
    """Two sessions kept on one node of a two-node cluster look for the other node every
    ``move_interval``; once the nodes say the cluster has one node, the looking stops."""
    policy = SpreadPolicy(redial_min=0.0, redial_max=0.02, max_redials=1, move_interval=0.2)
    async with fake_cluster(itertools.repeat("a"), 2, policy) as (cluster, agent):
        await _until(lambda: agent.metrics.reconnects.get("duplicate_node", 0) >= 3)
        cluster.announce(1)
        await _until(lambda: agent.metrics.spread[0] == 1)
        looked = agent.metrics.reconnects["duplicate_node"]
        await asyncio.sleep(2.0)  # ten move intervals: probing on would try about ten times
        # a replacement dialled before the news came, welcomed with the old count, may take
        # one more look; none after that
        assert agent.metrics.reconnects["duplicate_node"] - looked <= 2
        assert _agent_nodes(agent) == ["a", "a"]


async def test_auto_sessions_let_the_extra_ones_go_once_the_cluster_stayed_smaller() -> None:
    """Two of four nodes leave for good: their sessions come back as duplicates on the other
    two, and after ``shrink_after`` the two extra slots go: GOAWAY, drained, closed, unreported,
    and no new connection for them."""
    policy = SpreadPolicy(redial_min=0.0, redial_max=0.02, shrink_after=0.5)
    script = ["a", "b", "c", "d"]
    async with fake_cluster(_cycle(script), 4, policy, sessions=AUTO) as (cluster, agent):
        await _until(lambda: cluster.live_nodes() == ["a", "b", "c", "d"])
        script[:] = ["a", "b"]
        cluster.announce(2)
        for session in [s for s in cluster.sessions if s.node in "cd"]:
            await session.ws.close(code=1001, message=b"node leaves")
        await _until(lambda: agent.slots == 2, timeout=scaled(10))
        await _until(lambda: len(cluster.live_nodes()) == 2)
        assert sorted(agent.metrics.slots) == [0, 1]
        assert cluster.live_nodes() == ["a", "b"]
        let_go = [s for s in cluster.sessions if s.goaway_seen_with is not None]
        assert len(let_go) == 2, [(s.node, s.goaway_seen_with) for s in cluster.sessions]
        for session in let_go:
            await asyncio.wait_for(session.ended.wait(), scaled(10))
            assert session.ws.close_code == 1001
        connections = len(cluster.sessions)
        await asyncio.sleep(0.5)
        assert len(cluster.sessions) == connections


async def test_auto_sessions_ride_out_a_dip_shorter_than_shrink_after() -> None:
    """A rolling restart: one node out for less than ``shrink_after``, then back; no slot goes."""
    policy = SpreadPolicy(redial_min=0.0, redial_max=0.02, shrink_after=3.0)
    async with fake_cluster(_cycle(["a", "b", "c"]), 3, policy, sessions=AUTO) as (cluster, agent):
        await _until(lambda: cluster.live_nodes() == ["a", "b", "c"])
        cluster.announce(2)
        await _until(lambda: agent.metrics.spread[0] == 2)
        cluster.announce(3)
        await _until(lambda: agent.metrics.spread[0] == 3)
        await asyncio.sleep(3.5)  # past shrink_after from the dip
        assert agent.slots == 3
        assert not [s for s in cluster.sessions if s.goaway_seen_with is not None]
        assert cluster.live_nodes() == ["a", "b", "c"]


def _cycle(script: list[str]) -> Iterable[str]:
    """Round robin over the script's nodes as they are when each connection comes."""
    for i in itertools.count():
        yield script[i % len(script)]
