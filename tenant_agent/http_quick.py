"""A bodyless request served without a task: the agent's short way for most requests.

When the CSC's OPEN of an ``http`` stream comes with its FIN (no body) and the pool has an idle
connection, :meth:`HttpUpstream.quick <tenant_agent.http_upstream.HttpUpstream.quick>` makes a
:class:`QuickExchange`, started from the link's dispatch instead of a handler task. It sends the
request at once and runs :meth:`Exchange.advance <tenant_agent.http_exchange.Exchange.advance>`
at each wake of the connection (the parser's callbacks, its end, its timer, the stream's
failure). A response that is complete and fits the stream's credit goes to the link as head,
body and FIN in one piece, from the connection's ``data_received``. Anything else (a long or
slow body, a body over the credit, a retry on a fresh connection) goes on in a task through
:meth:`HttpUpstream.resume <tenant_agent.http_upstream.HttpUpstream.resume>`, which is the
handler task's own code from that point.

Invariants: the exchange ends exactly once (``ended`` called once, the connection released
once, either here or by the task that took over); an error in a callback resets the stream and
never reaches the connection's protocol or the link.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from shared.errors import CSCError
from shared.linkstream import LinkStream
from tenant_agent.http_exchange import Exchange, Outcome

if TYPE_CHECKING:
    from tenant_agent.http_upstream import HttpUpstream

log = logging.getLogger("csc_agent.upstream.http")


class QuickExchange:
    """One bodyless request and its response, driven by the connection's wakes."""

    __slots__ = ("_ended", "_exchange", "_over", "_pool", "_stream")

    def __init__(
        self, pool: HttpUpstream, stream: LinkStream, exchange: Exchange, ended: Callable[[], None]
    ) -> None:
        self._pool = pool
        self._stream = stream  # the exchange's, as a link stream
        self._exchange = exchange
        self._ended = ended
        self._over = False

    def start(self) -> None:
        self._exchange.conn.on_wake = self._step
        try:
            self._exchange.attach()
        except Exception:
            self._failed()

    def _step(self) -> None:
        exchange = self._exchange
        try:
            outcome = exchange.advance()
            if outcome is Outcome.WAIT:
                return
            if outcome is Outcome.WHOLE and self._write_whole():
                outcome = Outcome.DONE
        except CSCError:
            outcome = Outcome.DONE  # the CSC reset the stream
        except Exception:
            self._failed()
            return
        exchange.conn.on_wake = None
        if outcome is Outcome.DONE:
            self._end()
        else:
            self._pool.taken_over[outcome] += 1
            task = asyncio.get_running_loop().create_task(self._resume(outcome))
            self._pool.tasks.add(task)
            task.add_done_callback(self._pool.tasks.discard)

    def _write_whole(self) -> bool:
        """Head (already accepted), body and FIN in one piece, if the credit allows it."""
        conn, stream = self._exchange.conn, self._stream
        if conn.chunks:
            size = conn.queued
            if not stream.fits(size):
                return False
            stream.write_now(conn.take_all())
            conn.delivered(size)
        stream.write_eof()
        return True

    async def _resume(self, outcome: Outcome) -> None:
        try:
            await self._pool.resume(self._exchange, outcome)
        except CSCError as err:
            self._stream.reset(err)
        except Exception:
            log.exception("request %s: the upstream exchange failed", self._exchange.request_id)
            self._stream.reset(CSCError("internal error in the stream handler"))
        finally:
            self._finish()

    def _failed(self) -> None:
        """A bug in a callback: log it, reset the stream, end here."""
        log.exception("request %s: the upstream exchange failed", self._exchange.request_id)
        self._exchange.conn.on_wake = None
        self._exchange.conn.poisoned = True
        self._stream.reset(CSCError("internal error in the stream handler"))
        self._end()

    def _end(self) -> None:
        """The exchange is over here: nothing awaits, so undo attach() without a task."""
        exchange = self._exchange
        self._stream.opened.remove_done_callback(exchange.conn.stream_failed)
        self._pool.release(exchange.conn)
        self._finish()

    def _finish(self) -> None:
        if not self._over:
            self._over = True
            self._ended()
