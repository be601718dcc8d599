"""Stream multiplexer of the agent link (docs/protocol.md §3-§7), sans-I/O.

:class:`Connection` is one side of one link. Bytes from the peer go in through
:meth:`Connection.receive_data`; events come out of :meth:`Connection.events`; bytes to write
come out of :meth:`Connection.data_to_send`. Commands (open, accept, send data, credit, reset,
go away, ping) only queue frames. The caller passes the time (``now``, seconds on any monotonic
clock) wherever it matters; nothing here sleeps or reads a clock.

Invariants:

- A sender never has more DATA bytes in flight on a stream than the receiver granted
  (``Stream.send_credit`` never goes below zero); a receiver that gets more resets that stream
  with ``flow_control`` and the link carries on.
- Credit goes back only for bytes the caller reports consumed (:meth:`Connection.consumed`).
- Receive windows grow only while their sum is below ``session_budget`` and never push it
  above: the growth beyond ``initial_window`` summed over live streams stays within
  ``session_budget - initial_window``, so the sum of the windows stays within
  ``session_budget + (live_streams - 1) * initial_window`` (§5). Credit already granted is never
  taken back, so streams opened after a window grew still get ``initial_window`` each.
- Link-level faults raise a :class:`~shared.errors.ProtocolError` subclass from
  :meth:`Connection.receive_data`; stream-level faults reset only that stream.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from shared.errors import (
    CSCError,
    FlowControlError,
    GoingAway,
    HeadersTooLarge,
    HeartbeatTimeout,
    ProtocolError,
    TooManyStreams,
    VersionUnsupported,
)
from shared.protocol.codec import (
    FLAG_ACK,
    FLAG_FIN,
    HARD_MAX_PAYLOAD,
    MAX_WINDOW_INCREMENT,
    VERSION,
    VERSION_MAJOR,
    Frame,
    FrameDecoder,
    FrameType,
    decode_json,
    decode_u32,
    encode_frame,
    encode_header,
    encode_json,
    encode_u32,
)
from shared.protocol.events import (
    DataReceived,
    Event,
    GoAwayReceived,
    HelloReceived,
    PongReceived,
    SendCreditAvailable,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamRejected,
    StreamReset,
    WelcomeReceived,
)

MIN_FRAME = 16 * 1024
DEFAULT_MAX_STREAMS = 1024
#: At most this factor of window growth per WINDOW update (docs/protocol.md §5).
MAX_GROWTH = 8
MAX_MESSAGE = 1000  # characters of an error message on the wire; 6 bytes each at most in JSON


class LinkLimits(Protocol):
    """The flow-control and heartbeat settings a program's configuration carries."""

    @property
    def initial_window(self) -> int: ...
    @property
    def max_window(self) -> int: ...
    @property
    def session_budget(self) -> int: ...
    @property
    def max_frame(self) -> int: ...
    @property
    def heartbeat_interval(self) -> float: ...
    @property
    def heartbeat_timeout(self) -> float: ...


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """What this side grants its peer; sent in HELLO/WELCOME (docs/protocol.md §4)."""

    initial_window: int = 256 * 1024
    max_window: int = 64 * 1024 * 1024
    session_budget: int = 128 * 1024 * 1024
    max_frame: int = 256 * 1024
    max_streams: int = DEFAULT_MAX_STREAMS
    heartbeat_interval: float = 10.0
    heartbeat_timeout: float = 30.0

    @classmethod
    def from_config(cls, config: LinkLimits, *, max_streams: int | None = None) -> LinkSettings:
        return cls(
            initial_window=config.initial_window,
            max_window=config.max_window,
            session_budget=config.session_budget,
            max_frame=config.max_frame,
            max_streams=DEFAULT_MAX_STREAMS if max_streams is None else max_streams,
            heartbeat_interval=config.heartbeat_interval,
            heartbeat_timeout=config.heartbeat_timeout,
        )

    def to_wire(self) -> dict[str, int]:
        return {
            "initial_window": self.initial_window,
            "max_frame": self.max_frame,
            "max_streams": self.max_streams,
        }


class Side(Enum):
    CLIENT = "client"  # dials the link (the agent); opens odd stream ids
    SERVER = "server"  # accepts the link (the CSC); opens even stream ids


class LinkState(Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(slots=True)
class Stream:
    id: int
    local: bool  # opened by this side
    accepted: bool
    send_credit: int
    recv_window: int
    recv_remaining: int
    recv_unacked: int = 0
    recv_buffered: int = 0
    local_fin: bool = False
    remote_fin: bool = False
    last_update_at: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PeerSettings:
    initial_window: int
    max_frame: int
    max_streams: int


def _peer_settings(info: dict[str, Any]) -> PeerSettings:
    raw = info.get("settings")
    if not isinstance(raw, dict):
        raise ProtocolError("handshake lacks a 'settings' object")
    values: dict[str, int] = {}
    bounds = {
        "initial_window": (1024, MAX_WINDOW_INCREMENT),
        "max_frame": (MIN_FRAME, HARD_MAX_PAYLOAD),
        "max_streams": (1, 2**20),
    }
    for key, (low, high) in bounds.items():
        value = raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ProtocolError(f"handshake setting {key!r} must be an integer in [{low}, {high}]")
        values[key] = value
    return PeerSettings(**values)


def _check_version(info: dict[str, Any]) -> None:
    version = info.get("version")
    if not isinstance(version, str):
        raise ProtocolError("handshake lacks a 'version' string")
    major, _, _ = version.partition(".")
    if major != str(VERSION_MAJOR):
        raise VersionUnsupported(
            f"peer speaks protocol {version}, this side speaks {VERSION}: "
            "please update the older side"
        )


class Connection:
    """One side of an agent link: the stream multiplexer and its flow control."""

    def __init__(
        self, side: Side, settings: LinkSettings, *, accept_streams: bool, now: float
    ) -> None:
        self.side = side
        self.settings = settings
        self.accept_streams = accept_streams
        self.state = LinkState.HANDSHAKE
        self.peer: PeerSettings | None = None
        self.streams: dict[int, Stream] = {}
        self.rtt: float | None = None
        self.local_going_away = False
        self.peer_going_away = False
        self._decoder = FrameDecoder(settings.max_frame)
        self._out: list[bytes | memoryview] = []
        self._events: list[Event] = []
        self._next_id = 1 if side is Side.CLIENT else 2
        self._max_remote_id = 0
        self._counts = {True: 0, False: 0}  # live streams opened locally / by the peer
        self._last_remote_accepted = 0
        self._window_total = 0
        self._last_received = now
        self._last_ping_sent: float | None = None
        self._ping_outstanding: tuple[bytes, float] | None = None
        #: when the peer's last PING (not an ACK) arrived
        self._last_peer_ping: float | None = None

    # -- I/O ---------------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        """Feed bytes from the peer. Raises a ProtocolError subclass on a link-level fault."""
        if self.state is LinkState.CLOSED:
            return
        self._last_received = now
        try:
            for frame in self._decoder.feed(data):
                self._handle(frame, now)
        except CSCError:
            self.state = LinkState.CLOSED
            raise

    def events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[bytes | memoryview]:
        out, self._out = self._out, []
        return out

    @property
    def has_output(self) -> bool:
        return bool(self._out)

    # -- handshake ---------------------------------------------------------------------------

    def send_hello(self, info: dict[str, Any]) -> None:
        assert self.side is Side.CLIENT and self.state is LinkState.HANDSHAKE
        payload = {**info, "version": VERSION, "settings": self.settings.to_wire()}
        self._out.append(encode_frame(FrameType.HELLO, 0, 0, encode_json(payload)))

    def send_welcome(self, info: dict[str, Any], now: float) -> None:
        assert self.side is Side.SERVER and self.peer is not None
        payload = {**info, "version": VERSION, "settings": self.settings.to_wire()}
        self._out.append(encode_frame(FrameType.WELCOME, 0, 0, encode_json(payload)))
        self.state = LinkState.OPEN
        self.ping(now)

    # -- streams -----------------------------------------------------------------------------

    def open_stream(self, info: dict[str, Any]) -> int:
        """Queue OPEN for a new stream and return its id; DATA may follow at once."""
        peer = self._require_open()
        if self.peer_going_away or self.local_going_away:
            raise GoingAway("the link is draining")
        limit = min(peer.max_streams, self.settings.max_streams)
        if self._counts[True] >= limit:
            raise TooManyStreams(f"the link allows {limit} concurrent streams")
        payload = self._head_payload(info)
        sid = self._next_id
        self._next_id += 2
        self._add_stream(sid, local=True, accepted=False, info=info)
        self._out.append(encode_frame(FrameType.OPEN, 0, sid, payload))
        return sid

    def accept_stream(self, sid: int, info: dict[str, Any]) -> None:
        stream = self.streams.get(sid)
        if stream is None or stream.local or stream.accepted:
            return
        payload = self._head_payload(info)
        stream.accepted = True
        self._out.append(encode_frame(FrameType.OPEN_OK, 0, sid, payload))

    def reject_stream(self, sid: int, code: str, message: str) -> None:
        stream = self.streams.get(sid)
        if stream is None or stream.local or stream.accepted:
            return
        payload = _error_payload(code, message)
        self._out.append(encode_frame(FrameType.OPEN_FAIL, 0, sid, payload))
        self._remove(sid)

    def send_credit(self, sid: int) -> int:
        stream = self.streams.get(sid)
        if stream is None or stream.local_fin or not (stream.local or stream.accepted):
            return 0
        return stream.send_credit

    def send_data(self, sid: int, data: bytes | memoryview, *, fin: bool = False) -> int:
        """Queue as much of ``data`` as the stream's credit allows; return the bytes taken.

        With ``fin``, the last frame carries FIN when all of ``data`` was taken.
        """
        stream = self.streams.get(sid)
        if stream is None or stream.local_fin:
            return 0
        if not stream.local and not stream.accepted:
            raise ProtocolError("DATA before the stream was accepted")
        assert self.peer is not None
        total = len(data)
        take = min(total, stream.send_credit)
        view = memoryview(data) if not isinstance(data, memoryview) else data
        max_frame = self.peer.max_frame
        pos = 0
        while pos < take or (pos == 0 and take == 0 and fin and total == 0):
            size = min(max_frame, take - pos)
            last = pos + size >= take
            flags = FLAG_FIN if (fin and last and take == total) else 0
            self._out.append(encode_header(FrameType.DATA, flags, sid, size))
            if size:
                self._out.append(view[pos : pos + size])
            pos += size
            if size == 0:
                break
        stream.send_credit -= take
        if fin and take == total:
            self._local_fin(stream)
        return take

    def send_fin(self, sid: int) -> None:
        stream = self.streams.get(sid)
        if stream is None or stream.local_fin:
            return
        self._out.append(encode_frame(FrameType.FIN, 0, sid))
        self._local_fin(stream)

    def reset_stream(self, sid: int, code: str, message: str = "") -> None:
        if sid not in self.streams:
            return
        payload = _error_payload(code, message)
        self._out.append(encode_frame(FrameType.RST, 0, sid, payload))
        self._remove(sid)

    def consumed(self, sid: int, nbytes: int, now: float) -> None:
        """Report ``nbytes`` of the stream's received data as delivered; may grant credit."""
        stream = self.streams.get(sid)
        if stream is None or nbytes <= 0:
            return
        stream.recv_buffered -= nbytes
        if stream.remote_fin:
            return
        stream.recv_unacked += nbytes
        if stream.recv_unacked < self._update_threshold(stream):
            return
        increment = stream.recv_unacked + self._grow(stream, now)
        stream.recv_unacked = 0
        stream.recv_remaining += increment
        stream.last_update_at = now
        self._out.append(encode_frame(FrameType.WINDOW, 0, sid, encode_u32(increment)))

    # -- link --------------------------------------------------------------------------------

    def go_away(self, code: str = "going_away", message: str = "") -> None:
        if self.local_going_away or self.state is LinkState.CLOSED:
            return
        self.local_going_away = True
        payload = _error_payload(code, message, last_stream_id=self._max_remote_id)
        self._out.append(encode_frame(FrameType.GOAWAY, 0, 0, payload))

    def ping(self, now: float) -> None:
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

    def close(self) -> list[int]:
        """Mark the link closed; return the ids of the streams that were still live."""
        self.state = LinkState.CLOSED
        ids = list(self.streams)
        for sid in ids:
            self._remove(sid)
        return ids

    @property
    def active_streams(self) -> int:
        return len(self.streams)

    @property
    def window_total(self) -> int:
        return self._window_total

    # -- internals ---------------------------------------------------------------------------

    def _head_payload(self, info: dict[str, Any]) -> bytes:
        """OPEN / OPEN_OK payload; refused locally when the peer could not decode it (§6)."""
        payload = encode_json(info)
        assert self.peer is not None
        if len(payload) > self.peer.max_frame:
            raise HeadersTooLarge(f"{len(payload)} bytes exceed the peer's frame size")
        return payload

    def _require_open(self) -> PeerSettings:
        if self.state is not LinkState.OPEN or self.peer is None:
            raise ProtocolError("the link is not open")
        return self.peer

    def _add_stream(self, sid: int, *, local: bool, accepted: bool, info: dict[str, Any]) -> None:
        assert self.peer is not None
        window = self.settings.initial_window
        self.streams[sid] = Stream(
            id=sid,
            local=local,
            accepted=accepted,
            send_credit=self.peer.initial_window,
            recv_window=window,
            recv_remaining=window,
            info=info,
        )
        self._window_total += window
        self._counts[local] += 1

    def _remove(self, sid: int) -> None:
        stream = self.streams.pop(sid, None)
        if stream is not None:
            self._window_total -= stream.recv_window
            self._counts[stream.local] -= 1

    def _local_fin(self, stream: Stream) -> None:
        stream.local_fin = True
        if stream.remote_fin:
            self._remove(stream.id)

    def _update_threshold(self, stream: Stream) -> int:
        """Credit goes back after half the initial window, or a quarter of a grown one (§5):
        on a long link a grown window must be refilled well before the sender runs dry."""
        window = stream.recv_window
        return window // 2 if window <= self.settings.initial_window else window // 4

    def _grow(self, stream: Stream, now: float) -> int:
        """Auto-tuning (§5): when the window, not the consumer, limits the rate, grow it toward
        twice the measured rate x RTT: at least doubling, at most MAX_GROWTH-fold per update."""
        s = self.settings
        if self.rtt is None or stream.last_update_at is None:
            return 0
        rtt = max(self.rtt, 0.001)
        interval = now - stream.last_update_at
        if interval >= 2 * rtt:
            return 0
        window = stream.recv_window
        rate = stream.recv_unacked / max(interval, 1e-6)  # bytes/s consumed since last update
        target = min(MAX_GROWTH * window, max(2 * window, int(2 * rate * rtt)))
        room = max(s.session_budget - self._window_total, 0)
        delta = min(target - window, s.max_window - window, room)
        if delta <= 0:
            return 0
        stream.recv_window += delta
        self._window_total += delta
        return delta

    def _stream_error(self, sid: int, err: CSCError) -> None:
        self.reset_stream(sid, err.code, err.message)
        self._events.append(StreamReset(sid, err.code, err.message, remote=False))

    def _handle(self, frame: Frame, now: float) -> None:
        ftype = frame.type
        if self.state is LinkState.HANDSHAKE:
            self._handle_handshake(frame, now)
            return
        if ftype == FrameType.DATA:
            self._on_data(frame)
        elif ftype == FrameType.WINDOW:
            self._on_window(frame)
        elif ftype == FrameType.OPEN:
            self._on_open(frame)
        elif ftype in (FrameType.OPEN_OK, FrameType.OPEN_FAIL):
            self._on_open_answer(frame)
        elif ftype == FrameType.FIN:
            self._on_fin(frame.stream_id)
        elif ftype == FrameType.RST:
            self._on_rst(frame)
        elif ftype == FrameType.PING:
            self._on_ping(frame, now)
        elif ftype == FrameType.GOAWAY:
            self._on_goaway(frame)
        elif ftype in (FrameType.HELLO, FrameType.WELCOME):
            raise ProtocolError(f"{FrameType(ftype).name} after the handshake")
        # unknown types of a newer minor version are ignored (§2)

    def _handle_handshake(self, frame: Frame, now: float) -> None:
        expected = FrameType.HELLO if self.side is Side.SERVER else FrameType.WELCOME
        if frame.type == FrameType.PING and self.side is Side.CLIENT:
            self._on_ping(frame, now)
            return
        if frame.type != expected:
            raise ProtocolError(f"expected {expected.name}, got frame type {frame.type}")
        info = decode_json(frame.payload, expected.name)
        _check_version(info)
        self.peer = _peer_settings(info)
        if expected is FrameType.HELLO:
            self._events.append(HelloReceived(info))
        else:
            self.state = LinkState.OPEN
            self._events.append(WelcomeReceived(info))
            self.ping(now)

    def _known_or_closed(self, sid: int) -> Stream | None:
        """The live stream ``sid``, or None for a stream that existed and is gone."""
        stream = self.streams.get(sid)
        if stream is not None:
            return stream
        own = (sid % 2 == 1) == (self.side is Side.CLIENT)
        if (own and sid >= self._next_id) or (not own and sid > self._max_remote_id):
            raise ProtocolError(f"frame for stream {sid}, which was never opened")
        return None

    def _on_data(self, frame: Frame) -> None:
        sid = frame.stream_id
        stream = self._known_or_closed(sid)
        if stream is None:
            return
        size = len(frame.payload)
        if stream.remote_fin:
            self._stream_error(sid, ProtocolError("DATA after FIN"))
            return
        if stream.local and not stream.accepted:
            self._stream_error(sid, ProtocolError("DATA before OPEN_OK"))
            return
        if size > stream.recv_remaining:
            self._stream_error(
                sid, FlowControlError(f"{size} bytes beyond a window of {stream.recv_remaining}")
            )
            return
        stream.recv_remaining -= size
        stream.recv_buffered += size
        if size:
            self._events.append(DataReceived(sid, frame.payload))
        if frame.flags & FLAG_FIN:
            self._on_fin(sid)

    def _on_window(self, frame: Frame) -> None:
        stream = self._known_or_closed(frame.stream_id)
        if stream is None:
            return
        increment = decode_u32(frame.payload)
        if increment == 0 or stream.send_credit + increment > MAX_WINDOW_INCREMENT:
            self._stream_error(stream.id, FlowControlError(f"invalid WINDOW of {increment}"))
            return
        stream.send_credit += increment
        self._events.append(SendCreditAvailable(stream.id))

    def _on_open(self, frame: Frame) -> None:
        sid = frame.stream_id
        remote_parity = 0 if self.side is Side.CLIENT else 1
        if sid % 2 != remote_parity % 2 or sid <= self._max_remote_id:
            raise ProtocolError(f"OPEN with invalid stream id {sid}")
        self._max_remote_id = sid
        info = decode_json(frame.payload, "OPEN")
        if not self.accept_streams:
            raise ProtocolError("this side does not accept streams")
        if self.local_going_away:
            payload = encode_json({"code": "going_away", "message": "draining"})
            self._out.append(encode_frame(FrameType.OPEN_FAIL, 0, sid, payload))
            return
        if self._counts[False] >= self.settings.max_streams:
            payload = encode_json({"code": "too_many_streams", "message": "stream limit"})
            self._out.append(encode_frame(FrameType.OPEN_FAIL, 0, sid, payload))
            return
        self._add_stream(sid, local=False, accepted=False, info=info)
        self._events.append(StreamOpened(sid, info))

    def _on_open_answer(self, frame: Frame) -> None:
        sid = frame.stream_id
        stream = self._known_or_closed(sid)
        if stream is None:
            return
        if not stream.local or stream.accepted:
            raise ProtocolError(f"unexpected {FrameType(frame.type).name} on stream {sid}")
        info = decode_json(frame.payload, FrameType(frame.type).name)
        if frame.type == FrameType.OPEN_OK:
            stream.accepted = True
            self._events.append(StreamAccepted(sid, info))
            return
        code, message = _code_message(info)
        self._remove(sid)
        self._events.append(StreamRejected(sid, code, message))

    def _on_fin(self, sid: int) -> None:
        stream = self._known_or_closed(sid)
        if stream is None:
            return
        if stream.remote_fin:
            self._stream_error(sid, ProtocolError("second FIN"))
            return
        stream.remote_fin = True
        self._events.append(StreamEnded(sid))
        if stream.local_fin:
            self._remove(sid)

    def _on_rst(self, frame: Frame) -> None:
        sid = frame.stream_id
        if self._known_or_closed(sid) is None:
            return
        code, message = _code_message(decode_json(frame.payload, "RST"))
        self._remove(sid)
        self._events.append(StreamReset(sid, code, message, remote=True))

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

    def _on_goaway(self, frame: Frame) -> None:
        info = decode_json(frame.payload, "GOAWAY")
        code, message = _code_message(info)
        last = info.get("last_stream_id", 0)
        if not isinstance(last, int):
            raise ProtocolError("GOAWAY last_stream_id must be an integer")
        self.peer_going_away = True
        self._events.append(GoAwayReceived(last, code, message))


def _error_payload(code: str, message: str, **extra: Any) -> bytes:
    """OPEN_FAIL / RST / GOAWAY payload; the message is capped so it fits any frame (§6)."""
    return encode_json({"code": code, "message": message[:MAX_MESSAGE], **extra})


def _code_message(info: dict[str, Any]) -> tuple[str, str]:
    code, message = info.get("code"), info.get("message", "")
    if not isinstance(code, str) or not isinstance(message, str):
        raise ProtocolError("error frame needs string 'code' and 'message'")
    return code, message[:MAX_MESSAGE]
