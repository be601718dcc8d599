"""Node-to-node peer links: a bootloader stream that arrives at node B for an alias whose agent is
on node A travels B→A over one persistent, authenticated link (docs/protocol.md §10).

A peer link is the agent-link protocol (shared/protocol: frames, streams, per-stream credit,
heartbeats) carried directly over TCP, without a WebSocket: the frame codec delimits frames by
itself. Unless ``peer_tls`` is off, that TCP connection is TLS 1.3 with a certificate required
on both sides (csc/cluster/peertls.py), the handshake bounded by ``HANDSHAKE_TIMEOUT``. B dials
(``Side.CLIENT``) and opens streams; A accepts them (``Side.SERVER``). B's HELLO carries a
short-lived HS256 token signed with the cluster secret (``iss`` = B's node id, ``aud`` =
``csc-peer:<A's node id>``), so only nodes holding the secret can open streams and a token
meant for one node is refused by another.

Streams on a peer link differ from agent-link streams in one way, so that B can try another node
when A cannot serve: A answers OPEN_OK once it has opened the stream on one of its own agent
sessions (*admission*; for a stream without a body, together with the agent's answer when that
comes within ``ADMISSION_HOLD``), or OPEN_FAIL at once when it has none (``portal_offline``) or
is draining (``going_away``). The agent's answer (the response head of an HTTP request, ``{}`` for TCP) then
comes as the first DATA bytes of the stream: a 4-byte big-endian length and that JSON object
(on a link of protocol 1.1, a response head in the binary form of shared/protocol/heads.py,
the length's top bit set);
an agent refusal after admission is an RST with the agent's code, except a refusal that proves
the agent never ran the stream (it was going away: ``LinkStream.unprocessed``), which comes as
the head ``{"unprocessed": true}`` so that B may open the stream again elsewhere.
:class:`PeerStream` turns that back into what the ingress expects of an agent stream
(``opened`` resolves to the head).

A only relays: B has already checked the alias, the tenant and its limits, logs the request and
counts it. A copies bytes between the two streams and returns credit only for bytes the next hop
took (or, up to ``EARLY_CREDIT`` per link, queued for it), so flow control holds end to end
(B→A→agent) and memory stays bounded on every hop.

Invariants: a stream forwarded by B is admitted by A only to a live, accepting session of the
tenant named in its OPEN; a relay never outlives either of its streams (an error on one resets
the other with the same code).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import jwt

from csc.cluster import peertls
from shared.aio import cancel_quietly
from shared.errors import (
    AuthFailed,
    Cancelled,
    CSCError,
    GoingAway,
    LinkStalled,
    PortalOffline,
    ProtocolError,
    UpstreamError,
)
from shared.link import Link, LinkStream
from shared.protocol import (
    Connection,
    Event,
    HelloReceived,
    LinkSettings,
    Side,
    WelcomeReceived,
    heads,
)
from shared.protocol.codec import decode_json
from shared.units import parse_hostport

log = logging.getLogger("csc.peer")

AUDIENCE_PREFIX = "csc-peer:"
TOKEN_TTL = 60
HANDSHAKE_TIMEOUT = 5.0
DIAL_TIMEOUT = 3.0
#: A node answers OPEN within ADMISSION_HOLD (admission); one that takes this long is stuck
#: (paused, overloaded) and the next node is tried.
ADMISSION_TIMEOUT = 2.0
#: A holds the admission of a bodyless stream this long at most, to send it with the answer.
ADMISSION_HOLD = 0.25
READ_SIZE = 256 * 1024
#: How long a node whose link could not be dialled is skipped before it is tried again.
SUSPECT_FOR = 3.0
#: A relay credits its source without waiting for the flush while the next hop's link has no
#: more than this many bytes unsent (see ``_pipe``).
EARLY_CREDIT = 64 * 1024
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


# -- authentication ---------------------------------------------------------------------------


def peer_token(key: bytes, source: str, target: str, now: float | None = None) -> str:
    """The HELLO credential of ``source`` dialling ``target``, valid for a minute."""
    issued = int(time.time() if now is None else now)
    claims = {
        "iss": source,
        "aud": AUDIENCE_PREFIX + target,
        "iat": issued,
        "exp": issued + TOKEN_TTL,
    }
    return jwt.encode(claims, key, algorithm="HS256")


def verify_peer_token(key: bytes, token: object, me: str) -> str:
    """The dialling node's id, or AuthFailed (wrong secret, wrong target, expired)."""
    if not isinstance(token, str):
        raise AuthFailed("the peer HELLO lacks its token", reason="missing_token")
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=["HS256"],
            audience=AUDIENCE_PREFIX + me,
            options={"require": ["iss", "aud", "exp"]},
            leeway=5,
        )
    except jwt.PyJWTError as exc:
        raise AuthFailed(f"peer token refused: {exc}", reason="peer_token") from None
    source = claims.get("iss")
    if not isinstance(source, str) or not source:
        raise AuthFailed("peer token without a node id", reason="peer_token")
    return source


# -- the head of a forwarded stream ------------------------------------------------------------


def encode_head(head: dict[str, Any], *, binary: bool = False) -> bytes:
    """The agent's answer as the first DATA of a forwarded stream: its length, then the head
    as JSON or, when ``binary`` (the link speaks 1.1) and it is a response head, in the binary
    layout of an OPEN_OK (shared/protocol/heads.py) with :data:`BINARY_HEAD` set in the
    length (docs/protocol.md §9)."""
    body = heads.encode_answer(head) if binary else None
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

    __slots__ = ("_head_task", "_pending", "_unprocessed", "info", "inner", "node", "opened")

    def __init__(self, inner: LinkStream, node: str) -> None:
        self.inner = inner
        self.node = node
        self.info = inner.info
        loop = inner.link.loop
        self.opened: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._pending: bytes | None = None
        self._unprocessed = False
        self._head_task = loop.create_task(self._read_head(), name=f"peer-head-{inner.id}")

    async def _read_head(self) -> None:
        buf = bytearray()
        size: int | None = None
        try:
            while size is None or len(buf) < _HEAD_LEN.size + size:
                chunk = await self.inner.read()
                if not chunk:
                    raise UpstreamError("the peer node ended the stream before the answer")
                buf += chunk
                if size is None and len(buf) >= _HEAD_LEN.size:
                    (size,) = _HEAD_LEN.unpack_from(buf)
                    flagged = bool(size & BINARY_HEAD)
                    size &= ~BINARY_HEAD
                    if size > MAX_HEAD:
                        raise ProtocolError(f"forwarded head of {size} bytes")
                # credit the head's bytes now; bytes after it are credited by the reader
                end = len(buf) if size is None else min(len(buf), _HEAD_LEN.size + size)
                self.inner.consumed(len(chunk) - (len(buf) - end))
            end = _HEAD_LEN.size + size
            binary = self.inner.link.conn.binary_heads
            try:
                head = decode_head(bytes(buf[_HEAD_LEN.size : end]), flagged, binary)
            except ProtocolError as bad:  # malformed: the stream cannot go on
                self.inner.reset(bad)
                raise
            if head.get(UNPROCESSED) is True:  # the agent there never ran it (see _relay)
                self._unprocessed = True
                raise GoingAway(f"node {self.node}: the agent was going away")
        except CSCError as err:
            self._fail_open(err)
            return
        if len(buf) > end:
            self._pending = bytes(buf[end:])
        if not self.opened.done():  # else the answer came after the ingress gave up on it
            self.opened.set_result(head)

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
        self._head_task.cancel()
        self.inner.finish()


# -- transport ---------------------------------------------------------------------------------


def _sender(writer: asyncio.StreamWriter) -> Callable[[Sequence[bytes | memoryview]], Any]:
    async def send(chunks: Sequence[bytes | memoryview]) -> None:
        writer.writelines(chunks)
        await writer.drain()

    return send


async def _pump(reader: asyncio.StreamReader, link: Link) -> None:
    """Feed the socket's bytes to the link until either ends; then close the link. Reading
    waits while the link's answers cannot be sent (:meth:`Link.wait_readable`)."""
    try:
        while True:
            await link.wait_readable()
            if link.is_closed or not (data := await reader.read(READ_SIZE)):
                break
            await link.receive(data)
    except (CSCError, OSError):
        pass
    finally:
        link.close()


def _end_transport(writer: asyncio.StreamWriter, link: Link) -> None:
    """Close the socket of a link that ended; abort it when the peer stopped reading (what is
    still buffered for it would never leave)."""
    if link.closed.done() and isinstance(link.closed.result(), LinkStalled):
        writer.transport.abort()
    else:
        writer.close()


def _transport(writer: asyncio.StreamWriter) -> str:
    """``TLSv1.3`` or ``plain TCP``, for the link-up log lines."""
    tls = writer.get_extra_info("ssl_object")
    return "plain TCP" if tls is None else str(tls.version())


E = TypeVar("E", bound=Event)


async def _handshake_events(
    reader: asyncio.StreamReader, conn: Connection, want: type[E]
) -> tuple[E, list[Event]]:
    """Read until ``want`` arrives: that event and the ones after it."""
    loop = asyncio.get_running_loop()
    first = True
    while True:
        data = await reader.read(READ_SIZE)
        if not data:
            raise ProtocolError(
                "the peer closed the link in the handshake "
                f"(another cluster secret, or {peertls.MISMATCH_HINT})"
            )
        if first and peertls.looks_like_tls(data):  # only a plain link sees TLS records
            raise ProtocolError(f"the other node speaks TLS, this one not: {peertls.MISMATCH_HINT}")
        first = False
        conn.receive_data(data, loop.time())
        events = conn.events()
        for i, event in enumerate(events):
            if isinstance(event, want):
                return event, events[i + 1 :]


# -- the accepting side (node A) ---------------------------------------------------------------

#: Open a stream on one of this node's own sessions for the forwarded OPEN ``info`` (raises
#: PortalOffline / GoingAway when it cannot), counting it as the node's stream until it ends.
LocalOpener = Callable[[dict[str, Any]], LinkStream]


@dataclass(eq=False)
class PeerServer:
    """The node-to-node listener: authenticates dialling nodes and relays their streams."""

    node_id: str
    key: bytes
    settings: LinkSettings
    open_local: LocalOpener
    stream_started: Callable[[], None]
    stream_finished: Callable[[], None]
    #: the listener's TLS context (csc/cluster/peertls.py); None: plain TCP (``peer_tls=false``)
    tls: ssl.SSLContext | None = None
    links: set[Link] = field(default_factory=set)
    #: the bound (host, port), once started
    address: tuple[str, int] | None = None
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    #: streams being relayed now
    relaying: int = 0

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(
            self._accept,
            host,
            port,
            limit=READ_SIZE,
            ssl=self.tls,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT if self.tls is not None else None,
        )
        sockname = self._server.sockets[0].getsockname()
        self.address = sockname[0], sockname[1]
        return self.address

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        loop = asyncio.get_running_loop()
        conn = Connection(Side.SERVER, self.settings, accept_streams=True, now=loop.time())
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                hello, pending = await _handshake_events(reader, conn, HelloReceived)
            source = verify_peer_token(self.key, hello.info.get("token"), self.node_id)
        except TimeoutError:
            log.warning("peer link from %s refused: no HELLO within %ss", peer, HANDSHAKE_TIMEOUT)
            writer.close()
            return
        except (CSCError, OSError) as exc:
            log.warning("peer link from %s refused: %s", peer, getattr(exc, "message", exc))
            writer.close()
            return
        conn.send_welcome({"node": self.node_id}, loop.time())
        link = Link(
            conn,
            _sender(writer),
            on_stream=self._relay,
            name=f"peer {source}",
            pending=pending,
        )
        self.links.add(link)
        log.info("peer link from node %s up (%s)", source, _transport(writer))
        try:
            await _pump(reader, link)
        finally:
            self.links.discard(link)
            await link.aclose()
            _end_transport(writer, link)
            log.info("peer link from node %s down", source)

    async def _relay(self, stream: LinkStream) -> None:
        try:
            inner = self.open_local(stream.info)
        except CSCError as err:
            stream.reject(err)
            return
        admission = _Admission(stream, self.node_id)
        self.stream_started()
        self.relaying += 1
        upload: asyncio.Future[None] | None = None
        try:
            if stream.read_done:  # B sent its FIN with the OPEN (a GET): nothing to pump
                admission.hold()
                inner.write_eof()
            else:
                admission.now()  # B's body flows on B's own credit; admit at once
                upload = asyncio.ensure_future(_pipe(stream, inner))
            try:
                head = await inner.opened
            except CSCError as err:
                admission.now()
                if inner.unprocessed:  # tell the forwarding node it may try elsewhere
                    await cancel_quietly(upload)
                    if upload is not None and not upload.cancelled():
                        upload.exception()  # retrieved: the marker below reports the refusal
                    await stream.write(encode_head({UNPROCESSED: True}))
                    stream.write_eof()
                    return
                stream.reset(err)
                return
            admission.now()  # with the head, in the same write when it was held
            await stream.write(encode_head(head, binary=stream.link.conn.binary_heads))
            await _pipe(inner, stream)
            if upload is not None:
                await upload
        except CSCError as err:
            admission.now()
            stream.reset(err)
            inner.reset(err)
        finally:
            admission.cancel()
            await cancel_quietly(upload)
            inner.finish()
            self.relaying -= 1
            self.stream_finished()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self.links):
            link.close(GoingAway("the node is stopping"))
        for task in list(self._tasks):
            await cancel_quietly(task)


class _Admission:
    """When A answers OPEN_OK for a stream it relays. A stream that came with its FIN (no
    body: most requests) is admitted together with its answer when the agent answers within
    :data:`ADMISSION_HOLD`, so B reads OPEN_OK, the head and the body in one piece instead of
    waking twice; a slower answer is admitted when the hold ends, well within B's
    :data:`ADMISSION_TIMEOUT`. A stream with a body, and any failure, is admitted at once (an
    error after admission reaches B as the agent's own, not as a refusal to try elsewhere)."""

    __slots__ = ("_node", "_stream", "_timer", "admitted")

    def __init__(self, stream: LinkStream, node: str) -> None:
        self._stream, self._node = stream, node
        self._timer: asyncio.TimerHandle | None = None
        self.admitted = False

    def hold(self) -> None:
        self._timer = self._stream.link.loop.call_later(ADMISSION_HOLD, self.now)

    def now(self) -> None:
        self.cancel()
        if not self.admitted and not self._stream.done:
            self.admitted = True
            self._stream.accept({"node": self._node})

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def _pipe(src: LinkStream, dst: LinkStream) -> None:
    """Copy ``src`` to ``dst`` until ``src`` ends, crediting ``src`` only for bytes that left
    for the next hop (queued for ``dst`` is not enough: that queue may grow to the next hop's
    whole window), except while ``dst``'s link has at most EARLY_CREDIT bytes unsent in all:
    then the credit goes at once (no wait for a flush, so a small answer, its head and FIN
    leave in one). Every relay on a link checks that same total after its write, so the bytes
    credited early and not yet sent stay under EARLY_CREDIT per link. An error on either side
    resets the other with the same code, except when ``dst`` failed unprocessed (its agent
    never ran it): the relay then tells the other node so."""
    try:
        while data := await src.read():
            await dst.write(data)
            if dst.link.unsent > EARLY_CREDIT:
                await dst.link.sent()
            src.consumed(len(data))
        dst.write_eof()
    except CSCError as err:
        dst.reset(err)
        if not dst.unprocessed:
            src.reset(err)
        raise


# -- the dialling side (node B) ----------------------------------------------------------------


class _NotAdmitted(Exception):
    """The other node did not answer a forwarded OPEN within :data:`ADMISSION_TIMEOUT`."""


def _admission_due(opened: asyncio.Future[dict[str, Any]]) -> None:
    if not opened.done():
        opened.set_exception(_NotAdmitted())


@dataclass(eq=False)
class _Dialled:
    address: str
    link: Link
    pump: asyncio.Task[None]
    writer: asyncio.StreamWriter


@dataclass(eq=False)
class PeerPool:
    """Persistent links from this node to the others, dialled on first use."""

    node_id: str
    key: bytes
    settings: LinkSettings
    on_link_change: Callable[[], None] = lambda: None
    #: the dialler's TLS context (csc/cluster/peertls.py); None: plain TCP (``peer_tls=false``)
    tls: ssl.SSLContext | None = None
    _links: dict[str, _Dialled] = field(default_factory=dict)
    _dialling: dict[str, asyncio.Future[_Dialled]] = field(default_factory=dict)
    _suspect: dict[str, float] = field(default_factory=dict)

    @property
    def up(self) -> int:
        return sum(1 for d in self._links.values() if not d.link.is_closed)

    def suspect(self, node: str) -> bool:
        """Whether ``node``'s link broke or could not be dialled moments ago (it is then
        skipped for a few seconds, sooner than its lease would tell)."""
        until = self._suspect.get(node)
        if until is None:
            return False
        if until < time.monotonic():
            del self._suspect[node]
            return False
        return True

    def mark_suspect(self, node: str) -> None:
        self._suspect[node] = time.monotonic() + SUSPECT_FOR

    async def open(self, node: str, address: str, info: dict[str, Any]) -> PeerStream:
        """Open a stream to ``node`` and wait for its admission; raises the refusal."""
        dialled = await self._link(node, address)
        stream = dialled.link.open(info)
        # one timer, not an asyncio.timeout block: this runs for every forwarded request
        timer = dialled.link.loop.call_later(ADMISSION_TIMEOUT, _admission_due, stream.opened)
        try:
            await stream.opened
        except _NotAdmitted:
            stream.reset(Cancelled("no admission in time"))
            self.mark_suspect(node)  # alive enough to keep its link, too slow to use now
            raise PortalOffline(f"node {node} did not admit the stream in time") from None
        except BaseException:
            stream.finish()
            raise
        finally:
            timer.cancel()
        return PeerStream(stream, node)

    async def _link(self, node: str, address: str) -> _Dialled:
        current = self._links.get(node)
        if current is not None and not current.link.is_closed and current.address == address:
            return current
        if current is not None:
            await self._drop(node)
        waiting = self._dialling.get(node)
        if waiting is None:
            waiting = asyncio.ensure_future(self._dial(node, address))
            self._dialling[node] = waiting
            waiting.add_done_callback(lambda _f: self._dialling.pop(node, None))
        try:
            return await asyncio.shield(waiting)
        except (OSError, TimeoutError, CSCError) as exc:
            self.mark_suspect(node)
            raise PortalOffline(f"node {node} cannot be reached ({exc!r})") from None

    async def _dial(self, node: str, address: str) -> _Dialled:
        try:
            return await self._dial_once(node, address)
        except (ssl.SSLError, ConnectionResetError) as exc:
            if self.tls is None:
                raise
            log.warning(
                "peer link to node %s (%s) failed: %s", node, address, peertls.describe(exc)
            )
            raise
        except ProtocolError as exc:
            log.warning("peer link to node %s (%s) failed: %s", node, address, exc.message)
            raise

    async def _dial_once(self, node: str, address: str) -> _Dialled:
        host, port = parse_hostport(address)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(DIAL_TIMEOUT):
            reader, writer = await asyncio.open_connection(
                host,
                port,
                limit=READ_SIZE,
                ssl=self.tls,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT if self.tls is not None else None,
            )
            try:
                conn = Connection(Side.CLIENT, self.settings, accept_streams=False, now=loop.time())
                conn.send_hello(
                    {"node": self.node_id, "token": peer_token(self.key, self.node_id, node)}
                )
                writer.writelines(conn.data_to_send())
                _, pending = await _handshake_events(reader, conn, WelcomeReceived)
            except BaseException:
                writer.close()
                raise
        link = Link(conn, _sender(writer), name=f"peer to {node}", pending=pending)
        pump = loop.create_task(self._run(node, reader, link), name=f"peer-pump-{node}")
        dialled = _Dialled(address, link, pump, writer)
        self._links[node] = dialled
        self._suspect.pop(node, None)
        log.info("peer link to node %s (%s) up (%s)", node, address, _transport(writer))
        self.on_link_change()
        return dialled

    async def _run(self, node: str, reader: asyncio.StreamReader, link: Link) -> None:
        try:
            await _pump(reader, link)
        finally:
            current = self._links.get(node)
            if current is not None and current.link is link:
                del self._links[node]
                _end_transport(current.writer, link)
                self.mark_suspect(node)  # skipped until it answers a dial again
                log.info("peer link to node %s down", node)
                self.on_link_change()

    async def _drop(self, node: str) -> None:
        dialled = self._links.pop(node, None)
        if dialled is None:
            return
        dialled.link.close(GoingAway("peer link replaced"))
        dialled.writer.close()
        await cancel_quietly(dialled.pump)
        await dialled.link.aclose()

    async def retain(self, nodes: set[str]) -> None:
        """Close the links of nodes that are no longer in the directory."""
        for node in [n for n in self._links if n not in nodes]:
            await self._drop(node)

    async def aclose(self) -> None:
        for waiting in list(self._dialling.values()):
            await cancel_quietly(waiting)
        for node in list(self._links):
            await self._drop(node)
