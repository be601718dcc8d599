"""Pacing of a link's receive side: the marks of its write backpressure, and message cutting.

A link answers some received frames (PONG for PING, OPEN_FAIL, RST); a peer that sends such
frames and never reads would make it queue answers without end. :class:`shared.link.Link`
counts those answers until its sender returns and its owner stops pulling messages from the
transport above ``HIGH_WATER`` until ``LOW_WATER`` (docs/protocol.md §5, "Links that stop
reading"). The numbers live here, and so does :class:`AnswerBacklog`, its bookkeeping.

Decoding and answering a frame costs the event loop a few microseconds, and one WebSocket
message may hold a hundred thousand small frames: :class:`FrameCutter` cuts a message into
pieces of at most ``PIECE_FRAMES`` frames, at frame boundaries, so that the receive loop can
yield (and pause) between pieces. It only reads the length field of each frame header (the
decoder checks everything else) and keeps its place across messages, so a frame or a header
may span messages. A message of few frames (bulk DATA) is passed on whole, uncopied.

Invariant: the pieces, concatenated, are exactly the message; cutting never changes what the
decoder sees, only how often it is called (were the cutter ever out of step with the frames,
e.g. a peer that sent part of a frame along with its HELLO, only the pacing would differ).
"""

from __future__ import annotations

import asyncio
import itertools
import struct

from shared.protocol.codec import HEADER_SIZE

#: Reading pauses while more answer bytes than this wait to be sent, and resumes at LOW_WATER.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
#: A link with more answer bytes queued than this is closed (reading pauses long before).
MAX_BACKLOG = 8 * 1024 * 1024
#: A link whose sender does not return (the peer reads nothing) for this long is closed.
STUCK_TIMEOUT = 60.0
#: A receive loop yields to the event loop once it ran this long (seconds) since it last did.
FAIR_SLICE = 0.002
#: At most this many frames are decoded in one go.
PIECE_FRAMES = 256

_LENGTH = struct.Struct("!I")
_LENGTH_AT = 8  # offset of the payload length in a frame header


class AnswerBacklog:
    """Frames a link took from its multiplexer for the next flush, and the answer bytes among
    them and in flushes whose sender has not returned (:attr:`size`).

    :attr:`readable` is clear from the moment :attr:`size` passes ``high_water`` until it is
    back at ``low_water`` (or :meth:`clear`); chunks keep their order whatever they count as.
    """

    __slots__ = ("_in_flight", "_queued", "chunks", "high_water", "low_water", "readable")

    def __init__(self, high_water: int, low_water: int) -> None:
        if not 0 <= low_water <= high_water:
            raise ValueError("need 0 <= low_water <= high_water")
        self.high_water = high_water
        self.low_water = low_water
        self.chunks: list[bytes | memoryview] = []
        self._queued = 0
        self._in_flight = 0
        self.readable = asyncio.Event()
        self.readable.set()

    @property
    def size(self) -> int:
        return self._queued + self._in_flight

    def add(self, chunks: list[bytes | memoryview], *, answers: bool) -> None:
        """Queue ``chunks``; ``answers``: they answer received frames and count."""
        self.chunks += chunks
        if answers:
            self._queued += sum(map(len, chunks))
            if self.size > self.high_water:
                self.readable.clear()

    def take(self) -> tuple[list[bytes | memoryview], int]:
        """Everything queued, for a flush, and the answer bytes in it (in flight until
        :meth:`sent` gets them back)."""
        chunks, self.chunks = self.chunks, []
        answers, self._queued = self._queued, 0
        self._in_flight += answers
        return chunks, answers

    def sent(self, answers: int) -> None:
        """A flush's sender returned (or failed)."""
        self._in_flight -= answers
        if self.size <= self.low_water:
            self.readable.set()

    def clear(self) -> None:
        """The link closed: drop what is queued and never hold a reader again."""
        self.chunks = []
        self._queued = 0
        self.readable.set()


class FrameCutter:
    """Cuts received messages at frame boundaries into pieces of at most ``max_frames``."""

    __slots__ = ("_head", "_left", "max_frames")

    def __init__(self, max_frames: int = PIECE_FRAMES) -> None:
        self.max_frames = max_frames
        #: bytes of the frame under way that belong to later messages
        self._left = 0
        #: the first bytes of a header that the previous message ended in
        self._head = b""

    @property
    def at_boundary(self) -> bool:
        """Whether the next message starts with a frame header (nothing of a frame under way)."""
        return not self._left and not self._head

    def cut(self, data: bytes) -> list[bytes]:
        end = len(data)
        pos = self._start(data)
        if pos >= end:
            self._left = pos - end
            return [data]
        frames = 0
        cuts: list[int] = []
        while end - pos >= HEADER_SIZE:
            (length,) = _LENGTH.unpack_from(data, pos + _LENGTH_AT)
            pos += HEADER_SIZE + length
            frames += 1
            if frames >= self.max_frames and pos < end:
                cuts.append(pos)
                frames = 0
        if pos >= end:
            self._left = pos - end
        else:  # a header continues in the next message
            self._left = 0
            self._head = data[pos:]
        if not cuts:
            return [data]
        bounds = [0, *cuts, end]
        view = memoryview(data)
        return [bytes(view[a:b]) for a, b in itertools.pairwise(bounds)]

    def _start(self, data: bytes) -> int:
        """Where the first frame header that starts in ``data`` is."""
        if not self._head:
            return self._left
        need = HEADER_SIZE - len(self._head)
        head = self._head + data[:need]
        if len(head) < HEADER_SIZE:
            self._head = head
            return len(data)
        self._head = b""
        (length,) = _LENGTH.unpack_from(head, _LENGTH_AT)
        return need + int(length)
