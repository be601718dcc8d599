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

:class:`SendWatches` is a node's bound on the bytes its client connections hold because the
other end does not take them (``client_buffer_limit``): answers waiting for slow clients (each
running :class:`SendWatch`: its write buffer and the stream behind it, ``SendWatch.pending``)
and bytes from clients waiting for slow portals (each joined :class:`Hold`: a request body read
ahead of its stream's credit). A stalled client holds its stream's window and its write buffer
(about half a MiB) for up to 1.25 send deadlines, a portal that does not read a request body
holds up to half a MiB of it for as long as it likes, so without that bound a few thousand
connections, from a handful of addresses, would be the node's memory; and a tenant's own
clients reading a byte now and then (a hostile tenant has its portal answer them) would hold
as much without ever stalling. Past the limit, among the members behind for at least a twelfth
of the send deadline (:data:`PRESSURE_SHARE`: 5 s of 60), those whose bytes nobody took in that
time are closed first, the longest stalled first; if that is not enough, the slowest (bytes
taken per second of being behind) of the tenant holding the most go next, the tenant being
chosen again after each, until the rest fit. So one tenant's clients or portal, or clients of
one tenant, cannot take the memory of the others' traffic, and a connection that moves is
closed only when the node is over its bound without any stalled one. The set is looked at
every quarter of that shorter wait, only while it has members: a sum per member, and while
over the limit an ``ioctl`` per watch.
"""

from __future__ import annotations

import asyncio
import fcntl
import heapq
import struct
import termios
from collections.abc import Callable
from typing import Protocol

#: Checks per timeout: the deadline is met within this fraction of it.
CHECKS_PER_TIMEOUT = 4
#: Past the node's bound, a client that took nothing for this share of the send deadline may
#: be closed (:class:`SendWatches`).
PRESSURE_SHARE = 12


class Holder(Protocol):
    """What :class:`SendWatches` needs of a member: bytes a connection holds that its other
    end does not take (answers for a slow client, a request body for a slow portal)."""

    loop: asyncio.AbstractEventLoop

    @property
    def tenant(self) -> str:
        """Whose bytes they are ("" when not known)."""

    @property
    def key(self) -> object:
        """The connection's transport: a connection closed for one member is not closed (and
        counted) again for another in the same look."""

    @property
    def watching(self) -> bool: ...

    @property
    def since(self) -> float: ...

    @property
    def behind_since(self) -> float: ...

    def held(self) -> int: ...

    def look(self, now: float) -> int: ...

    def rate(self, now: float) -> float: ...

    def shed(self, why: str) -> None: ...


class Progress:
    """Progress in bytes taken, from the moment bytes started to wait (:meth:`begin`), as
    seen at each look (:meth:`note`): for :class:`SendWatches`."""

    __slots__ = ("_first", "_left", "_since", "_started", "_why")

    def __init__(self) -> None:
        self._left = self._first = 0
        self._since = self._started = 0.0
        self._why = ""

    @property
    def since(self) -> float:
        """When bytes were last taken, as far as the looks have seen (loop time)."""
        return self._since

    @property
    def behind_since(self) -> float:
        """When bytes started to wait (loop time)."""
        return self._started

    def rate(self, now: float) -> float:
        """Bytes per second taken since bytes started to wait (as of the last look)."""
        return (self._left - self._first) / max(now - self._started, 1e-3)

    def begin(self, taken: int, now: float) -> None:
        self._left = self._first = taken
        self._since = self._started = now

    def note(self, taken: int, now: float) -> None:
        if taken != self._left:
            self._left, self._since = taken, now


class SendWatch(Progress):
    """Watch one transport's write buffer (see the module docstring)."""

    __slots__ = (
        "_handle",
        "group",
        "handed",
        "loop",
        "on_stall",
        "pending",
        "tenant",
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
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """``on_stall(shed)`` closes the connection: ``shed`` is False at the send deadline,
        True when ``group`` chose it to bring the node back under its bound. ``loop``: the
        running one, when the caller has it (else looked up: a system call on CPython 3.11)."""
        super().__init__()
        self.transport, self.timeout, self.handed, self.on_stall = (
            transport,
            timeout,
            handed,
            on_stall,
        )
        self.group = group
        #: the bytes waiting for the client behind the write buffer (its stream's), if known
        self.pending: Callable[[], int] | None = None
        #: whose bytes wait (the tenant of the stream being relayed; "" when none)
        self.tenant = ""
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None

    @property
    def watching(self) -> bool:
        return self._handle is not None

    @property
    def key(self) -> object:
        return self.transport

    def start(self) -> None:
        """Watch from now on, if bytes wait and the watch is not running already."""
        if self._handle is not None:
            return
        try:
            buffered = self.transport.get_write_buffer_size()
        except AttributeError:  # asyncio's own TLS transport once its connection was lost
            return
        if buffered == 0:
            return
        self.begin(self._taken(buffered), self.loop.time())
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
            self.note(self._taken(buffered), now)
        return buffered

    def shed(self, why: str) -> None:
        """Close the connection for the node's bound (:class:`SendWatches`), ``why`` being
        the choice, for :meth:`reason`."""
        self.stop()
        self._why = why
        self.on_stall(True)

    def reason(self, shed: bool) -> str:
        """Why the connection is closed, for the log."""
        waiting = self.transport.get_write_buffer_size()
        if not shed:
            return f"it took none of the {waiting} bytes waiting for it in {self.timeout:g} s"
        state = "" if self.group is None else self.group.state()
        return f"{waiting} bytes waiting for it, {self._why}, {state}"

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


class Hold(Progress):
    """Bytes a connection holds until another party takes them (a request body waiting for
    its stream's credit): counted by a :class:`SendWatches` from :meth:`join` to
    :meth:`leave`, which may call ``on_shed(why)`` to close the connection."""

    __slots__ = (
        "_held",
        "_owner",
        "_taken",
        "group",
        "joined",
        "key",
        "loop",
        "on_shed",
        "waiting",
    )

    def __init__(
        self,
        group: SendWatches,
        key: object,
        held: Callable[[], int] | None,
        taken: Callable[[], int],
        owner: Callable[[], str],
        on_shed: Callable[[str], None],
    ) -> None:
        """``key``: the connection's transport; ``held()``: the bytes held now (None:
        :attr:`waiting`, set by the user); ``taken()``: bytes taken in all so far;
        ``owner()``: their tenant."""
        super().__init__()
        self.key = key
        self.waiting = 0
        self.group, self._held, self._taken, self._owner, self.on_shed = (
            group,
            held,
            taken,
            owner,
            on_shed,
        )
        self.loop = asyncio.get_running_loop()
        self.joined = False

    @property
    def tenant(self) -> str:
        return self._owner()

    @property
    def watching(self) -> bool:
        return self.joined

    def join(self) -> None:
        if not self.joined:
            self.joined = True
            self.begin(self._taken(), self.loop.time())
            self.group.join(self)

    def leave(self) -> None:
        if self.joined:
            self.joined = False
            self.group.leave(self)

    def held(self) -> int:
        held = self._held
        return self.waiting if held is None else held()

    def look(self, now: float) -> int:
        self.note(self._taken(), now)
        return self.held()

    def shed(self, why: str) -> None:
        self.leave()
        self._why = why
        self.on_shed(why)


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
        self._members: set[Holder] = set()
        self._handle: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._members)

    def state(self) -> str:
        """What the members held at the last look and the bound, for the log lines of the
        connections closed for it."""
        return f"while the node held {self.held} bytes (client_buffer_limit {self.limit})"

    def join(self, member: Holder) -> None:
        self._members.add(member)
        if self._handle is None:
            self._handle = member.loop.call_later(self.interval, self._look, member.loop)

    def leave(self, member: Holder) -> None:
        self._members.discard(member)

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
        """Close clients behind for ``stall`` or more (see the module docstring) until
        ``held`` fits ``limit``; what is held then."""
        behind = [w for w in self._members if w.look(now) and now - w.behind_since >= self.stall]
        stalled = sorted((w for w in behind if now - w.since >= self.stall), key=_since)
        cut: set[object] = set()  # connections closed in this look
        for watch in stalled:
            if held <= limit:
                return held
            held -= watch.held()
            _cut(watch, f"nothing taken in {now - watch.since:.1f} s", cut)
        if held <= limit:
            return held
        # the slowest clients of the tenant holding the most, chosen again after each
        tenants: dict[str, list[tuple[float, int, Holder]]] = {}
        for watch in behind:
            if watch.watching and watch.key not in cut:
                rate = watch.rate(now)
                tenants.setdefault(watch.tenant, []).append((rate, watch.held(), watch))
        heaviest = [(-sum(c[1] for c in cs), tenant) for tenant, cs in tenants.items()]
        heapq.heapify(heaviest)
        for clients in tenants.values():
            clients.sort(key=_by_rate, reverse=True)  # the slowest last
        while held > limit and heaviest:
            weight, tenant = heapq.heappop(heaviest)
            clients = tenants[tenant]
            rate, size, watch = clients.pop()
            held -= size
            why = f"{rate:.0f} bytes/s taken, the slowest of the tenant holding the most"
            _cut(watch, f"{why} ({-weight} bytes)", cut)
            if clients:
                heapq.heappush(heaviest, (weight + size, tenant))
        return held


def _cut(member: Holder, why: str, cut: set[object]) -> None:
    """Close ``member``'s connection unless another member closed it in this look."""
    if member.key in cut:
        return
    cut.add(member.key)
    member.shed(why)


def _by_rate(client: tuple[float, int, Holder]) -> float:
    return client[0]


def _since(watch: Holder) -> float:
    return watch.since


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
