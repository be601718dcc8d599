"""The state machine of one stream of the agent link (docs/protocol.md §3, §6, §7), as data.

Everything that decides whether a frame or a command is allowed on a stream lives in this
file: :data:`TRANSITIONS` maps (state, input) to the next state or to a :class:`Fault`.
:class:`~shared.protocol.mux.Connection` looks every stream frame and every stream command up
here and does only what the table allows; ``tests/unit/test_mux.py`` sweeps every state x input
against it.

States are seen from one side of the link. A stream this side opened starts in ``OPEN_SENT``
(until OPEN_OK or OPEN_FAIL), one the peer opened in ``OPEN_RECEIVED`` (until this side
accepts or rejects it). DATA may follow OPEN at once, so either side may half-close (FIN)
before the answer; those states carry the half-close in their name.

Invariants:

- A missing (state, input) entry is a fault: for a frame from the peer a link-level protocol
  error (:data:`Fault.LINK`), for a local command :class:`~shared.errors.InvalidState`
  (:data:`Fault.MISUSE`). Stream-level faults of the peer are explicit :data:`Fault.STREAM`
  entries.
- ``IDLE`` streams were never opened: any frame for one is a link-level error (§3).
- ``CLOSED`` streams (both FINs, RST either way, OPEN_FAIL) are forgotten: frames still in
  flight for them are ignored and commands on them are no-ops, since the peer may have closed
  the stream at any moment (a race, not a misuse).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from shared.enums import FastEnum
from shared.errors import InvalidState


class StreamState(FastEnum):
    IDLE = "idle"
    #: This side sent OPEN; no OPEN_OK/OPEN_FAIL yet.
    OPEN_SENT = "open_sent"
    #: ... and already sent its FIN (a request without a body).
    OPEN_SENT_LOCAL_FIN = "open_sent_local_fin"
    #: ... and the peer sent FIN before its OPEN_OK.
    OPEN_SENT_REMOTE_FIN = "open_sent_remote_fin"
    #: The peer sent OPEN; this side has not answered.
    OPEN_RECEIVED = "open_received"
    #: ... and the peer already sent its FIN.
    OPEN_RECEIVED_REMOTE_FIN = "open_received_remote_fin"
    OPEN = "open"
    #: This side sent FIN; the peer still sends.
    HALF_CLOSED_LOCAL = "half_closed_local"
    #: The peer sent FIN; this side still sends.
    HALF_CLOSED_REMOTE = "half_closed_remote"
    CLOSED = "closed"


class StreamInput(FastEnum):
    # frames from the peer
    RECV_OPEN = "recv OPEN"
    RECV_OPEN_OK = "recv OPEN_OK"
    RECV_OPEN_FAIL = "recv OPEN_FAIL"
    RECV_DATA = "recv DATA"
    RECV_WINDOW = "recv WINDOW"
    RECV_FIN = "recv FIN"
    RECV_RST = "recv RST"
    # commands of this side
    SEND_OPEN = "open_stream"
    ACCEPT = "accept_stream"
    REJECT = "reject_stream"
    SEND_DATA = "send_data"
    SEND_FIN = "send_fin"
    SEND_RST = "reset_stream"


class Fault(FastEnum):
    #: The peer broke the protocol on this stream: reset only the stream (``protocol_error``).
    STREAM = "stream"
    #: The peer broke the protocol of the link: the link fails (``protocol_error``).
    LINK = "link"
    #: This side called a command in a state that does not allow it: :class:`InvalidState`.
    MISUSE = "misuse"


Outcome = StreamState | Fault

S = StreamState
I = StreamInput  # noqa: E741

#: States in which this side may send DATA (credit permitting).
SENDING: Final = frozenset({S.OPEN_SENT, S.OPEN_SENT_REMOTE_FIN, S.OPEN, S.HALF_CLOSED_REMOTE})
#: States in which this side has sent its FIN.
LOCAL_FIN: Final = frozenset({S.OPEN_SENT_LOCAL_FIN, S.HALF_CLOSED_LOCAL})
#: States in which the peer has sent its FIN.
REMOTE_FIN: Final = frozenset(
    {S.OPEN_SENT_REMOTE_FIN, S.OPEN_RECEIVED_REMOTE_FIN, S.HALF_CLOSED_REMOTE}
)
#: States in which OPEN was answered with OPEN_OK (either way).
ACCEPTED: Final = frozenset({S.OPEN, S.HALF_CLOSED_LOCAL, S.HALF_CLOSED_REMOTE})

# Frames every live state takes the same way: WINDOW keeps the state, RST closes, and OPEN for
# an id already in use is a link error (§3).
_LIVE = (
    S.OPEN_SENT,
    S.OPEN_SENT_LOCAL_FIN,
    S.OPEN_SENT_REMOTE_FIN,
    S.OPEN_RECEIVED,
    S.OPEN_RECEIVED_REMOTE_FIN,
    S.OPEN,
    S.HALF_CLOSED_LOCAL,
    S.HALF_CLOSED_REMOTE,
)

TRANSITIONS: Final[dict[tuple[StreamState, StreamInput], Outcome]] = {
    (S.IDLE, I.RECV_OPEN): S.OPEN_RECEIVED,
    (S.IDLE, I.SEND_OPEN): S.OPEN_SENT,
    **{(state, I.RECV_WINDOW): state for state in _LIVE},
    **{(state, I.RECV_RST): S.CLOSED for state in _LIVE},
    **{(state, I.SEND_RST): S.CLOSED for state in _LIVE},
    # this side opened the stream and waits for the answer
    (S.OPEN_SENT, I.RECV_OPEN_OK): S.OPEN,
    (S.OPEN_SENT, I.RECV_OPEN_FAIL): S.CLOSED,
    (S.OPEN_SENT, I.RECV_DATA): Fault.STREAM,  # DATA before OPEN_OK
    (S.OPEN_SENT, I.RECV_FIN): S.OPEN_SENT_REMOTE_FIN,
    (S.OPEN_SENT, I.SEND_DATA): S.OPEN_SENT,
    (S.OPEN_SENT, I.SEND_FIN): S.OPEN_SENT_LOCAL_FIN,
    (S.OPEN_SENT_LOCAL_FIN, I.RECV_OPEN_OK): S.HALF_CLOSED_LOCAL,
    (S.OPEN_SENT_LOCAL_FIN, I.RECV_OPEN_FAIL): S.CLOSED,
    (S.OPEN_SENT_LOCAL_FIN, I.RECV_DATA): Fault.STREAM,
    (S.OPEN_SENT_LOCAL_FIN, I.RECV_FIN): S.CLOSED,
    (S.OPEN_SENT_LOCAL_FIN, I.SEND_DATA): S.OPEN_SENT_LOCAL_FIN,  # nothing is sent
    (S.OPEN_SENT_LOCAL_FIN, I.SEND_FIN): S.OPEN_SENT_LOCAL_FIN,  # nothing is sent
    (S.OPEN_SENT_REMOTE_FIN, I.RECV_OPEN_OK): S.HALF_CLOSED_REMOTE,
    (S.OPEN_SENT_REMOTE_FIN, I.RECV_OPEN_FAIL): S.CLOSED,
    (S.OPEN_SENT_REMOTE_FIN, I.RECV_DATA): Fault.STREAM,
    (S.OPEN_SENT_REMOTE_FIN, I.RECV_FIN): Fault.STREAM,
    (S.OPEN_SENT_REMOTE_FIN, I.SEND_DATA): S.OPEN_SENT_REMOTE_FIN,
    (S.OPEN_SENT_REMOTE_FIN, I.SEND_FIN): S.CLOSED,
    # the peer opened the stream and waits for this side's answer
    (S.OPEN_RECEIVED, I.ACCEPT): S.OPEN,
    (S.OPEN_RECEIVED, I.REJECT): S.CLOSED,
    (S.OPEN_RECEIVED, I.RECV_DATA): S.OPEN_RECEIVED,
    (S.OPEN_RECEIVED, I.RECV_FIN): S.OPEN_RECEIVED_REMOTE_FIN,
    (S.OPEN_RECEIVED_REMOTE_FIN, I.ACCEPT): S.HALF_CLOSED_REMOTE,
    (S.OPEN_RECEIVED_REMOTE_FIN, I.REJECT): S.CLOSED,
    (S.OPEN_RECEIVED_REMOTE_FIN, I.RECV_DATA): Fault.STREAM,  # DATA after FIN
    (S.OPEN_RECEIVED_REMOTE_FIN, I.RECV_FIN): Fault.STREAM,  # second FIN
    # answered: both directions run until their FIN
    (S.OPEN, I.RECV_DATA): S.OPEN,
    (S.OPEN, I.RECV_FIN): S.HALF_CLOSED_REMOTE,
    (S.OPEN, I.SEND_DATA): S.OPEN,
    (S.OPEN, I.SEND_FIN): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_LOCAL, I.RECV_DATA): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_LOCAL, I.RECV_FIN): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, I.SEND_DATA): S.HALF_CLOSED_LOCAL,  # nothing is sent
    (S.HALF_CLOSED_LOCAL, I.SEND_FIN): S.HALF_CLOSED_LOCAL,  # nothing is sent
    (S.HALF_CLOSED_REMOTE, I.RECV_DATA): Fault.STREAM,  # DATA after FIN
    (S.HALF_CLOSED_REMOTE, I.RECV_FIN): Fault.STREAM,  # second FIN
    (S.HALF_CLOSED_REMOTE, I.SEND_DATA): S.HALF_CLOSED_REMOTE,
    (S.HALF_CLOSED_REMOTE, I.SEND_FIN): S.CLOSED,
    # gone: frames in flight are ignored, commands are no-ops, a reused id is a link error
    **{(S.CLOSED, i): S.CLOSED for i in I if i not in (I.RECV_OPEN, I.SEND_OPEN)},
}


def transition(state: StreamState, event: StreamInput) -> Outcome:
    """The outcome of ``event`` in ``state``: the next state or the fault (see the module doc)."""
    outcome = TRANSITIONS.get((state, event))
    if outcome is not None:
        return outcome
    return Fault.LINK if event.name.startswith("RECV_") else Fault.MISUSE


def command(state: StreamState, event: StreamInput, sid: int) -> StreamState:
    """The state after a local command; raises :class:`InvalidState` when it is not allowed."""
    outcome = transition(state, event)
    if isinstance(outcome, Fault):
        raise InvalidState(f"{event.value} is not allowed on stream {sid} in state {state.value}")
    return outcome


@dataclass(slots=True, init=False)
class Stream:
    id: int
    local: bool  # opened by this side
    state: StreamState
    send_credit: int
    recv_window: int
    recv_remaining: int
    recv_unacked: int
    recv_buffered: int
    last_update_at: float | None
    info: dict[str, Any]

    # written out: mypyc compiles it (see shared/protocol/events.py)
    def __init__(
        self,
        id: int,
        local: bool,
        state: StreamState,
        send_credit: int,
        recv_window: int,
        recv_remaining: int,
        recv_unacked: int = 0,
        recv_buffered: int = 0,
        last_update_at: float | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.id = id
        self.local = local
        self.state = state
        self.send_credit = send_credit
        self.recv_window = recv_window
        self.recv_remaining = recv_remaining
        self.recv_unacked = recv_unacked
        self.recv_buffered = recv_buffered
        self.last_update_at = last_update_at
        self.info = {} if info is None else info

    @property
    def accepted(self) -> bool:
        """OPEN was answered with OPEN_OK."""
        return self.state in ACCEPTED

    @property
    def local_fin(self) -> bool:
        """This side sent its FIN."""
        return self.state in LOCAL_FIN

    @property
    def remote_fin(self) -> bool:
        """The peer sent its FIN."""
        return self.state in REMOTE_FIN
