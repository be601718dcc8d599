"""Frame codec of the agent link (docs/protocol.md §2), sans-I/O.

A frame is a 12-byte header ``version:u8 type:u8 flags:u8 reserved:u8 stream_id:u32
length:u32`` (network byte order) followed by ``length`` payload bytes. :class:`FrameDecoder`
turns arbitrarily chunked bytes into :class:`Frame` objects and raises a typed
:class:`~shared.errors.ProtocolError` for anything malformed; it never raises anything else.

Invariants: a decoded frame's flags use only the bits its type defines, its stream id is zero
exactly for link-level types, control payloads have their fixed sizes, and no payload exceeds
the decoder's ``max_payload``. Frames of an unknown type (a newer minor version) are returned as
:class:`Frame` with their raw type so the multiplexer can ignore them.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from shared.errors import FrameTooLarge, ProtocolError, VersionUnsupported

VERSION_MAJOR = 1
VERSION_MINOR = 2
VERSION = f"{VERSION_MAJOR}.{VERSION_MINOR}"

HEADER = struct.Struct("!BBBBII")
HEADER_SIZE = HEADER.size
HARD_MAX_PAYLOAD = 16 * 1024 * 1024
MAX_WINDOW_INCREMENT = 2**31 - 1
MAX_STREAM_ID = 2**32 - 1
_U32 = struct.Struct("!I")


class FrameType(IntEnum):
    HELLO = 1
    WELCOME = 2
    OPEN = 3
    OPEN_OK = 4
    OPEN_FAIL = 5
    DATA = 6
    WINDOW = 7
    FIN = 8
    RST = 9
    GOAWAY = 10
    PING = 11
    CLUSTER = 12  # 1.2: the server's count of nodes that take agents (§7)


FLAG_FIN = 0x01  # DATA: last data of this direction (same as a following FIN frame)
FLAG_ACK = 0x01  # PING: this is the answer
FLAG_BINARY = 0x01  # OPEN, OPEN_OK: the head is binary (shared/protocol/heads.py), not JSON (1.1)

LINK_TYPES = frozenset(
    {FrameType.HELLO, FrameType.WELCOME, FrameType.GOAWAY, FrameType.PING, FrameType.CLUSTER}
)
#: The minor version from which CLUSTER is sent and read (docs/protocol.md §7).
CLUSTER_MINOR = 2
#: The most nodes a CLUSTER frame may name.
MAX_CLUSTER_NODES = 65535
_ALLOWED_FLAGS: dict[int, int] = {t: 0 for t in FrameType}
_ALLOWED_FLAGS[FrameType.DATA] = FLAG_FIN
_ALLOWED_FLAGS[FrameType.PING] = FLAG_ACK
_ALLOWED_FLAGS[FrameType.OPEN] = FLAG_BINARY
_ALLOWED_FLAGS[FrameType.OPEN_OK] = FLAG_BINARY
_FIXED_SIZES: dict[int, int] = {FrameType.WINDOW: 4, FrameType.PING: 8, FrameType.FIN: 0}
_KNOWN = frozenset(int(t) for t in FrameType)


@dataclass(frozen=True, slots=True, init=False)
class Frame:
    type: int
    flags: int
    stream_id: int
    payload: bytes | memoryview

    # written out: mypyc compiles it (see shared/protocol/events.py)
    def __init__(self, type: int, flags: int, stream_id: int, payload: bytes | memoryview) -> None:
        object.__setattr__(self, "type", type)
        object.__setattr__(self, "flags", flags)
        object.__setattr__(self, "stream_id", stream_id)
        object.__setattr__(self, "payload", payload)


def encode_header(ftype: int, flags: int, stream_id: int, length: int) -> bytes:
    """The 12-byte header of a frame whose payload (``length`` bytes) is sent separately."""
    return HEADER.pack(VERSION_MAJOR, ftype, flags, 0, stream_id, length)


def encode_frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One whole frame: header and payload."""
    return HEADER.pack(VERSION_MAJOR, ftype, flags, 0, stream_id, len(payload)) + payload


def encode_data(
    sid: int, data: bytes | memoryview, take: int, max_frame: int, *, fin: bool
) -> list[bytes | memoryview]:
    """DATA frames (headers and views of ``data``) for its first ``take`` bytes, at most
    ``max_frame`` each; with ``fin`` the last one carries FIN (one empty frame if ``take`` is 0)."""
    view = memoryview(data) if not isinstance(data, memoryview) else data
    out: list[bytes | memoryview] = []
    pos = 0
    while pos < take or (pos == 0 and take == 0 and fin):
        size = min(max_frame, take - pos)
        flags = FLAG_FIN if fin and pos + size >= take else 0
        out.append(encode_header(FrameType.DATA, flags, sid, size))
        if size:
            out.append(view[pos : pos + size])
        pos += size
        if size == 0:
            break
    return out


#: The payload of an empty head, encoded and recognised without the json module.
EMPTY_OBJECT = b"{}"


def encode_json(obj: dict[str, Any]) -> bytes:
    """A JSON payload (compact, UTF-8)."""
    if not obj:
        return EMPTY_OBJECT  # a TCP stream's answer, a peer link's admission
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def decode_json(payload: bytes | memoryview, what: str) -> dict[str, Any]:
    """A JSON object payload of the frame named ``what``; ProtocolError if it is not one."""
    if payload == EMPTY_OBJECT:
        return {}
    try:
        obj = json.loads(bytes(payload))
    except (ValueError, RecursionError) as exc:  # also int digit limit and deep nesting
        raise ProtocolError(f"{what} payload is not valid JSON") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} payload must be a JSON object")
    return obj


def encode_u32(value: int) -> bytes:
    """A WINDOW increment payload."""
    return _U32.pack(value)


def decode_u32(payload: bytes | memoryview) -> int:
    """A WINDOW increment (the decoder already checked that the payload is 4 bytes)."""
    value: int = _U32.unpack(payload)[0]
    return value


class FrameDecoder:
    """Incremental decoder: ``feed()`` bytes in any chunking, get whole frames out."""

    __slots__ = ("_buf", "max_payload")

    def __init__(self, max_payload: int) -> None:
        if not 0 < max_payload <= HARD_MAX_PAYLOAD:
            raise ValueError("max_payload out of range")
        self.max_payload = max_payload
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received and not yet part of a complete frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Decode every complete frame in the buffered bytes plus ``data``.

        Payloads of frames decoded straight from ``data`` (when nothing was buffered) are
        zero-copy memoryviews of it; the caller must not mutate ``data`` afterwards.
        """
        if self._buf:
            self._buf += data
            view = memoryview(bytes(self._buf))
            self._buf.clear()
        else:
            view = memoryview(data if isinstance(data, bytes) else bytes(data))
        frames: list[Frame] = []
        pos, end = 0, len(view)
        while end - pos >= HEADER_SIZE:
            version, ftype, flags, reserved, stream_id, length = HEADER.unpack_from(view, pos)
            self._check_header(version, ftype, flags, reserved, stream_id, length)
            if end - pos - HEADER_SIZE < length:
                break
            start = pos + HEADER_SIZE
            frames.append(Frame(ftype, flags, stream_id, view[start : start + length]))
            pos = start + length
        if pos < end:
            self._buf += view[pos:]
        return frames

    def _check_header(
        self, version: int, ftype: int, flags: int, reserved: int, stream_id: int, length: int
    ) -> None:
        if version != VERSION_MAJOR:
            raise VersionUnsupported(
                f"frame of protocol version {version}; this side speaks {VERSION_MAJOR}.x"
            )
        if reserved:
            raise ProtocolError("reserved header byte must be zero")
        if length > self.max_payload:
            raise FrameTooLarge(f"frame payload of {length} bytes exceeds {self.max_payload}")
        if ftype not in _KNOWN:
            return  # a newer minor version's frame: the multiplexer ignores it
        if flags & ~_ALLOWED_FLAGS[ftype]:
            raise ProtocolError(f"undefined flags 0x{flags:02x} on {FrameType(ftype).name}")
        if (ftype in LINK_TYPES) != (stream_id == 0):
            what = "must" if ftype in LINK_TYPES else "must not"
            raise ProtocolError(f"{FrameType(ftype).name} {what} use stream id 0")
        size = _FIXED_SIZES.get(ftype)
        if size is not None and length != size:
            raise ProtocolError(f"{FrameType(ftype).name} payload must be {size} bytes")


#: Characters of an error message on the wire; 6 bytes each at most in JSON.
MAX_MESSAGE = 1000


def error_payload(code: str, message: str, **extra: Any) -> bytes:
    """OPEN_FAIL / RST / GOAWAY payload; the message is capped so it fits any frame (§6)."""
    return encode_json({"code": code, "message": message[:MAX_MESSAGE], **extra})


def code_message(info: dict[str, Any]) -> tuple[str, str]:
    """``code`` and ``message`` of an error payload; ProtocolError if they are not strings."""
    code, message = info.get("code"), info.get("message", "")
    if not isinstance(code, str) or not isinstance(message, str):
        raise ProtocolError("error frame needs string 'code' and 'message'")
    return code, message[:MAX_MESSAGE]
