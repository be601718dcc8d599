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
- With a :class:`~shared.protocol.windows.GrowthPool` (``pool``), growth also stays within
  the pool's room, and the pool holds exactly the growth of this link's live streams (given
  back when a stream ends or the link closes).
- OPEN / OPEN_OK heads are binary (shared/protocol/heads.py, flag BINARY) only when both sides
  announced 1.1 or later (``binary_heads``), and only for heads the binary layout carries
  exactly; all others are JSON. A binary head is accepted only under the same condition.
- Link-level faults raise a :class:`~shared.errors.ProtocolError` subclass from
  :meth:`Connection.receive_data`; stream-level faults reset only that stream.
- A stream's state changes only as :data:`shared.protocol.stream_state.TRANSITIONS` says; a
  command the table does not allow raises :class:`~shared.errors.InvalidState` (a bug of the
  caller, not the peer's fault) and queues nothing.
"""

from __future__ import annotations

from typing import Any

from shared.errors import (
    CSCError,
    FlowControlError,
    GoingAway,
    HeadersTooLarge,
    InvalidState,
    ProtocolError,
    TooManyStreams,
)
from shared.protocol import heads
from shared.protocol.codec import (
    CLUSTER_MINOR,
    FLAG_BINARY,
    FLAG_FIN,
    MAX_CLUSTER_NODES,
    MAX_WINDOW_INCREMENT,
    Frame,
    FrameDecoder,
    FrameType,
    code_message,
    decode_json,
    decode_u32,
    encode_data,
    encode_frame,
    encode_json,
    encode_u32,
    error_payload,
)
from shared.protocol.events import (
    ClusterChanged,
    DataReceived,
    Event,
    GoAwayReceived,
    HelloReceived,
    SendCreditAvailable,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamRejected,
    StreamReset,
    WelcomeReceived,
)
from shared.protocol.heartbeat import Heartbeat
from shared.protocol.settings import (
    LinkSettings,
    LinkState,
    PeerSettings,
    Side,
    check_version,
    peer_minor,
    peer_settings,
)
from shared.protocol.stream_state import (
    LOCAL_FIN,
    SENDING,
    Fault,
    Stream,
    StreamInput,
    StreamState,
    command,
    transition,
)
from shared.protocol.windows import GrowthPool, update_threshold, window_growth


class Connection(Heartbeat):
    """One side of an agent link: the stream multiplexer and its flow control."""

    def __init__(
        self, side: Side, settings: LinkSettings, *, accept_streams: bool, now: float
    ) -> None:
        self.side = side
        self.settings = settings
        self.accept_streams = accept_streams
        self.state = LinkState.HANDSHAKE
        self.peer: PeerSettings | None = None
        #: both sides announced 1.1 or later: heads go binary (§6.1), known once the
        #: handshake is done
        self.binary_heads = False
        #: a node relaying forwarded streams (csc/cluster/peer.py): binary OPENs that name a
        #: tenant are only peeked at (:func:`heads.peek_open`), their rest passed on as it is
        self.pass_opens = False
        #: the minor version both sides speak (the smaller one announced), known once the
        #: handshake is done
        self.minor = 0
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
        self._window_total = 0
        #: shared bound on window growth with other links (None: this link's budget only)
        self.pool: GrowthPool | None = None
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
        """The events since the last call, oldest first (each is returned once)."""
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[bytes | memoryview]:
        """The bytes queued since the last call, to be written in order (each returned once)."""
        out, self._out = self._out, []
        return out

    @property
    def has_output(self) -> bool:
        """Whether :meth:`data_to_send` has something."""
        return bool(self._out)

    # -- handshake ---------------------------------------------------------------------------

    def send_hello(self, info: dict[str, Any]) -> None:
        """Queue HELLO with ``info``, version and settings (§4): the client, once, first."""
        if self.side is not Side.CLIENT or self.state is not LinkState.HANDSHAKE:
            raise InvalidState(f"send_hello on the {self.side.value} side in {self.state.value}")
        payload = {**info, "version": self.settings.version, "settings": self.settings.to_wire()}
        self._out.append(encode_frame(FrameType.HELLO, 0, 0, encode_json(payload)))

    def send_welcome(self, info: dict[str, Any], now: float) -> None:
        """Queue WELCOME with ``info``, version and settings and a first PING, and open the link
        (§4): the server, once, after :class:`HelloReceived`."""
        if self.side is not Side.SERVER or self.state is not LinkState.HANDSHAKE or not self.peer:
            raise InvalidState(f"send_welcome on the {self.side.value} side before HELLO")
        payload = {**info, "version": self.settings.version, "settings": self.settings.to_wire()}
        self._out.append(encode_frame(FrameType.WELCOME, 0, 0, encode_json(payload)))
        self.state = LinkState.OPEN
        self.ping(now)

    # -- streams -----------------------------------------------------------------------------

    def open_stream(self, info: dict[str, Any]) -> int:
        """Queue OPEN for a new stream and return its id; DATA may follow at once.

        Before the handshake: :class:`InvalidState`; on a closed link :class:`ProtocolError`,
        after GOAWAY either way :class:`GoingAway`, at the smaller stream limit
        :class:`TooManyStreams`, when ``info`` does not fit the peer's frame size
        :class:`HeadersTooLarge`; none queues anything. The stream is ``OPEN_SENT``."""
        peer = self._require_open()
        if self.peer_going_away or self.local_going_away:
            raise GoingAway("the link is draining")
        limit = min(peer.max_streams, self.settings.max_streams)
        if self._counts[True] >= limit:
            raise TooManyStreams(f"the link allows {limit} concurrent streams")
        flags, payload = self._head_payload(info, heads.encode_open)
        sid = self._next_id
        self._next_id += 2
        self._add_stream(sid, local=True, info=info)
        self._out.append(encode_frame(FrameType.OPEN, flags, sid, payload))
        return sid

    def accept_stream(self, sid: int, info: dict[str, Any]) -> None:
        """Queue OPEN_OK with ``info`` for a stream the peer opened (``OPEN_RECEIVED``).

        A no-op on a stream that is gone (the peer reset it); :class:`InvalidState` on a stream
        this side opened, one already answered or one never opened; :class:`HeadersTooLarge`
        (nothing queued, the stream unchanged) when ``info`` does not fit the peer's frame size.
        """
        stream, after = self._command(sid, StreamInput.ACCEPT)
        if stream is None:
            return
        flags, payload = self._head_payload(info, heads.encode_answer)
        self._out.append(encode_frame(FrameType.OPEN_OK, flags, sid, payload))
        self._enter(stream, after)

    def reject_stream(self, sid: int, code: str, message: str) -> None:
        """Queue OPEN_FAIL (``code``, ``message``) for a stream the peer opened and that this
        side has not answered, and forget the stream.

        A no-op on a stream that is gone; :class:`InvalidState` in any other state.
        """
        stream, after = self._command(sid, StreamInput.REJECT)
        if stream is None:
            return
        payload = error_payload(code, message)
        self._out.append(encode_frame(FrameType.OPEN_FAIL, 0, sid, payload))
        self._enter(stream, after)

    def stream_state(self, sid: int) -> StreamState:
        """The state of stream ``sid`` (IDLE if never opened, CLOSED once forgotten)."""
        return self._state_of(sid)[1]

    def send_credit(self, sid: int) -> int:
        """The DATA bytes :meth:`send_data` would take now (0 in a state that sends nothing)."""
        stream = self.streams.get(sid)
        if stream is None or stream.state not in SENDING:
            return 0
        return stream.send_credit

    def send_data(self, sid: int, data: bytes | memoryview, *, fin: bool = False) -> int:
        """Queue as much of ``data`` as the stream's credit allows; return the bytes taken.

        Allowed on a stream this side opened (before its answer too) and on an accepted one;
        :class:`InvalidState` on one the peer opened and this side has not accepted, or one
        never opened. After this side's FIN or on a stream that is gone it takes nothing. DATA
        frames are at most the peer's ``max_frame``; with ``fin``, the last frame carries FIN
        when all of ``data`` was taken (an empty ``data`` with ``fin`` needs no credit).
        """
        stream, _ = self._command(sid, StreamInput.SEND_DATA)
        if stream is None or stream.state in LOCAL_FIN:
            return 0
        peer = self._require_open()
        total = len(data)
        take = min(total, stream.send_credit)
        self._out += encode_data(sid, data, take, peer.max_frame, fin=fin and take == total)
        stream.send_credit -= take
        if fin and take == total:
            self._enter(stream, command(stream.state, StreamInput.SEND_FIN, sid))
        return take

    def send_fin(self, sid: int) -> None:
        """Queue FIN: this side sends no more DATA on the stream (the peer still may).

        Allowed where :meth:`send_data` is; a no-op after this side's FIN or on a stream that
        is gone. The stream is forgotten once both FINs have passed.
        """
        stream, after = self._command(sid, StreamInput.SEND_FIN)
        if stream is None or stream.state in LOCAL_FIN:
            return
        self._out.append(encode_frame(FrameType.FIN, 0, sid))
        self._enter(stream, after)

    def reset_stream(self, sid: int, code: str, message: str = "") -> None:
        """Queue RST (``code``, ``message``) and forget the stream, in any live state.

        A no-op on a stream that is gone; :class:`InvalidState` on one never opened.
        """
        stream, after = self._command(sid, StreamInput.SEND_RST)
        if stream is None:
            return
        payload = error_payload(code, message)
        self._out.append(encode_frame(FrameType.RST, 0, sid, payload))
        self._enter(stream, after)

    def consumed(self, sid: int, nbytes: int, now: float) -> None:
        """Report ``nbytes`` of the stream's received data as delivered; may grant credit."""
        stream = self.streams.get(sid)
        if stream is None or nbytes <= 0:
            return
        stream.recv_buffered -= nbytes
        if stream.remote_fin:
            return
        stream.recv_unacked += nbytes
        if stream.recv_unacked < update_threshold(stream.recv_window, self.settings.initial_window):
            return
        increment = stream.recv_unacked + self._grow(stream, now)
        stream.recv_unacked = 0
        stream.recv_remaining += increment
        stream.last_update_at = now
        self._out.append(encode_frame(FrameType.WINDOW, 0, sid, encode_u32(increment)))

    # -- link --------------------------------------------------------------------------------

    def go_away(self, code: str = "going_away", message: str = "") -> None:
        """Queue GOAWAY (``code``, ``message``, the highest stream id the peer opened) (§7).

        Any time before the link closed; later calls are no-ops. Afterwards this side opens no
        stream and answers the peer's new OPENs with OPEN_FAIL ``going_away``; live streams
        carry on.
        """
        if self.local_going_away or self.state is LinkState.CLOSED:
            return
        self.local_going_away = True
        payload = error_payload(code, message, last_stream_id=self._max_remote_id)
        self._out.append(encode_frame(FrameType.GOAWAY, 0, 0, payload))

    def send_cluster(self, cluster_nodes: int) -> bool:
        """Queue CLUSTER: the server's count of live nodes that take agents changed (§7).

        Only the server sends it, only on an open link whose peer speaks 1.2 or later; it
        returns whether a frame was queued (False: the peer is older, the link not open yet,
        whose WELCOME will say it, or closed). :class:`InvalidState` on the client side."""
        if self.side is not Side.SERVER:
            raise InvalidState("send_cluster on the client side")
        if self.state is not LinkState.OPEN or self.minor < CLUSTER_MINOR:
            return False
        payload = encode_json({"cluster_nodes": cluster_nodes})
        self._out.append(encode_frame(FrameType.CLUSTER, 0, 0, payload))
        return True

    def close(self) -> list[int]:
        """Mark the link closed; return the ids of the streams that were still live."""
        self.state = LinkState.CLOSED
        ids = list(self.streams)
        for sid in ids:
            self._remove(sid)
        return ids

    @property
    def active_streams(self) -> int:
        """Live streams (both directions)."""
        return len(self.streams)

    @property
    def window_total(self) -> int:
        """The sum of the live streams' receive windows (bounded by the session budget, §5)."""
        return self._window_total

    # -- internals ---------------------------------------------------------------------------

    def _head_payload(self, info: dict[str, Any], binary: heads.Encoder) -> tuple[int, bytes]:
        """OPEN / OPEN_OK flags and payload (§6.1); refused locally when the peer could not
        decode it (§6)."""
        max_frame = self._require_open().max_frame
        flags, payload = heads.encode(info, binary if self.binary_heads else None)
        if len(payload) > max_frame:
            raise HeadersTooLarge(f"{len(payload)} bytes exceed the peer's frame size")
        return flags, payload

    def _require_open(self) -> PeerSettings:
        if self.state is LinkState.CLOSED:  # the peer may close the link at any time: no misuse
            raise ProtocolError("the link is not open (closed)")
        if self.state is not LinkState.OPEN or self.peer is None:
            raise InvalidState("the link is not open (handshake)")
        return self.peer

    def _add_stream(self, sid: int, *, local: bool, info: dict[str, Any]) -> None:
        opened = StreamInput.SEND_OPEN if local else StreamInput.RECV_OPEN
        window = self.settings.initial_window
        self.streams[sid] = Stream(
            id=sid,
            local=local,
            state=command(StreamState.IDLE, opened, sid),
            send_credit=self._require_open().initial_window,
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
            pool = self.pool
            if pool is not None and stream.recv_window > self.settings.initial_window:
                pool.give(stream.recv_window - self.settings.initial_window)

    def _state_of(self, sid: int) -> tuple[Stream | None, StreamState]:
        """The live stream ``sid`` and its state, or None and IDLE (never opened) or CLOSED."""
        stream = self.streams.get(sid)
        if stream is not None:
            return stream, stream.state
        own = (sid % 2 == 1) == (self.side is Side.CLIENT)
        if (own and sid >= self._next_id) or (not own and sid > self._max_remote_id):
            return None, StreamState.IDLE
        return None, StreamState.CLOSED

    def _command(self, sid: int, event: StreamInput) -> tuple[Stream | None, StreamState]:
        """Check a local command against the table (InvalidState if it is not allowed); the
        stream is None when it is gone and the command a no-op."""
        stream, state = self._state_of(sid)
        return stream, command(state, event, sid)

    def _enter(self, stream: Stream, state: StreamState) -> None:
        stream.state = state
        if state is StreamState.CLOSED:
            self._remove(stream.id)

    def _received(self, sid: int, event: StreamInput) -> tuple[Stream, StreamState] | None:
        """Look a stream frame up in the table: raise on a link fault, reset the stream on a
        stream fault; None when nothing more is to be done (also for a stream that is gone)."""
        stream, state = self._state_of(sid)
        outcome = transition(state, event)
        frame = event.value.removeprefix("recv ")
        if outcome is Fault.LINK:
            if state is StreamState.IDLE:
                raise ProtocolError(f"frame for stream {sid}, which was never opened")
            raise ProtocolError(f"unexpected {frame} on stream {sid} in state {state.value}")
        if stream is None:
            return None  # in flight when the stream closed
        if isinstance(outcome, Fault):
            self._stream_error(sid, ProtocolError(f"{frame} in state {state.value}"))
            return None
        return stream, outcome

    def _grow(self, stream: Stream, now: float) -> int:
        """Grow the stream's window by what :func:`window_growth` allows (§5); return that."""
        s = self.settings
        if self.rtt is None or stream.last_update_at is None:
            return 0
        room = s.session_budget - self._window_total
        pool = self.pool
        if pool is not None:
            room = min(room, pool.room())
        delta = window_growth(
            window=stream.recv_window,
            unacked=stream.recv_unacked,
            interval=now - stream.last_update_at,
            rtt=self.rtt,
            max_window=s.max_window,
            room=max(room, 0),
        )
        stream.recv_window += delta
        self._window_total += delta
        if pool is not None and delta:
            pool.take(delta)
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
        elif ftype == FrameType.CLUSTER:
            if self.minor >= CLUSTER_MINOR:  # an older side ignores it as an unknown type
                self._on_cluster(frame)
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
        check_version(info)
        self.peer = peer_settings(info)
        self.minor = min(self.settings.protocol_minor, peer_minor(info))
        self.binary_heads = self.minor >= heads.MINOR
        if expected is FrameType.HELLO:
            self._events.append(HelloReceived(info))
        else:
            self.state = LinkState.OPEN
            self._events.append(WelcomeReceived(info))
            self.ping(now)

    def _on_data(self, frame: Frame) -> None:
        sid = frame.stream_id
        found = self._received(sid, StreamInput.RECV_DATA)
        if found is None:
            return
        stream, after = found
        size = len(frame.payload)
        if size > stream.recv_remaining:
            self._stream_error(
                sid, FlowControlError(f"{size} bytes beyond a window of {stream.recv_remaining}")
            )
            return
        stream.recv_remaining -= size
        stream.recv_buffered += size
        stream.state = after
        if size:
            self._events.append(DataReceived(sid, frame.payload))
        if frame.flags & FLAG_FIN:
            self._on_fin(sid)

    def _on_window(self, frame: Frame) -> None:
        found = self._received(frame.stream_id, StreamInput.RECV_WINDOW)
        if found is None:
            return
        stream, _ = found
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
        peeked = None
        if self.pass_opens and self.binary_heads and frame.flags & FLAG_BINARY:
            peeked = heads.peek_open(frame.payload)
        info = (
            heads.decode(frame, heads.decode_open, self.binary_heads) if peeked is None else peeked
        )
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
        self._add_stream(sid, local=False, info=info)
        self._events.append(StreamOpened(sid, info))

    def _on_open_answer(self, frame: Frame) -> None:
        sid = frame.stream_id
        ok = frame.type == FrameType.OPEN_OK
        found = self._received(sid, StreamInput.RECV_OPEN_OK if ok else StreamInput.RECV_OPEN_FAIL)
        if found is None:
            return
        stream, after = found
        if ok:
            info = heads.decode(frame, heads.decode_answer, self.binary_heads)
            stream.state = after
            # a copy: a view would keep the whole received message alive with the stream
            raw = bytes(frame.payload) if frame.flags & FLAG_BINARY else None
            self._events.append(StreamAccepted(sid, info, raw))
            return
        code, message = code_message(decode_json(frame.payload, "OPEN_FAIL"))
        self._enter(stream, after)
        self._events.append(StreamRejected(sid, code, message))

    def _on_fin(self, sid: int) -> None:
        found = self._received(sid, StreamInput.RECV_FIN)
        if found is None:
            return
        stream, after = found
        self._enter(stream, after)
        self._events.append(StreamEnded(sid))

    def _on_rst(self, frame: Frame) -> None:
        sid = frame.stream_id
        found = self._received(sid, StreamInput.RECV_RST)
        if found is None:
            return
        stream, after = found
        code, message = code_message(decode_json(frame.payload, "RST"))
        self._enter(stream, after)
        self._events.append(StreamReset(sid, code, message, remote=True))

    def _on_goaway(self, frame: Frame) -> None:
        info = decode_json(frame.payload, "GOAWAY")
        code, message = code_message(info)
        last = info.get("last_stream_id", 0)
        if not isinstance(last, int):
            raise ProtocolError("GOAWAY last_stream_id must be an integer")
        self.peer_going_away = True
        self._events.append(GoAwayReceived(last, code, message))

    def _on_cluster(self, frame: Frame) -> None:
        if self.side is Side.SERVER:
            raise ProtocolError("CLUSTER from the client")
        count = decode_json(frame.payload, "CLUSTER").get("cluster_nodes")
        if type(count) is not int or not 1 <= count <= MAX_CLUSTER_NODES:
            raise ProtocolError(f"CLUSTER cluster_nodes must be an integer 1..{MAX_CLUSTER_NODES}")
        self._events.append(ClusterChanged(count))
