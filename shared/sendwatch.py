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
"""

from __future__ import annotations

import asyncio
import fcntl
import struct
import termios
from collections.abc import Callable

#: Checks per timeout: the deadline is met within this fraction of it.
CHECKS_PER_TIMEOUT = 4


class SendWatch:
    """Watch one transport's write buffer (see the module docstring)."""

    __slots__ = ("_handle", "_left", "_since", "handed", "loop", "on_stall", "timeout", "transport")

    def __init__(
        self,
        transport: asyncio.WriteTransport,
        timeout: float,
        handed: Callable[[], int],
        on_stall: Callable[[], None],
    ) -> None:
        self.transport, self.timeout, self.handed, self.on_stall = (
            transport,
            timeout,
            handed,
            on_stall,
        )
        self.loop = asyncio.get_running_loop()
        self._left = 0
        self._since = 0.0
        self._handle: asyncio.TimerHandle | None = None

    @property
    def watching(self) -> bool:
        return self._handle is not None

    def start(self) -> None:
        """Watch from now on, if bytes wait and the watch is not running already."""
        if self._handle is not None:
            return
        buffered = self.transport.get_write_buffer_size()
        if buffered == 0:
            return
        self._left, self._since = self._taken(buffered), self.loop.time()
        self._arm()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _taken(self, buffered: int) -> int:
        """Bytes the client took, give or take a constant (see the module docstring)."""
        return self.handed() - buffered - _unacknowledged(self.transport)

    def _arm(self) -> None:
        self._handle = self.loop.call_later(self.timeout / CHECKS_PER_TIMEOUT, self._check)

    def _check(self) -> None:
        self._handle = None
        buffered = self.transport.get_write_buffer_size()
        if buffered == 0:
            return  # nothing waits (flushed, or the connection is gone)
        left, now = self._taken(buffered), self.loop.time()
        if left != self._left:
            self._left, self._since = left, now
        elif now - self._since >= self.timeout:
            self.on_stall()
            return
        self._arm()


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
