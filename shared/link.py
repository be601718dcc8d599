"""The asyncio adapter of the agent link: a thin shell around :class:`shared.protocol.Connection`.

Both the CSC and the agent run one :class:`Link` per WebSocket session. The owner feeds every
received message to :meth:`Link.feed`; a writer task sends what the multiplexer queued, one
WebSocket message per flush, handed to the sender as a list of chunks (never joined here); the
heartbeats of all links of a loop share one loop timer (:mod:`shared.timerwheel`). Streams are
:class:`~shared.linkstream.LinkStream` objects with ``read()``/``write()`` coroutines that respect
flow control.

Invariants (docs/protocol.md §5): ``write()`` never queues more than the peer's credit, and the
credit of received bytes is returned only when the consumer calls :meth:`LinkStream.consumed`
after delivering them to the next hop. When the link ends, every live stream fails with the
link's error, so no reader or writer waits forever.

Each link adds its DATA payload bytes (sent and received) and its flow-control stalls (a write
that found data left and no credit) to a :class:`LinkCounters`, which several links may share;
they are plain integers, read by the programs' metrics at scrape time (``shared`` never imports
a metrics library).

Write backpressure (docs/protocol.md §5, "Links that stop reading"; numbers in
:mod:`shared.linkpace`): frames sent in answer to received ones (PONG, OPEN_FAIL, RST) count
from the moment they were produced until the sender returned (:attr:`Link.backlog`). The
owner's receive loop awaits :meth:`Link.wait_readable` before it pulls the next message and
hands each message to :meth:`Link.receive`, which decodes it in pieces of a few hundred frames
and awaits the same between pieces: above ``high_water`` it waits until the backlog is back at
``low_water``, and after ``FAIR_SLICE`` of work it yields to the event loop, so a burst on one
link cannot hold up the others. A backlog above ``max_backlog`` or a send that does not return
within ``stuck_timeout`` closes the link with :class:`~shared.errors.LinkStalled`. DATA is
bounded by flow control (the peer's credit) and does not count towards the backlog.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from shared.errors import (
    AgentLost,
    CSCError,
    InvalidState,
    LinkStalled,
    error_for_code,
)
from shared.linkpace import (
    FAIR_SLICE,
    HIGH_WATER,
    LOW_WATER,
    MAX_BACKLOG,
    PIECE_FRAMES,
    STUCK_TIMEOUT,
    AnswerBacklog,
    FrameCutter,
)
from shared.linkstream import LinkStream
from shared.protocol import (
    ClusterChanged,
    Connection,
    DataReceived,
    Event,
    GoAwayReceived,
    LinkState,
    PongReceived,
    SendCreditAvailable,
    Side,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamRejected,
    StreamReset,
)
from shared.protocol.codec import HEADER_SIZE
from shared.timerwheel import loop_timers
from shared.wakeup import Wakeup

log = logging.getLogger(__name__)

#: Largest WebSocket message a flush builds (several frames may share one message).
MAX_MESSAGE = 1024 * 1024
#: A received message this short holds at most PIECE_FRAMES frame headers, so it is one piece:
#: :meth:`Link.receive_now` takes it without awaiting (from ``data_received``).
DIRECT_MAX = PIECE_FRAMES * HEADER_SIZE

#: Sends one WebSocket message made of these chunks, in order (a sender may mask or copy them
#: piecewise; it must not keep them after it returns). It returns None when the transport took
#: the message without waiting (the usual case: no timer, no suspension), else an awaitable that
#: ends once the transport can take more; an ``async def`` sender is such a function too.
SendFn = Callable[[Sequence[bytes | memoryview]], Awaitable[None] | None]


#: Pieces shorter than this are joined before a TLS write (:func:`coalesce`): TLS seals every
#: piece written as a record of its own, and a record holds at most 16 KiB anyway.
TLS_PIECE = 16 * 1024


def coalesce(chunks: Sequence[bytes | memoryview], small: int) -> list[bytes | memoryview]:
    """``chunks`` in order, each run of neighbours shorter than ``small`` joined into one
    piece; longer chunks stay as they are (not copied)."""
    out: list[bytes | memoryview] = []
    run: list[bytes | memoryview] = []
    for chunk in chunks:
        if len(chunk) < small:
            run.append(chunk)
            continue
        if run:
            out.append(b"".join(run) if len(run) > 1 else run[0])
            run = []
        out.append(chunk)
    if run:
        out.append(b"".join(run) if len(run) > 1 else run[0])
    return out


@dataclass(slots=True)
class LinkCounters:
    """Running totals of one or more links (never reset; only ever added to)."""

    #: DATA payload bytes handed to the multiplexer for the peer.
    data_sent: int = 0
    #: DATA payload bytes received from the peer.
    data_received: int = 0
    #: Writes that had bytes left to send and had to wait for the peer's credit.
    stalls: int = 0


def max_message_size(max_frame: int) -> int:
    """The largest WebSocket message a peer may send: one flush (up to MAX_MESSAGE of frames
    plus the frame that crossed it), with room to spare."""
    return 2 * (MAX_MESSAGE + max_frame + HEADER_SIZE)


StreamHandler = Callable[[LinkStream], Awaitable[None]]
#: Serves a stream the peer opened without a task of its own when it can (returns True: it took
#: the stream and ends it by itself); False leaves it to the :data:`StreamHandler`.
QuickHandler = Callable[[LinkStream], bool]


class Link:
    """One agent-link session over a message transport (a WebSocket)."""

    def __init__(
        self,
        conn: Connection,
        send: SendFn,
        *,
        on_stream: StreamHandler | None = None,
        on_stream_now: QuickHandler | None = None,
        on_goaway: Callable[[GoAwayReceived], None] | None = None,
        on_cluster: Callable[[ClusterChanged], None] | None = None,
        name: str = "link",
        pending: list[Event] | None = None,
        counters: LinkCounters | None = None,
        stuck_timeout: float = STUCK_TIMEOUT,
        high_water: int = HIGH_WATER,
        low_water: int = LOW_WATER,
        max_backlog: int = MAX_BACKLOG,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.stuck_timeout = stuck_timeout
        self.max_backlog = max(max_backlog, high_water)
        self.conn = conn
        self.counters = counters if counters is not None else LinkCounters()
        self.name = name
        self._send = send
        self._on_stream = on_stream
        self._on_stream_now = on_stream_now
        #: streams the peer opened in the message being dispatched (for ``on_stream_now``)
        self._fresh: list[LinkStream] = []
        self.on_goaway = on_goaway
        #: called with the server's new count of nodes that take agents (CLUSTER, 1.2)
        self.on_cluster = on_cluster
        self.streams: dict[int, LinkStream] = {}
        #: ``last_stream_id`` of the peer's GOAWAY (None until one arrives)
        self.peer_last_stream_id: int | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        #: something was queued since the writer last took the multiplexer's output; the
        #: writer sleeps on ``_kick`` while it is False (a flag and a compiled waiter, not an
        #: asyncio.Event: kick() runs several times per request)
        self._kicked = False
        self._kick = Wakeup(self.loop)
        self._idle = asyncio.Event()
        self._idle.set()
        #: flushes started (each takes everything queued then) and flushes finished
        self._flushes_started = 0
        self._flushes_done = 0
        self._flushed: asyncio.Future[None] | None = None
        #: DATA payload bytes queued since the last flush started, and those of flushes
        #: started and not finished (see :attr:`unsent`)
        self._queued = 0
        self._in_flight = 0
        #: frames taken from the multiplexer by feed() for the next flush (see `backlog`)
        self._answers = AnswerBacklog(high_water, low_water)
        self._cutter = FrameCutter()
        #: how long a receive loop may run before it yields, and when it last did
        self.fair_slice = FAIR_SLICE
        self._yielded_at = self.loop.time()
        self.closed: asyncio.Future[CSCError] = self.loop.create_future()
        self._tasks = [self.loop.create_task(self._writer(), name=f"{name}-writer")]
        #: the heartbeat: one entry in the loop's shared timer (the same bound method each time)
        self._timers = loop_timers(self.loop)
        self._heartbeat = self._on_timer
        self._timers.schedule(self.loop.time(), self._heartbeat)  # then at its deadlines
        self._dispatch([*(pending or ()), *conn.events()])
        self.kick()

    # -- feeding and sending -----------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Process one received message. A link-level fault closes the link and is raised, and
        so is :class:`LinkStalled` when the answers queued pass ``max_backlog``."""
        conn = self.conn
        if conn.has_output:  # queued before this message (writes, credit): not its answers
            self._answers.add(conn.data_to_send(), answers=False)
        try:
            conn.receive_data(data, self.loop.time())
        except CSCError as err:
            self.close(err)
            raise
        self._dispatch(conn.events())
        if conn.has_output:
            self._answers.add(conn.data_to_send(), answers=True)
            if self.backlog > self.max_backlog:
                stalled = LinkStalled(
                    f"{self.backlog} bytes of answers queued for a peer that does not read"
                )
                self.close(stalled)
                raise stalled
            self.kick()

    async def receive(self, data: bytes) -> None:
        """Process one received message like :meth:`feed`, in pieces of at most a few hundred
        frames, awaiting :meth:`wait_readable` between them (stops if the link closed)."""
        pieces = self._cutter.cut(data)
        self.feed(pieces[0])
        for piece in pieces[1:]:
            await self.wait_readable()
            if self.is_closed:
                return
            self.feed(piece)

    def receive_now(self, data: bytes) -> None:
        """:meth:`receive` for a message of at most :data:`DIRECT_MAX` bytes (always one piece),
        done here without awaiting: a receiver may call it from ``data_received`` while its
        receive loop waits (everything received before was fed) and the link reads. A link-level
        fault closes the link and is raised, as by :meth:`feed`."""
        if len(data) > DIRECT_MAX:
            raise ValueError(f"{len(data)} bytes may be more than one piece")
        self._cutter.cut(data)  # one piece; keeps the frame boundary for answer_ping
        self.feed(data)

    def answer_ping(self, data: bytes) -> bytes | None:
        """The heartbeat's short way: when ``data`` is one PING alone (the most common message
        on an idle link), the ACK to send at once as a message of its own, taken by the
        multiplexer as :meth:`feed` would (:meth:`Connection.answer_ping`); None when it is
        not such a message or when answers are queued or in flight (they keep their order and
        their backpressure): then :meth:`receive` it. The caller sends the ACK only if its
        transport takes it without waiting, and has fed every message received before."""
        if self._answers.size or not self._cutter.at_boundary or self.closed.done():
            return None
        return self.conn.answer_ping(data, self.loop.time())

    @property
    def backlog(self) -> int:
        """Bytes of frames sent in answer to received ones that the sender has not returned
        from (queued, or in a flush in progress); see :meth:`wait_readable`."""
        return self._answers.size

    @property
    def reading_paused(self) -> bool:
        return not self._answers.readable.is_set()

    async def wait_readable(self) -> None:
        """Await before pulling the next message from the transport: yields to the event loop
        once ``fair_slice`` passed since it last did, and waits while the backlog is above the
        high-water mark (until it is at the low-water mark or the link closed)."""
        if self.loop.time() - self._yielded_at >= self.fair_slice:
            await asyncio.sleep(0)
            self._yielded_at = self.loop.time()
        if not self._answers.readable.is_set():
            await self._answers.readable.wait()
            self._yielded_at = self.loop.time()

    def kick(self) -> None:
        if not self._kicked:
            self._kicked = True
            self._kick.set()

    def open(self, info: dict[str, Any]) -> LinkStream:
        """Open a stream (raises GoingAway / TooManyStreams / ProtocolError synchronously)."""
        sid = self.conn.open_stream(info)
        stream = LinkStream(self, sid, info)
        self._track(stream)
        self.kick()
        return stream

    def go_away(self, code: str = "going_away", message: str = "") -> None:
        self.conn.go_away(code, message)
        self.kick()

    @property
    def is_closed(self) -> bool:
        return self.closed.done()

    @property
    def rtt(self) -> float | None:
        return self.conn.rtt

    async def sent(self) -> None:
        """Wait until everything queued so far has been handed to the transport (the sender
        returned: for a socket, its buffer drained) or the link closed. A relay between two
        links credits its source only after this, so it holds at most its own receive window,
        not that plus the next hop's window queued for sending."""
        queued = self.conn.has_output or bool(self._answers.chunks)
        target = self._flushes_started + (1 if queued else 0)
        while self._flushes_done < target and not self.is_closed:
            if self._flushed is None:
                self._flushed = self.loop.create_future()
            await asyncio.shield(self._flushed)

    @property
    def unsent(self) -> int:
        """DATA payload bytes queued by ``write()`` that the transport has not taken yet (queued,
        or in a flush whose sender has not returned); 0 once the link is closed."""
        return 0 if self.is_closed else self._queued + self._in_flight

    def _flush_done(self, flush: int | None = None) -> None:
        """Flush number ``flush`` finished (None: all of them, the link is closed)."""
        done = self._flushes_started if flush is None else flush
        self._flushes_done = max(self._flushes_done, done)
        flushed, self._flushed = self._flushed, None
        if flushed is not None and not flushed.done():
            flushed.set_result(None)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no stream is live (True) or ``timeout`` passes (False)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def close(self, err: CSCError | None = None) -> None:
        """End the link: fail every live stream with ``err`` (default: agent lost)."""
        if self.closed.done():
            return
        err = err or AgentLost("the agent link closed")
        self.closed.set_result(err)
        self.conn.close()
        self._answers.clear()
        self._flush_done()
        for stream in list(self.streams.values()):
            stream.unprocessed = self._unseen_by_peer(stream)
            stream._fail(err)
        self._timers.cancel(self._heartbeat)
        for task in self._tasks:
            task.cancel()

    async def aclose(self, err: CSCError | None = None) -> None:
        """Close and wait for the link's own tasks and stream handlers to finish."""
        self.close(err)
        tasks = [*self._tasks, *self._handlers]
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def flush(self) -> None:
        """Wait until whatever is queued now has been handed to the transport (used before
        closing it), or the link closed. The link's writer sends it, in order: a send of its
        own here would put what was queued last (a stream's FIN) on the wire ahead of what the
        writer still holds between two messages (that stream's last DATA). A writer that makes
        no progress for ``stuck_timeout`` closes the link."""
        self.kick()
        await self.sent()

    # -- internals ---------------------------------------------------------------------------

    def _track(self, stream: LinkStream) -> None:
        self.streams[stream.id] = stream
        self._idle.clear()

    def forget(self, stream: LinkStream) -> None:
        if self.streams.pop(stream.id, None) is not None and not self.streams:
            self._idle.set()

    def forget_if_done(self, stream: LinkStream) -> None:
        if stream.done:
            self.forget(stream)

    def _dispatch(self, events: list[Event]) -> None:
        streams = self.streams
        counters = self.counters
        fresh = self._fresh
        for event in events:
            if isinstance(event, DataReceived):
                counters.data_received += len(event.data)
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._chunks.append(event.data)
                    stream._wake()
            elif isinstance(event, SendCreditAvailable):
                stream = streams.get(event.stream_id)
                if stream is not None and stream._credit is not None:
                    stream._credit.set()
            else:
                self._dispatch_control(event)
        if fresh:  # offered once the message's events are in (a FIN after the OPEN too)
            self._fresh = []
            for stream in fresh:
                self._serve_stream(stream)

    def _unseen_by_peer(self, stream: LinkStream) -> bool:
        """Whether ``stream`` is one this side opened that the peer's GOAWAY did not cover
        (its id is above ``last_stream_id``) and that was never accepted: the peer refused
        it unread, or the link ended before the refusal arrived. Such a stream never ran."""
        last = self.peer_last_stream_id
        own = (stream.id % 2 == 1) == (self.conn.side is Side.CLIENT)
        return own and last is not None and stream.id > last and not stream.opened.done()

    def _dispatch_control(self, event: Event) -> None:
        if isinstance(event, StreamOpened):
            self._start_handler(event)
            return
        if isinstance(event, GoAwayReceived):
            self.peer_last_stream_id = event.last_stream_id
            if self.on_goaway is not None:
                self.on_goaway(event)
            return
        if isinstance(event, PongReceived):
            return
        if isinstance(event, ClusterChanged):
            if self.on_cluster is not None:
                self.on_cluster(event)
            return
        stream = self.streams.get(getattr(event, "stream_id", -1))
        if stream is None:
            return
        if isinstance(event, StreamAccepted):
            if not stream.opened.done():
                stream.binary_head = event.binary
                stream.opened.set_result(event.info)
        elif isinstance(event, StreamEnded):
            stream._eof = True
            stream._wake()
            self.forget_if_done(stream)
        elif isinstance(event, (StreamRejected, StreamReset)):
            stream.unprocessed = self._unseen_by_peer(stream)
            stream._fail(error_for_code(event.code, event.message))

    def _start_handler(self, event: StreamOpened) -> None:
        stream = LinkStream(self, event.stream_id, event.info)
        self._track(stream)
        if self._on_stream is None:
            stream.reject(CSCError("this side does not accept streams"))
            return
        if self._on_stream_now is not None:
            self._fresh.append(stream)
        else:
            self._serve_stream(stream)

    def _serve_stream(self, stream: LinkStream) -> None:
        if stream.done or (self._on_stream_now is not None and self._on_stream_now(stream)):
            return
        task = self.loop.create_task(self._run_handler(stream), name=f"{self.name}-s{stream.id}")
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _run_handler(self, stream: LinkStream) -> None:
        if self._on_stream is None:  # started only when there is a handler
            raise InvalidState("a stream handler without an on_stream callback")
        try:
            await self._on_stream(stream)
        except CSCError as err:
            stream.reset(err)
        except Exception:
            log.exception("%s: stream %d handler failed", self.name, stream.id)
            stream.reset(CSCError("internal error in the stream handler"))
        finally:
            stream.finish()

    async def _send_pending(self) -> None:
        chunks, answers = self._answers.take()
        if self.conn.has_output:
            chunks += self.conn.data_to_send()
        self._flushes_started += 1
        flush = self._flushes_started
        size, self._queued = self._queued, 0
        self._in_flight += size
        try:
            await self._send_chunks(chunks)
        finally:
            self._in_flight -= size
            self._answers.sent(answers)
            self._flush_done(flush)

    async def _send_chunks(self, chunks: list[bytes | memoryview]) -> None:
        batch: list[bytes | memoryview] = []
        size = 0
        for chunk in chunks:
            batch.append(chunk)
            size += len(chunk)
            if size >= MAX_MESSAGE:
                await self._send_message(batch)
                batch, size = [], 0
        if batch:
            await self._send_message(batch)

    async def _send_message(self, chunks: list[bytes | memoryview]) -> None:
        """Send one message; a sender still waiting after ``stuck_timeout`` (the peer stopped
        reading) raises :class:`LinkStalled`. One the transport took at once needs no timer."""
        waiting = self._send(chunks)
        if waiting is None:
            return
        try:
            async with asyncio.timeout(self.stuck_timeout):
                await waiting
        except TimeoutError:
            raise LinkStalled(f"no message could be sent for {self.stuck_timeout:g} s") from None

    async def _writer(self) -> None:
        try:
            while True:
                if not self._kicked:
                    await self._kick.wait()
                self._kicked = False
                await self._send_pending()
        except asyncio.CancelledError:
            raise
        except LinkStalled as err:
            log.info("%s: %s", self.name, err.message)
            self.close(err)
        except Exception as exc:  # the transport failed: the link is gone
            log.debug("%s: send failed: %r", self.name, exc)
            self.close(AgentLost(f"the link failed: {exc.__class__.__name__}"))

    def _on_timer(self) -> None:
        """The heartbeat (docs/protocol.md §7): queue a PING when due, close a silent link;
        then file the next deadline."""
        conn = self.conn
        if conn.state is LinkState.CLOSED or self.is_closed:
            return
        try:
            conn.handle_timer(self.loop.time())
        except CSCError as err:  # silent because this side stopped reading it: stalled
            paused = self.reading_paused
            self.close(LinkStalled(f"{err.message}, reading paused") if paused else err)
            return
        if conn.has_output:
            self.kick()
        self._timers.schedule(conn.next_deadline(), self._heartbeat)
