"""Node A relays a forwarded stream that came with its FIN (a request without a body) without
a task of its own (csc/cluster/peer.py ``_QuickRelay``): B sends the FIN with the OPEN, A
passes both to the agent at once and admits the stream together with the agent's answer, so B
reads admission, head, body and FIN in one piece. B giving up reaches the agent at once; an
answer longer than B's credit arrives whole; an OPEN the agent refused unprocessed comes back
to B as such, so it may try elsewhere.

A real peer link over loopback between a PeerPool (B) and a PeerServer (A); A's agent is an
in-memory link pair (tests/support/linkpair.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from csc.cluster import peer
from csc.cluster.peer import PeerPool, PeerServer
from csc.cluster.peerauth import peer_token
from csc.cluster.peerstream import strip_peer_keys
from shared.errors import Cancelled, CSCError, GoingAway, PortalOffline
from shared.link import Link, StreamHandler
from shared.linkstream import LinkStream
from shared.protocol import Connection, LinkSettings, Side, heads
from tests.support.linkpair import FORWARDED_GET, link_pair
from tests.support.procs import async_wait_until, scaled

KEY = b"k" * 32
INFO = FORWARDED_GET
HEAD = {"status": 200, "reason": "OK", "headers": [("Content-Type", "text/plain")]}


@asynccontextmanager
async def rig(
    serve: StreamHandler, before_open: Callable[[Link], None] = lambda agent: None
) -> AsyncIterator[tuple[PeerPool, str, PeerServer]]:
    """(B's pool, A's address, A's server); ``before_open(agent link)`` runs when A opens a
    stream on its agent link, just before."""
    csc, agent = await link_pair(serve)

    def open_local(info: dict[str, Any]) -> LinkStream:
        before_open(agent)
        return csc.open(strip_peer_keys(info))

    server = PeerServer("A", KEY, LinkSettings(), open_local, _no, _no)
    host, port = await server.start("127.0.0.1", 0)
    pool = PeerPool("B", KEY, LinkSettings())
    try:
        yield pool, f"{host}:{port}", server
    finally:
        await pool.aclose()
        await server.stop()
        await csc.aclose()
        await agent.aclose()


def _no() -> None:
    pass


@pytest.fixture(autouse=True)
def _patient_admission(monkeypatch: pytest.MonkeyPatch) -> None:
    """B waits for A's admission far longer than a busy machine can delay it (a test that
    wants a shorter hold or wait sets its own)."""
    monkeypatch.setattr(peer, "ADMISSION_TIMEOUT", scaled(60))


async def test_a_request_without_a_body_is_admitted_with_its_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(peer, "ADMISSION_HOLD", 60.0)  # admitted with the answer, never alone
    monkeypatch.setattr(peer, "ADMISSION_TIMEOUT", 120.0)
    answer = asyncio.Event()
    fin_with_open: list[bool] = []

    async def serve(stream: LinkStream) -> None:
        fin_with_open.append(stream.read_done)
        await answer.wait()
        stream.accept(HEAD)
        await stream.write(b"hello")
        stream.write_eof()

    async with rig(serve) as (pool, address, server):
        opening = asyncio.ensure_future(pool.open("A", address, 1, dict(INFO)))
        await async_wait_until(lambda: fin_with_open, scaled(10), 0.01)
        assert fin_with_open == [True], "the agent got the OPEN without its FIN"
        await asyncio.sleep(0.2)
        assert not opening.done(), "A admitted the stream before the agent answered"
        answer.set()
        forwarded = await asyncio.wait_for(opening, scaled(10))
        head = await forwarded.opened
        assert head["status"] == 200 and head["reason"] == "OK"
        assert forwarded.read_complete() == b"hello"  # head, body and FIN came with it
        forwarded.finish()
        await async_wait_until(lambda: server.relaying == 0, scaled(10), 0.01)


async def test_a_binary_answer_head_is_passed_on_as_it_came(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A decodes the agent's binary OPEN_OK head (its multiplexer checks it) but does not
    encode it again for B: the bytes go on as they came. Only the agent encodes a head."""
    encoded: list[dict[str, Any]] = []
    real = heads.encode_answer

    def counted(info: dict[str, Any]) -> bytes | None:
        if info:  # not A's admission (an empty head, sent as JSON)
            encoded.append(info)
        return real(info)

    monkeypatch.setattr(heads, "encode_answer", counted)

    async def serve(stream: LinkStream) -> None:
        while await stream.read():  # the upload, if any
            pass
        stream.accept(HEAD)
        await stream.write(b"hello")
        stream.write_eof()

    async with rig(serve) as (pool, address, server):
        # without a body (A's callbacks) and with one (A's relay task) alike
        for info in (dict(INFO), {**INFO, "method": "POST", "body": True}):
            encoded.clear()
            forwarded = await asyncio.wait_for(pool.open("A", address, 1, info), scaled(10))
            if info["body"]:
                await forwarded.write(b"upload")
                forwarded.write_eof()
            head = await forwarded.opened
            assert (head["status"], head["reason"]) == (200, "OK")
            assert [tuple(h) for h in head["headers"]] == HEAD["headers"]
            assert len(encoded) == 1, "A encoded the answer head again"
            forwarded.finish()
        await async_wait_until(lambda: server.relaying == 0, scaled(10), 0.01)


async def test_b_giving_up_reaches_the_agent_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peer, "ADMISSION_HOLD", 0.01)
    failed: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def serve(stream: LinkStream) -> None:
        try:
            await stream.opened  # fails when the stream does; the agent never answers
        except CSCError as err:
            failed.set_result(err.code)

    async with rig(serve) as (pool, address, server):
        forwarded = await asyncio.wait_for(pool.open("A", address, 1, dict(INFO)), scaled(10))
        forwarded.reset(Cancelled("the client went away"))
        assert await asyncio.wait_for(failed, scaled(10)) == "cancelled"
        await async_wait_until(lambda: server.relaying == 0, scaled(10), 0.01)


async def test_an_answer_longer_than_the_credit_arrives_whole() -> None:
    body = os.urandom(3 * 1024 * 1024 + 17)

    async def serve(stream: LinkStream) -> None:
        stream.accept(HEAD)
        await stream.write(body)
        stream.write_eof()

    async with rig(serve) as (pool, address, server):
        forwarded = await asyncio.wait_for(pool.open("A", address, 1, dict(INFO)), scaled(10))
        assert (await forwarded.opened)["status"] == 200
        digest, size = hashlib.sha256(), 0
        async with asyncio.timeout(scaled(30)):
            while chunk := await forwarded.read():
                digest.update(chunk)
                size += len(chunk)
                forwarded.consumed(len(chunk))
        assert size == len(body) and digest.digest() == hashlib.sha256(body).digest()
        forwarded.finish()
        await async_wait_until(lambda: server.relaying == 0, scaled(10), 0.01)


async def test_an_open_the_agent_never_ran_comes_back_unprocessed() -> None:
    async def serve(stream: LinkStream) -> None:
        raise AssertionError("the agent ran a stream after its GOAWAY")

    def leave(agent: Link) -> None:
        agent.conn.go_away("going_away", "moving")  # queued: it crosses A's OPEN

    async with rig(serve, leave) as (pool, address, server):
        forwarded = await asyncio.wait_for(pool.open("A", address, 1, dict(INFO)), scaled(10))
        with pytest.raises(GoingAway):
            await asyncio.wait_for(forwarded.opened, scaled(10))
        assert forwarded.unprocessed
        forwarded.finish()
        await async_wait_until(lambda: server.relaying == 0, scaled(10), 0.01)


async def test_a_node_at_a_new_address_is_not_held_up_by_a_dial_to_its_old_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node back under its id at another address: B dials the new address at once, even
    while a dial to the old one (which accepts and never answers the handshake) still waits,
    and the old dial's failure, when it comes, marks only the old incarnation suspect."""
    monkeypatch.setattr(peer, "DIAL_TIMEOUT", scaled(3))
    held: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepted, never answered

    async def serve(stream: LinkStream) -> None:
        stream.accept(HEAD)
        stream.write_eof()

    old = await asyncio.start_server(silent, "127.0.0.1", 0)
    old_address = f"127.0.0.1:{old.sockets[0].getsockname()[1]}"
    try:
        async with rig(serve) as (pool, address, _server):
            stale = asyncio.ensure_future(pool.open("A", old_address, 1, dict(INFO)))
            await asyncio.sleep(0.1)  # the old dial is under way
            assert not stale.done()
            started = asyncio.get_running_loop().time()
            forwarded = await asyncio.wait_for(pool.open("A", address, 2, dict(INFO)), scaled(10))
            assert (await forwarded.opened)["status"] == 200
            assert asyncio.get_running_loop().time() - started < peer.DIAL_TIMEOUT / 2
            forwarded.finish()
            with pytest.raises(PortalOffline):
                await stale
            assert pool.suspect("A", 1) and not pool.suspect("A", 2)
            again = await asyncio.wait_for(pool.open("A", address, 2, dict(INFO)), scaled(10))
            assert (await again.opened)["status"] == 200
            again.finish()
    finally:
        for writer in held:
            writer.close()
        old.close()
        await old.wait_closed()


async def test_a_silent_dialler_is_cut_off_when_its_link_times_out() -> None:
    """A node that dialled, passed the handshake and then fell silent (paused, or its network
    gone without a reset): A's heartbeat ends the link, and A closes the connection then,
    instead of holding it until TCP gives up on it."""
    settings = LinkSettings(heartbeat_interval=0.2, heartbeat_timeout=scaled(1.0))
    server = PeerServer("A", KEY, settings, lambda info: _never(), _no, _no)
    host, port = await server.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        loop = asyncio.get_running_loop()
        conn = Connection(Side.CLIENT, LinkSettings(), accept_streams=False, now=loop.time())
        conn.send_hello({"node": "B", "token": peer_token(KEY, "B", "A")})
        writer.writelines(conn.data_to_send())
        await async_wait_until(lambda: len(server.links) == 1, timeout=scaled(10))
        # silent from now on: reads what A sends (its PINGs), never answers
        while await asyncio.wait_for(reader.read(65536), scaled(20)):
            pass
        await async_wait_until(lambda: not server.links, timeout=scaled(10))
    finally:
        writer.close()
        await server.stop()


def _never() -> LinkStream:
    raise AssertionError("no stream is opened")
