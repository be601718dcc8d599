"""The agent's short way for bodyless requests (tenant_agent/http_quick.py).

An OPEN that comes with its FIN is served by callbacks on an idle pooled connection to a real
portal over loopback (the agent's :class:`Upstreams` behind an in-memory link): no handler task
when the answer is short and complete, a task that takes over from where the callbacks stopped
otherwise (a long answer, one over the stream's credit, a retry on a fresh connection). Each
test checks what the CSC side reads, that the stream was counted as started and finished once,
and that the connection went back to the pool only when it could be reused.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from shared.config import Secret
from shared.errors import Cancelled, CSCError
from shared.link import Link
from shared.linkstream import LinkStream
from shared.protocol import LinkSettings
from tenant_agent.config import AgentConfig
from tenant_agent.http_exchange import Outcome
from tenant_agent.upstream import Upstreams
from tests.support.linkpair import FORWARDED_GET, link_pair
from tests.support.procs import async_wait_until, scaled

#: script(reader, writer, n): the portal's side of its n-th connection.
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


async def answer_each(body: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while True:
        await reader.readuntil(b"\r\n\r\n")
        w.write(ok(body))
        await w.drain()


@asynccontextmanager
async def portal(script: Script) -> AsyncIterator[tuple[str, list[int]]]:
    """A scripted portal on loopback: its URL and the connections it accepted so far."""
    accepted: list[int] = []
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(len(accepted) + 1)
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await script(reader, writer, len(accepted))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            tasks.discard(task)
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", accepted
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


@asynccontextmanager
async def agent(
    url: str, settings: LinkSettings | None = None, *, seen: list[int] | None = None
) -> AsyncIterator[tuple[Link, Link, Upstreams]]:
    """(CSC side, agent side, the agent's upstreams) of an in-memory link. With ``seen``, each
    stream offered to the short way appends the tasks serving streams right after it was
    offered (handler tasks of the link and tasks that took over an exchange): 0 when it was
    served by callbacks alone."""
    config = AgentConfig(csc="ws://127.0.0.1:9", token=Secret("t"), upstream=url, sessions=1)
    upstreams = Upstreams(config)
    links: list[Link] = []

    def handle_now(stream: LinkStream) -> bool:
        taken = upstreams.handle_now(stream)
        if seen is not None:
            seen.append((0 if taken else 1) + len(links[1]._handlers) + len(upstreams.http.tasks))
        return taken

    links[:] = await link_pair(upstreams.handle, handle_now, settings)
    csc, served = links
    try:
        yield csc, served, upstreams
    finally:
        await upstreams.close()
        await csc.aclose()
        await served.aclose()


async def get(csc: Link, target: str = "/") -> tuple[dict[str, Any], bytes]:
    """Open a bodyless GET (its FIN with its OPEN) and read the whole answer."""
    stream = csc.open({**FORWARDED_GET, "target": target})
    stream.write_eof()
    head = await asyncio.wait_for(stream.opened, scaled(5))
    body = b""
    while data := await asyncio.wait_for(stream.read(), scaled(5)):
        body += data
        stream.consumed(len(data))
    stream.finish()
    return head, body


def taken_over(upstreams: Upstreams) -> list[Outcome]:
    """The outcomes with which tasks took over quick exchanges so far."""
    return sorted(upstreams.http.taken_over.elements(), key=lambda o: o.value)


async def test_a_short_answer_on_a_pooled_connection_needs_no_task() -> None:
    seen: list[int] = []
    async with (
        portal(lambda r, w, n: answer_each(b"hello", r, w)) as (url, accepted),
        agent(url, seen=seen) as (csc, _, upstreams),
    ):
        head, body = await get(csc)  # the pool is empty: the handler task connects
        assert (head["status"], body) == (200, b"hello")
        assert seen == [1]
        seen.clear()
        for _ in range(3):
            head, body = await get(csc)
            assert (head["status"], body) == (200, b"hello")
        assert seen == [0, 0, 0], "a task served a short answer on a pooled connection"
        assert accepted == [1]  # one connection, reused
        assert upstreams.metrics.active["http"] == 0
        assert upstreams.metrics.opened["http"] == 4


async def test_a_long_answer_is_taken_over_by_a_task_and_arrives_whole() -> None:
    big = bytes(range(256)) * 4096  # 1 MiB: longer than the agent holds for one piece

    async def script(reader: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        w.write(ok(b"warm"))
        await reader.readuntil(b"\r\n\r\n")
        w.write(ok(big))
        await w.drain()
        await answer_each(b"after", reader, w)

    async with portal(script) as (url, accepted), agent(url) as (csc, _, upstreams):
        assert (await get(csc))[1] == b"warm"
        head, body = await get(csc)
        assert head["status"] == 200
        assert hashlib.sha256(body).digest() == hashlib.sha256(big).digest()
        assert taken_over(upstreams) == [Outcome.STREAM]
        assert (await get(csc))[1] == b"after"
        assert accepted == [1]  # the task gave the connection back to the pool
        await async_wait_until(lambda: not upstreams.http.tasks, timeout=scaled(5))
        assert upstreams.metrics.active["http"] == 0


async def test_an_answer_over_the_streams_credit_is_written_by_a_task() -> None:
    body = b"x" * 3000  # complete and short, but over a 1 KiB window

    async with (
        portal(lambda r, w, n: answer_each(body, r, w)) as (url, _),
        agent(url, LinkSettings(initial_window=1024)) as (csc, _, upstreams),
    ):
        for _ in range(3):
            head, got = await get(csc)
            assert (head["status"], got) == (200, body)
        assert taken_over(upstreams) == [Outcome.WHOLE, Outcome.WHOLE]  # the first connected
        assert upstreams.metrics.active["http"] == 0


async def test_a_pooled_connection_the_portal_dropped_is_retried_on_a_fresh_one() -> None:
    async def script(reader: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        w.write(ok(b"conn %d" % n))
        await w.drain()
        await reader.readuntil(b"\r\n\r\n")  # the next request: dropped unanswered

    async with portal(script) as (url, accepted), agent(url) as (csc, _, upstreams):
        assert (await get(csc))[1] == b"conn 1"
        head, body = await get(csc)  # quick on connection 1, which drops it: retried
        assert (head["status"], body) == (200, b"conn 2")
        assert taken_over(upstreams) == [Outcome.RETRY]
        assert accepted == [1, 2]
        assert upstreams.metrics.active["http"] == 0


async def test_the_csc_giving_up_closes_the_connection_and_ends_the_stream_once() -> None:
    answered = asyncio.Event()

    async def script(reader: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        w.write(ok(b"warm"))
        await reader.readuntil(b"\r\n\r\n")
        await answered.wait()  # the second request is never answered

    async with portal(script) as (url, _), agent(url) as (csc, served, upstreams):
        assert (await get(csc))[1] == b"warm"
        stream = csc.open(dict(FORWARDED_GET))
        stream.write_eof()
        await async_wait_until(lambda: upstreams.http.busy_count == 1, timeout=scaled(5))
        stream.reset(Cancelled("the bootloader left"))
        await async_wait_until(lambda: upstreams.metrics.active["http"] == 0, timeout=scaled(5))
        assert upstreams.http.busy_count == upstreams.http.idle_count == 0  # closed, not pooled
        assert not served.streams
        answered.set()


async def test_closing_the_pool_refuses_a_waiting_quick_exchange() -> None:
    async def script(reader: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        w.write(ok(b"warm"))
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(scaled(30))

    async with portal(script) as (url, _), agent(url) as (csc, _, upstreams):
        assert (await get(csc))[1] == b"warm"
        stream = csc.open(dict(FORWARDED_GET))
        stream.write_eof()
        await async_wait_until(lambda: upstreams.http.busy_count == 1, timeout=scaled(5))
        await upstreams.http.close()
        try:
            await asyncio.wait_for(stream.opened, scaled(5))
        except CSCError as err:
            assert err.code == "going_away"
        else:
            raise AssertionError("a request the pool dropped was answered")
        assert upstreams.metrics.active["http"] == 0
