"""A stream the agent never ran is opened again elsewhere (rolling restarts lose no request).

An agent that sends GOAWAY (it moves a session to another node, or stops) refuses the OPENs that
crossed its GOAWAY with OPEN_FAIL ``going_away`` and may close the link right after; the CSC
marks the streams above the GOAWAY's ``last_stream_id`` that failed before acceptance
``unprocessed`` (shared/link.py), and the HTTP ingress opens a request without a body again on
another session, so the bootloader never sees the refusal. A GET, HEAD or OPTIONS whose link
ended before any answer is sent again too (the agent may have run it; a safe method may run
twice); any other method gets the link's error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from pathlib import Path

import aiohttp
import pytest

from shared.errors import GoingAway
from shared.link import Link
from shared.linkstream import LinkStream
from shared.protocol.codec import FrameType, encode_frame
from tests.support.attacks import read_response
from tests.support.inproc import relay
from tests.support.linkpair import link_pair
from tests.support.procs import async_wait_until


async def _serve(stream: LinkStream) -> None:
    stream.accept({"status": 200})
    stream.write_eof()


async def _pair() -> tuple[Link, Link]:
    """A CSC-side link (opens streams) and an agent-side link (serves them), in memory."""
    return await link_pair(_serve)


async def test_an_open_refused_after_the_agents_goaway_is_unprocessed() -> None:
    csc, agent = await _pair()
    served = csc.open({"kind": "http"})
    assert await served.opened == {"status": 200}
    agent.conn.go_away("going_away", "moving")  # queued: crosses the next OPEN
    crossing = csc.open({"kind": "http"})
    agent.kick()
    refused: BaseException | None = None
    try:
        await asyncio.wait_for(crossing.opened, 5)
    except GoingAway as exc:
        refused = exc
    assert refused is not None and crossing.unprocessed
    assert not served.unprocessed
    csc.close()
    agent.close()


async def test_streams_beyond_the_goaways_last_stream_id_are_unprocessed_at_link_end() -> None:
    csc, agent = await _pair()
    agent._on_stream = _never_answer  # streams stay in flight
    seen = csc.open({"kind": "http"})
    await async_wait_until(lambda: agent.streams, 5, 0.01)
    late = csc.open({"kind": "http"})
    # the agent's GOAWAY, sent when it had seen only the first stream, arrives now...
    goaway = {"code": "going_away", "message": "moving", "last_stream_id": seen.id}
    csc.feed(encode_frame(FrameType.GOAWAY, 0, 0, json.dumps(goaway).encode()))
    assert csc.peer_last_stream_id == seen.id
    csc.close()  # ...and the link ends before its refusal of the second one
    assert late.unprocessed
    assert not seen.unprocessed
    agent.close()


async def _never_answer(stream: LinkStream) -> None:
    await asyncio.Event().wait()


async def test_a_request_refused_by_a_departing_session_is_reopened_on_another(
    tmp_path: Path,
) -> None:
    async with relay(tmp_path) as r, aiohttp.ClientSession() as http:
        state = r.node.state
        await async_wait_until(lambda: len(state.sessions) == 2, 10, 0.01)
        # a slow request keeps one session busy: the idle one is tried first (least loaded)
        slow = asyncio.ensure_future(http.get(r.tunnel("/slow-head?delay=1")))
        await async_wait_until(lambda: any(s.load for s in state.sessions.values()), 10, 0.01)
        busy = next(s for s in state.sessions.values() if s.load)
        first = next(s for s in state.sessions.values() if not s.load)
        assert r.agent is not None
        departing = next(s for s in r.agent.sessions if s.id == first.id)
        departing.link.conn.go_away("going_away", "moving")  # not sent until its next frame
        async with http.get(r.tunnel("/small")) as resp:
            assert resp.status == 200, await resp.text()
        assert first.streams_opened == 1  # the refused try
        assert busy.streams_opened == 2  # the slow request and the reopened one
        async with await slow as answer:
            assert answer.status == 200


async def _answer_after_the_link_ends(tmp_path: Path, method: str) -> tuple[int, str]:
    """Status and body of a slow bodyless ``method`` request whose agent link is closed while
    the agent may be running it (two sessions, so another one can take it again)."""
    async with relay(tmp_path) as r, aiohttp.ClientSession() as http:
        state = r.node.state
        await async_wait_until(lambda: len(state.sessions) == 2, 10, 0.01)
        slow = asyncio.ensure_future(http.request(method, r.tunnel("/slow-head?delay=1")))
        await async_wait_until(lambda: any(s.load for s in state.sessions.values()), 10, 0.01)
        busy = next(s for s in state.sessions.values() if s.load)
        assert r.agent is not None
        dying = next(s for s in r.agent.sessions if s.id == busy.id)
        dying.link.close()  # the link ends while the agent may be running the request
        async with await slow as answer:
            return answer.status, await answer.text()


async def test_a_get_whose_agent_link_ends_before_the_answer_is_sent_again(
    tmp_path: Path,
) -> None:
    status, text = await _answer_after_the_link_ends(tmp_path, "GET")
    assert status == 200, text


async def test_a_post_whose_agent_link_ends_before_the_answer_is_not_sent_again(
    tmp_path: Path,
) -> None:
    status, text = await _answer_after_the_link_ends(tmp_path, "POST")
    assert status == 502, text
    assert json.loads(text)["error"] == "agent_lost"


async def test_a_get_whose_only_link_ends_gets_502_and_its_connection_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The link error thrown into the waiting request is handled once: the bootloader gets
    502 ``agent_lost`` and the next request pipelined on its connection is answered (the
    compiled ingress once raised the handled error again and dropped the connection)."""
    async with relay(tmp_path, agent={"sessions": 1}) as r:
        state = r.node.state
        await async_wait_until(lambda: len(state.sessions) == 1, 10, 0.01)
        host, port = r.node.http_address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        path = urllib.parse.urlsplit(r.tunnel("/slow-head?delay=5")).path
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        writer.write(request + request)
        await async_wait_until(lambda: any(s.load for s in state.sessions.values()), 10, 0.01)
        assert r.agent is not None
        next(iter(r.agent.sessions)).link.close()
        try:
            status, _, body = await read_response(reader)
            assert (status, json.loads(body)["error"]) == (502, "agent_lost")
            status, _, body = await read_response(reader)  # the agent is back, or not yet
            assert status in (200, 503), body
        finally:
            writer.close()
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
