"""A stream of the agent link as asyncio code sees it (docs/protocol.md §3, §5): what
shared/link.py hands to the stream's owner on either side.

:class:`LinkStream` has ``read()``/``write()`` coroutines that respect flow control, the open
answer as a future (``opened``) and the ways to end a stream (``write_eof``, ``reset``,
``finish``). :class:`TunnelStream` is what an ingress needs of a stream, so that a stream
forwarded to another node (csc/cluster/peerstream.py) can stand in for one to an agent.

Invariants: ``write()`` never queues more than the peer's credit; credit for received bytes goes
back only through :meth:`LinkStream.consumed`; once the stream failed (its own reset, the
peer's, or the link's end) every reader and writer wakes with the error.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from shared.errors import Cancelled, CSCError
from shared.wakeup import Wakeup

if TYPE_CHECKING:
    from shared.link import Link


class LinkStream:
    """One multiplexed stream as seen by asyncio code on either side."""

    __slots__ = (
        "_chunks",
        "_credit",
        "_eof",
        "_error",
        "_local_eof",
        "_waiter",
        "binary_head",
        "id",
        "info",
        "link",
        "opened",
        "unprocessed",
    )

    def __init__(self, link: Link, sid: int, info: dict[str, Any]) -> None:
        self.link = link
        self.id = sid
        self.info = info
        self.opened: asyncio.Future[dict[str, Any]] = link.loop.create_future()
        #: the peer never ran this stream: its GOAWAY did not cover it (``last_stream_id``
        #: below its id) and it failed before it was accepted (refused, or the link ended);
        #: it may be opened again elsewhere whatever the request (docs/protocol.md §7)
        self.unprocessed = False
        #: the peer's answer head as it came, when it was binary (set with ``opened``)
        self.binary_head: bytes | None = None
        self._chunks: deque[bytes | memoryview] = deque()
        self._eof = False
        self._local_eof = False
        self._error: CSCError | None = None
        self._waiter = Wakeup(link.loop)
        #: set when credit comes or the stream fails; made by the first write that waits for
        #: credit (most streams never do)
        self._credit: asyncio.Event | None = None

    @property
    def error(self) -> CSCError | None:
        return self._error

    async def read(self) -> bytes | memoryview:
        """The next received chunk; ``b""`` at the peer's FIN; raises the stream's error."""
        while not self._chunks:
            if self._eof:  # the peer's direction ended cleanly, whatever happened after
                return b""
            if self._error is not None:
                raise self._error
            await self._waiter.wait()
        return self._chunks.popleft()

    def read_now(self) -> bytes | memoryview | None:
        """What :meth:`read` would return without waiting, or None when it would wait."""
        if self._chunks:
            return self._chunks.popleft()
        if self._eof:
            return b""
        if self._error is not None:
            raise self._error
        return None

    def buffered(self) -> int:
        """Bytes received and not read yet."""
        return sum(len(chunk) for chunk in self._chunks)

    def consumed(self, nbytes: int) -> None:
        """Report ``nbytes`` delivered to the next hop: the peer may send that much more."""
        self.link.conn.consumed(self.id, nbytes, self.link.loop.time())
        self.link.kick()

    async def write(self, data: bytes | memoryview) -> None:
        """Send ``data``, waiting for credit as needed. Raises the stream's error."""
        view = memoryview(data)
        while True:
            taken = self.write_now(view)  # not inside the slice: see shared/compiled.py
            view = view[taken:]
            if not view:
                return
            self.link.counters.stalls += 1
            credit = self._credit
            if credit is None:
                credit = self._credit = asyncio.Event()
            credit.clear()
            await credit.wait()

    def write_now(self, data: bytes | memoryview) -> int:
        """Queue as much of ``data`` as the peer's credit allows now, without waiting; the
        number of bytes queued. Raises the stream's error."""
        if self._error is not None:
            raise self._error
        taken = self.link.conn.send_data(self.id, data)
        if taken:
            link = self.link
            link.counters.data_sent += taken
            link._queued += taken
            link.kick()
        return taken

    def fits(self, size: int) -> bool:
        """Whether the peer's credit takes ``size`` more bytes now."""
        return size <= self.link.conn.send_credit(self.id)

    def write_whole(self, data: bytes) -> bool:
        """Queue all of ``data`` if the peer's credit allows it now; else queue nothing."""
        return self.fits(len(data)) and self.write_now(data) == len(data)

    def write_eof(self) -> None:
        """Half-close: queue FIN (in the same flush as anything queued before it)."""
        if self._error is not None:
            raise self._error
        if not self._local_eof:
            self._local_eof = True
            self.link.conn.send_fin(self.id)
            self.link.kick()
            self.link.forget_if_done(self)

    @property
    def read_done(self) -> bool:
        """The peer's FIN arrived and every byte before it was read: ``read()`` returns b""."""
        return self._eof and not self._chunks

    def read_complete(self) -> bytes | None:
        """Everything the peer sent, if its FIN has already arrived (else None)."""
        if not self._eof or self._error is not None:
            return None
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data

    def accept(self, info: dict[str, Any]) -> None:
        self.link.conn.accept_stream(self.id, info)
        self.link.kick()

    def reject(self, err: CSCError) -> None:
        self.link.conn.reject_stream(self.id, err.code, err.message)
        self.link.kick()
        self._fail(err)

    def reset(self, err: CSCError) -> None:
        """Abort the stream in both directions and tell the peer why."""
        if self._error is None:
            self.link.conn.reset_stream(self.id, err.code, err.message)
            self.link.kick()
        self._fail(err)

    def finish(self) -> None:
        """Called when the stream's owner is done with it: reset it if either side still runs,
        so that neither the link nor the peer keeps it (and a drain does not wait for it)."""
        if not self.done:
            self.reset(Cancelled("the stream was abandoned"))

    # -- called by Link ----------------------------------------------------------------------

    def _wake(self) -> None:
        self._waiter.set()

    def _fail(self, err: CSCError) -> None:
        if self._error is None:
            self._error = err
        if not self.opened.done():
            self.opened.set_exception(err)
            self.opened.exception()  # retrieved: a failed open is reported by the caller
        self._wake()
        if self._credit is not None:
            self._credit.set()
        self.link.forget(self)

    @property
    def done(self) -> bool:
        return self._error is not None or (self._eof and self._local_eof)


class TunnelStream(Protocol):
    """What an ingress needs of a stream: a :class:`LinkStream` to an agent, or a stream
    forwarded to another node (csc/cluster/peer.py ``PeerStream``)."""

    info: dict[str, Any]
    opened: asyncio.Future[dict[str, Any]]

    @property
    def error(self) -> CSCError | None: ...

    @property
    def unprocessed(self) -> bool: ...

    async def read(self) -> bytes | memoryview: ...

    def buffered(self) -> int: ...

    def consumed(self, nbytes: int) -> None: ...

    async def write(self, data: bytes | memoryview) -> None: ...

    def write_eof(self) -> None: ...

    def read_complete(self) -> bytes | None: ...

    def reset(self, err: CSCError) -> None: ...

    def finish(self) -> None: ...
