"""The byte stream of one peer link, as an asyncio protocol (docs/protocol.md §9).

A peer link is the agent-link protocol straight over TCP or TLS: whatever arrives is the
frame codec's input, in any chunking. :class:`PeerWire` holds what arrived until the link's
receive loop (``_pump`` in csc/cluster/peer.py) takes it, and feeds a short chunk to the link
at once, from ``data_received``, while that loop is waiting for one: everything before it was
fed, the link reads and it is one piece (``Link.receive_now``). A request or an answer on a
quiet link then costs no wake-up of the receive loop and no copy through a stream reader.

Invariants: bytes reach the link in the order they arrived, whichever way they go; reading
from the socket pauses while more than :data:`READ_HIGH` bytes wait here or the link's answers
back up (``Link.reading_paused``), and resumes once the loop took them; a writer waiting for
the transport to drain is woken when it drains or the connection is lost.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from shared.errors import CSCError
from shared.link import DIRECT_MAX, TLS_PIECE, Link, coalesce
from shared.wakeup import Wakeup
from shared.writeflow import WriteFlow

#: Bytes held for the receive loop beyond which the socket is no longer read.
READ_HIGH = 512 * 1024


class PeerWire(WriteFlow, asyncio.Protocol):
    """One peer link's connection (either side). ``on_made`` runs once it is connected."""

    def __init__(self, on_made: Callable[[PeerWire], None] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._on_made = on_made
        self._tls = False
        self._chunks: deque[bytes] = deque()
        self._queued = 0
        self._eof = False
        #: the receive loop, while it waits in :meth:`read` (a chunk may then be fed at once)
        self._reader = Wakeup(self.loop)
        self._read_paused = False
        self._link: Link | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._tls = transport.get_extra_info("ssl_object") is not None
        if self._on_made is not None:
            self._on_made(self)

    def data_received(self, data: bytes) -> None:
        link = self._link
        if (
            link is not None
            and self._reader.waiting
            and not self._chunks
            and len(data) <= DIRECT_MAX
            and not link.reading_paused
            and not link.is_closed
        ):
            try:
                link.receive_now(data)
            except CSCError:
                self._wake()  # the receive loop sees the link closed
                return
            if link.reading_paused:  # its answers back up: read no more until they drain
                self._pause_reading(True)
                self._wake()
            return
        self._chunks.append(data)
        self._queued += len(data)
        self._wake()
        if not self._read_paused and (
            self._queued > READ_HIGH or (link is not None and link.reading_paused)
        ):
            self._pause_reading(True)

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake()
        self.writing_lost()

    # -- the link's side ----------------------------------------------------------------------

    def attach(self, link: Link) -> None:
        """From now on, feed ``link`` short chunks at once while :meth:`read` waits, and keep
        the socket paused while its answers back up; :meth:`read` ends once it closed."""
        self._link = link
        link.closed.add_done_callback(lambda _closed: self._wake())

    async def read(self) -> bytes:
        """Everything that arrived and was not fed yet (at least one byte); ``b""`` once the
        other side closed and all of it was taken, or the attached link closed (a silent
        peer's heartbeat timeout: its socket is then closed, not left open until TCP gives up
        on it). The caller has awaited
        ``Link.wait_readable``: the socket is read again (if it was paused) while this waits."""
        while not self._chunks:
            if self._eof or (self._link is not None and self._link.is_closed):
                return b""
            if self._read_paused:
                self._pause_reading(False)
            await self._reader.wait()
            link = self._link
            if not self._chunks and link is not None and link.reading_paused:
                await link.wait_readable()  # a chunk fed at once backed its answers up
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._queued = 0
        if self._read_paused:
            self._pause_reading(False)
        return data

    def send(self, chunks: Sequence[bytes | memoryview]) -> Awaitable[None] | None:
        """Write the chunks (a :data:`~shared.link.SendFn`): None when the transport took them
        without pausing, else the wait for it to drain (raises once the connection is lost)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the peer link is closing")
        # over TLS every piece written is a record: a message of small frames goes as one
        transport.writelines(coalesce(chunks, TLS_PIECE) if self._tls else chunks)
        if self.writing_paused:  # drain() raises once the connection is lost
            return self.drain()
        return None

    def write(self, chunks: Sequence[bytes | memoryview]) -> None:
        """Write the chunks without waiting (the handshake's HELLO)."""
        if self.transport is not None:
            self.transport.writelines(chunks)

    def get_extra_info(self, name: str) -> Any:
        return None if self.transport is None else self.transport.get_extra_info(name)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- internals ----------------------------------------------------------------------------

    def _wake(self) -> None:
        self._reader.set()

    def _pause_reading(self, pause: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._read_paused = pause
        if pause:
            transport.pause_reading()
        else:
            transport.resume_reading()
