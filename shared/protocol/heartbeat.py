"""The heartbeat half of the link multiplexer (docs/protocol.md §7), sans-I/O: PING and its ACK,
the RTT sample, the silence deadline, and the short way a lone PING is answered.

:class:`Heartbeat` is a base of :class:`shared.protocol.mux.Connection` and works on its state
(declared here); it never reads a clock: the caller passes ``now``.

Invariants: a link that received nothing for ``heartbeat_timeout`` raises
:class:`~shared.errors.HeartbeatTimeout` from :meth:`Heartbeat.handle_timer` (and is closed);
no PING is sent before the handshake is done; a server skips its PING while an idle client
keeps pinging it (§7); a PING is answered with an ACK carrying the same 8 bytes.
"""

from __future__ import annotations

import os

from shared.errors import HeartbeatTimeout
from shared.protocol.codec import (
    FLAG_ACK,
    HEADER_SIZE,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
)
from shared.protocol.events import Event, PongReceived
from shared.protocol.settings import LinkSettings, LinkState, Side
from shared.protocol.stream_state import Stream

#: A whole PING without ACK as it arrives (header, then its 8 bytes), and its answer's header
#: (see :meth:`Connection.answer_ping`).
PING_SIZE = HEADER_SIZE + 8
_PING_HEAD = encode_frame(FrameType.PING, 0, 0, bytes(8))[:HEADER_SIZE]
_ACK_HEAD = encode_frame(FrameType.PING, FLAG_ACK, 0, bytes(8))[:HEADER_SIZE]


class Heartbeat:
    """PING, ACK and liveness of one side of a link (a base of ``Connection``)."""

    # the connection's state these methods use (set by Connection.__init__)
    side: Side
    settings: LinkSettings
    state: LinkState
    streams: dict[int, Stream]
    rtt: float | None
    _decoder: FrameDecoder
    _out: list[bytes | memoryview]
    _events: list[Event]
    _last_received: float
    _last_ping_sent: float | None
    _ping_outstanding: tuple[bytes, float] | None
    _last_peer_ping: float | None

    def answer_ping(self, data: bytes, now: float) -> bytes | None:
        """The heartbeat's short way (§7): when ``data`` is exactly one PING without ACK, on an
        open link whose decoder holds no part of a frame, take it as :meth:`receive_data`
        would (liveness, the peer's PING time) and return its ACK, for the caller to send
        itself (nothing is queued); else None, and nothing changed: feed ``data`` as usual."""
        if (
            len(data) != PING_SIZE
            or not data.startswith(_PING_HEAD)
            or self.state is not LinkState.OPEN
            or self._decoder.buffered
        ):
            return None
        self._last_received = self._last_peer_ping = now
        return _ACK_HEAD + data[HEADER_SIZE:]

    def ping(self, now: float) -> None:
        """Queue a PING with a fresh token; its PONG gives an RTT sample (:class:`PongReceived`).

        Any time; :meth:`handle_timer` calls it when the heartbeat is due.
        """
        token = os.urandom(8)
        self._ping_outstanding = (token, now)
        self._last_ping_sent = now
        self._out.append(encode_frame(FrameType.PING, 0, 0, token))

    def next_deadline(self) -> float:
        """When :meth:`handle_timer` next has something to do."""
        s = self.settings
        timeout_at = self._last_received + s.heartbeat_timeout
        if self.state is not LinkState.OPEN:
            return timeout_at  # no heartbeat before the handshake completes: nothing else due
        base = self._last_ping_sent if self._last_ping_sent is not None else self._last_received
        return min(base + s.heartbeat_interval, timeout_at)

    def handle_timer(self, now: float) -> None:
        """Send the heartbeat when due; raise HeartbeatTimeout when the peer went silent."""
        s = self.settings
        if now >= self._last_received + s.heartbeat_timeout:  # same sum as next_deadline()
            self.state = LinkState.CLOSED
            raise HeartbeatTimeout(f"nothing received for {now - self._last_received:.1f} s")
        last = self._last_ping_sent
        if self.state is LinkState.OPEN and (last is None or now >= last + s.heartbeat_interval):
            if self._peer_keeps_pinging(now):
                self._last_ping_sent = now  # this turn is answered: our ACK went out (§7)
            else:
                self.ping(now)

    def _peer_keeps_pinging(self, now: float) -> bool:
        """Whether the server may skip its PING (§7): no stream is open (no RTT needed) and a
        PING from the client arrived within 1.5 heartbeat intervals (it heard our ACK)."""
        peer = self._last_peer_ping
        return (
            self.side is Side.SERVER
            and not self.streams
            and peer is not None
            and now - peer <= 1.5 * self.settings.heartbeat_interval
        )

    def _on_ping(self, frame: Frame, now: float) -> None:
        if not frame.flags & FLAG_ACK:
            self._out.append(encode_frame(FrameType.PING, FLAG_ACK, 0, bytes(frame.payload)))
            self._last_peer_ping = now
            return
        outstanding = self._ping_outstanding
        if outstanding is not None and outstanding[0] == bytes(frame.payload):
            sample = max(now - outstanding[1], 0.0)
            self.rtt = sample if self.rtt is None else 0.875 * self.rtt + 0.125 * sample
            self._ping_outstanding = None
            self._events.append(PongReceived(sample))
