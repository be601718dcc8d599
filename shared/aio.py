"""Small asyncio helpers of the relay: end a task without caring how it ended
(:func:`cancel_quietly`), end a link and wait for its WebSocket to close (:func:`close_link`),
fail a future that is not done by a deadline (:func:`fail_at`, one
timer instead of an ``asyncio.timeout`` block on a per-request path), and copy bytes both ways
between a socket and a link stream (:func:`splice`, the TCP ingress and the agent's TCP
upstream).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from shared.errors import CSCError, error_for_code
from shared.link import Link, LinkCounters
from shared.linkstream import TunnelStream
from shared.sendwatch import Hold, SendWatch


async def splice(
    stream: TunnelStream,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    reset_code: str,
    chunk_size: int = 256 * 1024,
    traffic: LinkCounters | None = None,
    watch: SendWatch | None = None,
    hold: Hold | None = None,
) -> None:
    """Copy bytes both ways between a socket and a stream, with half-close, until both end.

    A socket error resets the stream with ``reset_code``; a stream error aborts the socket.
    ``traffic`` (optional) counts this splice's bytes: ``data_sent`` from the socket to the
    stream, ``data_received`` from the stream to the socket. ``watch`` (optional) is the
    socket's send deadline, started whenever bytes wait for the socket's peer; ``hold``
    (optional) counts, while the stream has no credit for them, the bytes read from the socket
    (shared/sendwatch.py).
    """
    tally = traffic if traffic is not None else LinkCounters()
    if watch is not None:
        watch.pending = stream.buffered

    async def outbound() -> None:
        while data := await reader.read(chunk_size):
            if hold is not None:
                hold.waiting = len(data)
                hold.join()
            await stream.write(data)
            if hold is not None:
                hold.leave()
            tally.data_sent += len(data)
        stream.write_eof()

    async def inbound() -> None:
        while data := await stream.read():
            writer.write(data)
            if watch is not None:
                watch.start()
            await writer.drain()
            stream.consumed(len(data))
            tally.data_received += len(data)
        if writer.can_write_eof():
            writer.write_eof()

    tasks = [asyncio.ensure_future(outbound()), asyncio.ensure_future(inbound())]
    try:
        try:
            for next_done in asyncio.as_completed(tasks):
                await next_done
        except CSCError:
            writer.transport.abort()
        except (OSError, asyncio.IncompleteReadError) as exc:
            stream.reset(error_for_code(reset_code, f"connection reset: {exc.__class__.__name__}"))
            writer.transport.abort()
    except BaseException as exc:  # not `finally`: an await there (shared/compiled.py)
        await _cancel_all(tasks)
        raise exc
    await _cancel_all(tasks)


async def _cancel_all(tasks: Sequence[asyncio.Future[None]]) -> None:
    """Cancel the directions still running; read the error of one that failed too (the
    first failure is what the splice reports), so asyncio does not log it as lost."""
    for task in tasks:
        if not task.done():
            await cancel_quietly(task)
        elif not task.cancelled():
            task.exception()


async def close_link(link: Link, watcher: asyncio.Future[Any]) -> None:
    """End a WebSocket's link and wait for ``watcher``, the task that closes the WebSocket when
    the link ends (bounded), or sees it closed; its failure is not this caller's concern."""
    link.close()
    with contextlib.suppress(Exception):
        await watcher


async def cancel_quietly(task: asyncio.Future[Any] | None) -> None:
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


def fail_at(fut: asyncio.Future[Any], when: float, error: Callable[[], BaseException]) -> None:
    """Fail ``fut`` with ``error()`` at loop time ``when`` unless it is done by then; the
    timer goes as soon as ``fut`` is done. Whoever awaits ``fut`` gets the error."""
    if fut.done():
        return
    timer = fut.get_loop().call_at(when, _fail_if_pending, fut, error)
    fut.add_done_callback(lambda _f: timer.cancel())


def _fail_if_pending(fut: asyncio.Future[Any], error: Callable[[], BaseException]) -> None:
    if not fut.done():
        fut.set_exception(error())
