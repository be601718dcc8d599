"""The part of a WebSocket frame head (RFC 6455 §5.2) both ends of an agent link read the same
way, without I/O: the payload length, in 7 bits or extended to 16 or 64. The CSC's reader of
client frames (csc/relay/wsframes.py) and the agent's of server frames
(tenant_agent/websocket.py) differ in everything else (masking, control frames, checks).
"""

from __future__ import annotations

import struct

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")


def payload_length(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """``(length, at)`` of the frame whose head starts at ``data[pos]`` (its first two bytes
    are there: ``end - pos >= 2``): the payload length and where the head goes on after it (the
    mask key, or the payload); ``(-1, pos)`` while ``data[:end]`` lacks the extended length."""
    length = data[pos + 1] & 0x7F
    at = pos + 2
    if length == 126:
        if end - at < 2:
            return -1, pos
        return _U16.unpack_from(data, at)[0], at + 2
    if length == 127:
        if end - at < 8:
            return -1, pos
        return _U64.unpack_from(data, at)[0], at + 8
    return length, at
