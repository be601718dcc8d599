"""A stream forwarded to another node, as the node that forwarded it sees it
(docs/protocol.md §9).

The relaying node A sends the agent's answer (the response head of an HTTP stream, ``{}`` for
TCP) as the first DATA bytes of the stream: a 4-byte big-endian length and the head, as JSON or,
when the top bit of the length is set (protocol 1.1), in the binary form of
shared/protocol/heads.py. :class:`PeerStream` reads it back and gives the ingress what it expects
of an agent stream (``opened`` resolves to the head). A head ``{"unprocessed": true}`` means the
agent there never ran the stream, so B may open it again elsewhere.

Invariants: a head is at most :data:`MAX_HEAD` bytes; a malformed one resets the stream with
``protocol_error``; the head's bytes are credited as soon as they are read, bytes after it by
the stream's reader.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

from shared.errors import CSCError, GoingAway, ProtocolError, UpstreamError
from shared.linkstream import LinkStream
from shared.protocol import heads
from shared.protocol.codec import decode_json

_HEAD_LEN = struct.Struct(">I")
MAX_HEAD = 1024 * 1024
#: the top bit of a forwarded head's length: the head is binary (protocol 1.1, §9)
BINARY_HEAD = 0x8000_0000

#: Stream ``info`` keys that only the peer link uses (removed before the agent sees the OPEN).
PEER_KEYS = ("tenant",)


def strip_peer_keys(info: dict[str, Any]) -> dict[str, Any]:
    """A forwarded OPEN's info as the agent sees it."""
    return {k: v for k, v in info.items() if k not in PEER_KEYS}


#: the head A sends instead of the agent's answer when the agent never ran the stream
UNPROCESSED = "unprocessed"


def encode_head(head: dict[str, Any], *, binary: bool = False, raw: bytes | None = None) -> bytes:
    """The agent's answer as the first DATA of a forwarded stream: its length, then the head
    as JSON or, when ``binary`` (the link speaks 1.1) and it is a response head, in the binary
    layout of an OPEN_OK (shared/protocol/heads.py) with :data:`BINARY_HEAD` set in the
    length (docs/protocol.md §9). ``raw``: that layout as the agent sent it, already decoded
    into ``head`` by this node (:attr:`LinkStream.binary_head`), passed on as it is."""
    body = (raw if raw is not None else heads.encode_answer(head)) if binary else None
    if body is not None:
        return _HEAD_LEN.pack(len(body) | BINARY_HEAD) + body
    body = json.dumps(head, separators=(",", ":")).encode()
    return _HEAD_LEN.pack(len(body)) + body


def decode_head(data: bytes, flagged: bool, binary: bool) -> dict[str, Any]:
    """A forwarded head (the bytes after its length; ``flagged``: the length carried
    :data:`BINARY_HEAD`) on a link where ``binary`` heads were negotiated or not."""
    if not flagged:
        return decode_json(data, "forwarded head")
    if not binary:
        raise ProtocolError("binary forwarded head on a link that speaks protocol 1.0")
    return heads.decode_answer(data)


class PeerStream:
    """A stream forwarded to another node, with the interface of an agent :class:`LinkStream`.

    Created once the remote node admitted the stream; ``opened`` resolves to the agent's answer
    read from the first DATA bytes (or fails with the stream's error).
    """

    __slots__ = (
        "_buf",
        "_flagged",
        "_head_task",
        "_pending",
        "_size",
        "_unprocessed",
        "info",
        "inner",
        "node",
        "opened",
    )

    def __init__(self, inner: LinkStream, node: str) -> None:
        self.inner = inner
        self.node = node
        self.info = inner.info
        loop = inner.link.loop
        self.opened: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._pending: bytes | None = None
        self._unprocessed = False
        self._buf = bytearray()
        self._size: int | None = None
        self._flagged = False
        self._head_task: asyncio.Task[None] | None = None
        if not self._read_head_now():  # most answers came with the admission
            self._head_task = loop.create_task(self._read_head(), name=f"peer-head-{inner.id}")

    def _read_head_now(self) -> bool:
        """Take the head from what the stream holds already; True once ``opened`` is settled."""
        try:
            while (chunk := self.inner.read_now()) is not None:
                if self._take(chunk):
                    return True
        except CSCError as err:
            self._fail_open(err)
            return True
        return False

    async def _read_head(self) -> None:
        try:
            while not self._take(await self.inner.read()):
                pass
        except CSCError as err:
            self._fail_open(err)

    def _take(self, chunk: bytes | memoryview) -> bool:
        """Add ``chunk`` to the head read so far; True once the head is complete and ``opened``
        resolved. Raises the head's error (malformed, cut short, or the agent never ran it)."""
        if not chunk:
            raise UpstreamError("the peer node ended the stream before the answer")
        buf = self._buf
        buf += chunk
        size = self._size
        if size is None and len(buf) >= _HEAD_LEN.size:
            (size,) = _HEAD_LEN.unpack_from(buf)
            self._flagged = bool(size & BINARY_HEAD)
            size &= ~BINARY_HEAD
            if size > MAX_HEAD:
                raise ProtocolError(f"forwarded head of {size} bytes")
            self._size = size
        # credit the head's bytes now; bytes after it are credited by the reader
        end = len(buf) if size is None else min(len(buf), _HEAD_LEN.size + size)
        self.inner.consumed(len(chunk) - (len(buf) - end))
        if size is None or len(buf) < _HEAD_LEN.size + size:
            return False
        binary = self.inner.link.conn.binary_heads
        try:
            head = decode_head(bytes(buf[_HEAD_LEN.size : end]), self._flagged, binary)
        except ProtocolError as bad:  # malformed: the stream cannot go on
            self.inner.reset(bad)
            raise
        if head.get(UNPROCESSED) is True:  # the agent there never ran it (see _relay)
            self._unprocessed = True
            raise GoingAway(f"node {self.node}: the agent was going away")
        if len(buf) > end:
            self._pending = bytes(buf[end:])
        self._buf = bytearray()
        if not self.opened.done():  # else the answer came after the ingress gave up on it
            self.opened.set_result(head)
        return True

    def _fail_open(self, err: CSCError) -> None:
        if not self.opened.done():
            self.opened.set_exception(err)
            self.opened.exception()  # retrieved: the ingress reports it

    # -- the LinkStream interface the ingresses use -----------------------------------------

    @property
    def error(self) -> CSCError | None:
        return self.inner.error

    @property
    def done(self) -> bool:
        return self.inner.done

    @property
    def unprocessed(self) -> bool:
        """Neither the other node nor its agent ran the stream: it may be opened elsewhere."""
        return self._unprocessed or self.inner.unprocessed

    async def read(self) -> bytes | memoryview:
        pending = self._pending
        if pending is not None:
            self._pending = None
            return pending
        return await self.inner.read()

    def buffered(self) -> int:
        pending = self._pending
        return self.inner.buffered() + (0 if pending is None else len(pending))

    def consumed(self, nbytes: int) -> None:
        self.inner.consumed(nbytes)

    async def write(self, data: bytes | memoryview) -> None:
        await self.inner.write(data)

    def write_eof(self) -> None:
        self.inner.write_eof()

    def read_complete(self) -> bytes | None:
        rest = self.inner.read_complete()
        if rest is None:
            return None
        pending, self._pending = self._pending or b"", None
        return pending + rest

    def reset(self, err: CSCError) -> None:
        self.inner.reset(err)
        self._fail_open(err)

    def finish(self) -> None:
        if self._head_task is not None:
            self._head_task.cancel()
        self.inner.finish()
