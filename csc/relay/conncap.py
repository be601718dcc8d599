"""The connections a node holds on its public and TCP listeners: at most ``max_connections`` in
all, at most ``client_max_connections`` from one client address. Bounds on the file
descriptors and memory the node's clients can take, whatever they send or do not send, so that
one source opening connections by the thousand cannot starve the node's other clients, nor the
agents that connect through the same listener, and many sources together cannot leave the node
without descriptors for its agent links, its peers, Redis and its database.

A connection counts from its accept. It counts for its address until it closes or becomes an
agent's link (the tenant's ``max_sessions`` bounds those from then on), and for the node until it
closes, agent links included. The address is the connection's peer IP, an IPv6 one by its /64,
as for ``client_stream_share`` (:func:`csc.relay.limits.address_key`). ``max_connections =
auto`` leaves an eighth of the process's open-file limit (``RLIMIT_NOFILE``, at least 64) to
everything else (:func:`node_bound`).

A connection over a bound is refused at once, before any request is read: the public listener
answers 429 ``too_many_connections`` (the address) or 503 ``node_full`` (the node), the TCP
listener the ``ERR`` line of the same code; then it is closed. The refusal lingers (half-closed,
the client's bytes discarded for at most :data:`csc.relay.http_front.LINGER` seconds, so that
the client reads the answer rather than a reset caused by the request it was sending) while
fewer than :data:`MAX_LINGERING` refused connections do; past that, it is closed at once. So
refusals hold at most that many descriptors beyond the bounds, which ``auto`` leaves room for.

Invariants: :attr:`ConnectionCounts.total` is the number of connections taken and not yet
closed; each address's count is the number of its connections taken and neither closed nor
left, and an address whose count drops to 0 is forgotten (the table holds only addresses with
open connections).
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from csc.relay.limits import address_key
from shared.config import AUTO
from shared.errors import CSCError, NodeFull, TooManyConnections
from shared.sendwatch import SendWatches

if TYPE_CHECKING:
    from csc.config import CSCConfig

log = logging.getLogger("csc.ingress")

#: Refused connections that may linger at once; past it, a refusal closes at once.
MAX_LINGERING = 64
#: At most one log line per this many seconds about refused connections (a flood is counted in
#: ``csc_connections_refused_total``, not logged line by line).
LOG_EVERY = 10.0
#: Descriptors ``max_connections = auto`` leaves to everything else, at least
#: (:data:`MAX_LINGERING` refusals included).
RESERVED_FDS = 64
#: A node bound from ``auto`` below this is worth a warning at start (a login shell's usual
#: limit of 1024 leaves 960).
LOW_NODE_BOUND = 4096


def node_bound(setting: int) -> int | None:
    """The node's ``max_connections``: the setting, or for ``auto`` the soft open-file limit
    less an eighth of it (at least :data:`RESERVED_FDS`); None when that limit is unlimited."""
    if setting != AUTO:
        return setting
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(1, soft - max(RESERVED_FDS, soft // 8))


class LogTally:
    """Events worth a log line that may come by the thousand: at most one line per
    :data:`LOG_EVERY`, saying how many came since the last."""

    __slots__ = ("_logged", "_unlogged")

    def __init__(self) -> None:
        self._logged = float("-inf")
        self._unlogged = 0

    def due(self) -> int:
        """Count one event; how many to report now (0: no line yet)."""
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged < LOG_EVERY:
            return 0
        count, self._logged, self._unlogged = self._unlogged, now, 0
        return count


class ConnectionCounts:
    """Open connections of one node's public and TCP listeners, in all and per address."""

    __slots__ = (
        "_open",
        "_tally",
        "cap",
        "lingering",
        "node_cap",
        "on_refused",
        "on_stalled",
        "total",
        "watches",
    )

    def __init__(
        self,
        cap: int | None,
        node_cap: int | None = None,
        on_refused: Callable[[str, str], None] | None = None,
        on_stalled: Callable[[str, bool], None] | None = None,
        watches: SendWatches | None = None,
    ) -> None:
        #: ``client_max_connections``, and the node's bound (None: no bound)
        self.cap, self.node_cap = cap, node_cap
        #: called with the listener (``http``, ``tcp``) and the reason of every refusal
        #: (``client_connections``, ``node_connections``)
        self.on_refused = on_refused
        #: called with the listener of every connection closed by its send deadline, and
        #: whether it was closed early for ``client_buffer_limit`` (shed)
        self.on_stalled = on_stalled
        #: the send deadlines running, and their bound in all (shared/sendwatch.py)
        self.watches = watches if watches is not None else SendWatches(None, 60.0)
        self.total = 0
        #: refused connections lingering now (see the module docstring)
        self.lingering = 0
        self._open: dict[str, int] = {}
        self._tally = LogTally()

    @classmethod
    def from_config(
        cls,
        config: CSCConfig,
        on_refused: Callable[[str, str], None] | None = None,
        on_stalled: Callable[[str, bool], None] | None = None,
    ) -> ConnectionCounts:
        """The bounds ``config`` sets (``max_connections = auto`` resolved now)."""
        bound = node_bound(config.max_connections)
        watches = SendWatches(config.client_buffer_limit, config.client_send_timeout)
        return cls(config.client_max_connections, bound, on_refused, on_stalled, watches)

    def stalled(self, listener: str, shed: bool) -> None:
        """A connection of ``listener`` was closed because its client stopped taking the
        bytes waiting for it: at its send deadline (``client_send_timeout``), or early, to
        bring the node back under ``client_buffer_limit`` (``shed``; shared/sendwatch.py)."""
        if self.on_stalled is not None:
            self.on_stalled(listener, shed)

    def describe(self) -> str:
        """The bounds, for the start-up log."""
        node = "no bound" if self.node_cap is None else f"at most {self.node_cap}"
        client = "off" if self.cap is None else f"at most {self.cap}"
        limit = self.watches.limit
        held = "no bound" if limit is None else f"at most {limit} bytes"
        return (
            f"connections on the public and TCP listeners: {node}; per client address: "
            f"{client}; held for slow clients and portals: {held}"
        )

    def take(self, ip: str, listener: str) -> str | CSCError:
        """Count a new connection from ``ip``: its address key (hand it to :meth:`close`,
        or to :meth:`leave` first), or the refusal when a bound is reached."""
        if self.node_cap is not None and self.total >= self.node_cap:
            self._refused(listener, "node_connections")
            return NodeFull(f"the node holds the {self.node_cap} connections it may; try another")
        key = address_key(ip)
        held = self._open.get(key, 0)
        if self.cap is not None and held >= self.cap:
            self._refused(listener, "client_connections")
            return TooManyConnections(
                f"too many connections from your address (at most {self.cap} at once)"
            )
        self._open[key] = held + 1
        self.total += 1
        return key

    def leave(self, key: str) -> None:
        """The connection counted under ``key`` became an agent's link: its address no longer
        counts it; the node does until :meth:`close` (with None)."""
        held = self._open.get(key, 0) - 1
        if held > 0:
            self._open[key] = held
        else:
            self._open.pop(key, None)

    def close(self, key: str | None) -> None:
        """A connection taken closed; ``key`` None if it had left its address already."""
        self.total -= 1
        if key is not None:
            self.leave(key)

    def may_linger(self) -> bool:
        """Whether a refused connection may linger (then it is counted in :attr:`lingering`
        until it ends)."""
        if self.lingering >= MAX_LINGERING:
            return False
        self.lingering += 1
        return True

    def linger_done(self) -> None:
        """A refused connection that :meth:`may_linger` let linger has ended."""
        self.lingering -= 1

    def held(self, ip: str) -> int:
        """Connections counted for ``ip``'s address now."""
        return self._open.get(address_key(ip), 0)

    @property
    def addresses(self) -> int:
        """Addresses with at least one counted connection."""
        return len(self._open)

    def _refused(self, listener: str, reason: str) -> None:
        if self.on_refused is not None:
            self.on_refused(listener, reason)
        if count := self._tally.due():
            log.warning(
                "refused %d connection(s) in the last %g s: the node holds %d (max_connections "
                "%s), or an address held client_max_connections (%s)",
                count,
                LOG_EVERY,
                self.total,
                self.node_cap,
                self.cap,
            )
