"""The send deadline of a client connection: it must take the bytes waiting for it.

A client that asks for a download and stops reading holds its connection, the stream behind
it (a slot of its tenant's limits, the stream's window of buffered bytes on the agent link)
and the transport's write buffer for as long as its TCP stack answers zero-window probes,
which is forever. A closed connection does the same while its last bytes wait to be flushed.
:class:`SendWatch` looks at a connection every quarter of its timeout while bytes wait in its
write buffer and calls ``on_stall`` once none has left for the whole timeout; so a connection
that takes nothing is ended between 1 and 1.25 timeouts after the last byte it took.

Invariants:

* Progress is bytes the client took: handed to the transport, less what is still in its write
  buffer, less what the kernel holds unacknowledged (``SIOCOUTQ``). Neither buffer's size alone
  will do: the relay refills the transport's buffer as fast as the client takes from it, and
  the kernel moves bytes out of that buffer only once a third of its own (megabytes, once
  autotuned) is free, so a client reading steadily but slowly leaves the transport's buffer
  unchanged for many seconds. Only a change counts, and any change counts as progress, so
  figures in other units (``handed()`` counting plaintext under TLS, or lagging the writes
  by a constant) delay the deadline at worst, but never end a connection that is being read.
* The watch runs only while bytes wait: it ends by itself when the buffer is empty, and costs
  nothing to a connection whose client keeps up.

:class:`SendWatches` is a node's set of running watches and its bound on what they hold
together (``client_buffer_limit``): the bytes in their write buffers and in the streams behind
them (``SendWatch.pending``). A stalled client holds its stream's window and its write buffer
(about half a MiB) for up to 1.25 send deadlines, so without that bound a few thousand of them,
from a handful of addresses, would be the node's memory. Past the limit, the clients that took
nothing for a twelfth of the send deadline (:data:`PRESSURE_SHARE`: 5 s of 60) are closed, the
longest stalled first, until the rest fit; a client that keeps taking bytes is never chosen,
however slow. The set is looked at every quarter of that shorter wait, only while it has
members: a sum per member, and while over the limit an ``ioctl`` per member.
"""

from __future__ import annotations

import asyncio
import fcntl
import struct
import termios
from collections.abc import Callable

#: Checks per timeout: the deadline is met within this fraction of it.
CHECKS_PER_TIMEOUT = 4
#: Past the node's bound, a client that took nothing for this share of the send deadline may
#: be closed (:class:`SendWatches`).
PRESSURE_SHARE = 12


class SendWatch:
    """Watch one transport's write buffer (see the module docstring)."""

    __slots__ = (
        "_handle",
        "_left",
        "_since",
        "group",
        "handed",
        "loop",
        "on_stall",
        "pending",
        "timeout",
        "transport",
    )

    def __init__(
        self,
        transport: asyncio.WriteTransport,
        timeout: float,
        handed: Callable[[], int],
        on_stall: Callable[[bool], None],
        group: SendWatches | None = None,
    ) -> None:
        """``on_stall(shed)`` closes the connection: ``shed`` is False at the send deadline,
        True when ``group`` chose it to bring the node back under its bound."""
        self.transport, self.timeout, self.handed, self.on_stall = (
            transport,
            timeout,
            handed,
            on_stall,
        )
        self.group = group
        #: the bytes waiting for the client behind the write buffer (its stream's), if known
        self.pending: Callable[[], int] | None = None
        self.loop = asyncio.get_running_loop()
        self._left = 0
        self._since = 0.0
        self._handle: asyncio.TimerHandle | None = None

    @property
    def watching(self) -> bool:
        return self._handle is not None

    @property
    def since(self) -> float:
        """When the client last took a byte, as far as the watch has seen (loop time)."""
        return self._since

    def start(self) -> None:
        """Watch from now on, if bytes wait and the watch is not running already."""
        if self._handle is not None:
            return
        buffered = self.transport.get_write_buffer_size()
        if buffered == 0:
            return
        self._left, self._since = self._taken(buffered), self.loop.time()
        self._arm()
        if self.group is not None:
            self.group.join(self)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            if self.group is not None:
                self.group.leave(self)

    def held(self) -> int:
        """The bytes waiting for the client: its write buffer, and its stream's."""
        pending = self.pending
        return self.transport.get_write_buffer_size() + (0 if pending is None else pending())

    def look(self, now: float) -> int:
        """Look at the buffer now: note any progress; the bytes in it (0: nothing waits)."""
        buffered = self.transport.get_write_buffer_size()
        if buffered:
            left = self._taken(buffered)
            if left != self._left:
                self._left, self._since = left, now
        return buffered

    def shed(self) -> None:
        """Close the connection for the node's bound (:class:`SendWatches`)."""
        self.stop()
        self.on_stall(True)

    def _taken(self, buffered: int) -> int:
        """Bytes the client took, give or take a constant (see the module docstring)."""
        return self.handed() - buffered - _unacknowledged(self.transport)

    def _arm(self) -> None:
        self._handle = self.loop.call_later(self.timeout / CHECKS_PER_TIMEOUT, self._check)

    def _check(self) -> None:
        now = self.loop.time()
        if self.look(now) == 0:
            self.stop()  # nothing waits (flushed, or the connection is gone)
        elif now - self._since >= self.timeout:
            self.stop()
            self.on_stall(False)
        else:
            self._arm()


class SendWatches:
    """A node's running watches and the bound on the bytes they hold (see the module
    docstring); ``limit`` None: no bound."""

    __slots__ = ("_handle", "_members", "held", "interval", "limit", "stall", "timeout")

    def __init__(self, limit: int | None, timeout: float) -> None:
        self.limit, self.timeout = limit, timeout
        #: how long a client must have taken nothing to be closed past the limit
        self.stall = timeout / PRESSURE_SHARE
        self.interval = self.stall / CHECKS_PER_TIMEOUT
        #: what the members held at the last look (0 when there is none)
        self.held = 0
        self._members: set[SendWatch] = set()
        self._handle: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._members)

    def join(self, watch: SendWatch) -> None:
        self._members.add(watch)
        if self._handle is None:
            self._handle = watch.loop.call_later(self.interval, self._look, watch.loop)

    def leave(self, watch: SendWatch) -> None:
        self._members.discard(watch)

    def _look(self, loop: asyncio.AbstractEventLoop) -> None:
        self._handle = None
        members = self._members
        if not members:
            self.held = 0
            return
        held = self.held = sum(watch.held() for watch in members)
        if self.limit is not None and held > self.limit:
            self.held = self._shed(held, self.limit, loop.time())
        self._handle = loop.call_later(self.interval, self._look, loop)

    def _shed(self, held: int, limit: int, now: float) -> int:
        """Close stalled clients, longest stalled first, until ``held`` fits ``limit``;
        what is held then."""
        stalled = [w for w in self._members if w.look(now) and now - w.since >= self.stall]
        stalled.sort(key=_since)
        for watch in stalled:
            if held <= limit:
                break
            held -= watch.held()
            watch.shed()
        return held


def _since(watch: SendWatch) -> float:
    return watch.since


def stall_reason(transport: asyncio.WriteTransport, watches: SendWatches, shed: bool) -> str:
    """Why a watched connection is closed, for the log (``shed``: see :class:`SendWatches`)."""
    waiting = transport.get_write_buffer_size()
    if not shed:
        return f"it took none of the {waiting} bytes waiting for it in {watches.timeout:g} s"
    return (
        f"it took none of the {waiting} bytes waiting for it in {watches.stall:g} s, while "
        f"{watches.held} bytes waited for slow clients (client_buffer_limit {watches.limit})"
    )


def _unacknowledged(transport: asyncio.BaseTransport) -> int:
    """Bytes in the socket's kernel send queue not yet acknowledged by the peer (0 when the
    socket cannot tell)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int(struct.unpack("i", raw)[0])
