"""WebSocket frames as the CSC's end of an agent link sees them (RFC 6455 §5), without I/O.

:class:`FrameReader` takes the bytes of a client's connection in chunks of any size and yields
what they carry: the payload of every binary (or continuation) frame, unmasked, as soon as the
frame is complete, and control frames (ping, pong, close) as :class:`Control` records. Nothing
joins the frames of a fragmented message: the link above is a byte stream. :func:`frame_head`
builds the head of an unmasked server frame, so a payload handed over in pieces is written
without being joined.

Invariants:

* A frame that breaks the rules (reserved bits set, no mask, unknown opcode, a control frame
  that is fragmented or longer than 125 bytes, a continuation with no message to continue, a
  new message inside a fragmented one) raises :class:`FrameError` with close code 1002; a
  message (all its fragments) longer than ``max_size`` raises it with 1009 as soon as its
  length is known, before its payload is buffered. After a :class:`FrameError` the reader is
  not used again.
* A text frame is reported (``TEXT``) with its payload dropped: text is not part of the
  protocol, the caller ends the session.
* At most one frame's bytes (bounded by ``max_size`` plus its 14-byte head) are buffered.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from shared.wsframe import payload_length

try:  # the C version (websockets.utils.apply_mask is its pure-Python fallback)
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
#: Close codes (RFC 6455 §7.4.1).
CLOSE_NORMAL, CLOSE_PROTOCOL_ERROR, CLOSE_TOO_BIG, CLOSE_NO_STATUS = 1000, 1002, 1009, 1005

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_CONTROL = (OP_CLOSE, OP_PING, OP_PONG)


class FrameError(Exception):
    """The client broke the framing rules; ``code`` is the close code to answer with."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Control:
    """A control frame (``opcode`` ping, pong or close) or a text frame (payload dropped)."""

    opcode: int
    payload: bytes


def frame_head(length: int, opcode: int = OP_BINARY) -> bytes:
    """The head of one final, unmasked frame of ``length`` payload bytes."""
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return bytes((first, 126)) + _U16.pack(length)
    return bytes((first, 127)) + _U64.pack(length)


def close_payload(code: int, reason: str) -> bytes:
    """A close frame's payload: the code and the reason, cut to fit 125 bytes (UTF-8 kept whole)."""
    raw = reason.encode()[:123].decode(errors="ignore").encode()
    return _U16.pack(code) + raw


def parse_close(payload: bytes) -> tuple[int, str]:
    """``(code, reason)`` of a received close frame (1005 when it carries no code)."""
    if len(payload) < 2:
        return CLOSE_NO_STATUS, ""
    (code,) = _U16.unpack_from(payload)
    return code, payload[2:].decode(errors="replace")


class FrameReader:
    """Decodes a client's frames from chunks of any size (see the module's invariants)."""

    __slots__ = ("_buf", "_fragmented", "_have", "_message_size", "_need", "_parts", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buf = b""
        #: chunks of a frame known to need ``_need`` bytes in all (joined once they are there)
        self._parts: list[bytes] = []
        self._have = self._need = 0
        #: inside a fragmented message: its opcode (binary or text), else None
        self._fragmented: int | None = None
        self._message_size = 0

    def feed(self, data: bytes) -> Iterator[bytes | Control]:
        """Payloads (``bytes``) and :class:`Control` records of the frames ``data`` completes."""
        if self._parts:
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                return
            data, self._parts, self._have, self._need = b"".join(self._parts), [], 0, 0
        buf = self._buf + data if self._buf else data
        self._buf = b""
        view = memoryview(buf)
        pos, end = 0, len(buf)
        try:
            while end - pos >= 2:
                first, second = buf[pos], buf[pos + 1]
                length, at = payload_length(buf, pos, end)
                if length < 0:
                    break
                opcode, fragmented, size = self._check(first, second, length)
                if end - at < 4 + length:
                    if at + 4 + length - pos > 4096:  # a long frame: gather its chunks
                        self._need = at + 4 + length - pos
                    break
                self._fragmented, self._message_size = fragmented, size
                key = buf[at : at + 4]
                at += 4
                payload = apply_mask(view[at : at + length], key) if length else b""
                pos = at + length
                if opcode == OP_BINARY:
                    if payload:
                        yield payload
                elif opcode == OP_TEXT:
                    yield Control(OP_TEXT, b"")
                else:
                    yield Control(opcode, payload)
        finally:
            view.release()
            rest = buf[pos:] if pos else buf
            if pos < end and self._need:
                self._parts, self._have = [rest], len(rest)
            elif pos < end:
                self._buf = rest

    def _check(self, first: int, second: int, length: int) -> tuple[int, int | None, int]:
        """``(kind, fragmented, size)`` of a frame whose head follows the rules: ``kind`` is
        the opcode (a continuation's is its message's), then the state after the frame."""
        if first & 0x70:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension agreed)")
        if not second & 0x80:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "a client frame must be masked")
        opcode, fin = first & 0x0F, bool(first & 0x80)
        if opcode in _CONTROL:
            if not fin or length > 125:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "control frames are short and whole")
            return opcode, self._fragmented, self._message_size
        if opcode == OP_CONT:
            if self._fragmented is None:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "a continuation frame with no message")
            size, kind = self._message_size + length, self._fragmented
        elif opcode in (OP_BINARY, OP_TEXT):
            if self._fragmented is not None:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "a new message inside a fragmented one")
            size, kind = length, opcode
        else:
            raise FrameError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
        if size > self.max_size:
            raise FrameError(CLOSE_TOO_BIG, f"message larger than {self.max_size} bytes")
        return (kind, None, 0) if fin else (kind, kind, size)
