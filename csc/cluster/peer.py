"""Node-to-node peer links: a bootloader stream that arrives at node B for an alias whose agent is
on node A travels B→A over one persistent, authenticated link (docs/protocol.md §9).

A peer link is the agent-link protocol (shared/protocol: frames, streams, per-stream credit,
heartbeats) carried directly over TCP, without a WebSocket: the frame codec delimits frames by
itself. Unless ``peer_tls`` is off, that TCP connection is TLS 1.3 with a certificate required
on both sides (csc/cluster/peertls.py), the handshake bounded by ``HANDSHAKE_TIMEOUT``. B dials
(``Side.CLIENT``) and opens streams; A accepts them (``Side.SERVER``). B's HELLO carries a
short-lived HS256 token signed with the cluster secret (csc/cluster/peerauth.py), so only nodes
holding the secret can open streams and a token meant for one node is refused by another.

Streams on a peer link differ from agent-link streams in one way, so that B can try another node
when A cannot serve: A answers OPEN_OK once it has opened the stream on one of its own agent
sessions (*admission*; for a stream without a body, together with the agent's answer when that
comes within ``ADMISSION_HOLD``), or OPEN_FAIL at once when it has none (``portal_offline``) or
is draining (``going_away``). The agent's answer then comes as the first DATA bytes of the
stream (csc/cluster/peerstream.py, where :class:`~csc.cluster.peerstream.PeerStream` turns it
back into what the ingress expects of an agent stream); an agent refusal after admission is an
RST with the agent's code, except a refusal that proves the agent never ran the stream (it was
going away: ``LinkStream.unprocessed``), which comes as the head ``{"unprocessed": true}`` so
that B may open the stream again elsewhere.

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
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from csc.cluster import peertls
from csc.cluster.peerauth import peer_token, verify_peer_token
from csc.cluster.peerstream import UNPROCESSED, PeerStream, encode_head
from csc.cluster.peerwire import PeerWire
from shared.aio import cancel_quietly, fail_at
from shared.errors import (
    Cancelled,
    CSCError,
    GoingAway,
    LinkStalled,
    PortalOffline,
    ProtocolError,
)
from shared.link import Link
from shared.linkstream import LinkStream
from shared.protocol import (
    Connection,
    Event,
    HelloReceived,
    LinkSettings,
    Side,
    WelcomeReceived,
)
from shared.units import parse_hostport

log = logging.getLogger("csc.peer")

HANDSHAKE_TIMEOUT = 5.0
DIAL_TIMEOUT = 3.0
#: A node answers OPEN within ADMISSION_HOLD (admission); one that takes this long is stuck
#: (paused, overloaded) and the next node is tried.
ADMISSION_TIMEOUT = 2.0
#: A holds the admission of a bodyless stream this long at most, to send it with the answer.
ADMISSION_HOLD = 0.25
#: How long a node whose link could not be dialled (or broke) is skipped before it is tried
#: again: that incarnation of it only (its epoch), since one back under the same id is new.
SUSPECT_FOR = 3.0
#: A relay credits its source without waiting for the flush while the next hop's link has no
#: more than this many bytes unsent (see ``_pipe``).
EARLY_CREDIT = 64 * 1024
# -- transport ---------------------------------------------------------------------------------


async def _pump(wire: PeerWire, link: Link) -> None:
    """Feed the socket's bytes to the link until either ends; then close the link. Reading
    waits while the link's answers cannot be sent (:meth:`Link.wait_readable`); a short chunk
    that arrives while this waits is fed by the wire itself (csc/cluster/peerwire.py)."""
    wire.attach(link)
    try:
        while True:
            await link.wait_readable()
            if link.is_closed or not (data := await wire.read()):
                break
            await link.receive(data)
    except (CSCError, OSError):
        pass
    finally:
        link.close()


def _end_transport(wire: PeerWire, link: Link) -> None:
    """Close the socket of a link that ended; abort it when the peer stopped reading (what is
    still buffered for it would never leave)."""
    if link.closed.done() and isinstance(link.closed.result(), LinkStalled):
        wire.abort()
    else:
        wire.close()


def _transport(wire: PeerWire) -> str:
    """``TLSv1.3`` or ``plain TCP``, for the link-up log lines."""
    tls = wire.get_extra_info("ssl_object")
    return "plain TCP" if tls is None else str(tls.version())


E = TypeVar("E", bound=Event)


async def _handshake_events(
    wire: PeerWire, conn: Connection, want: type[E]
) -> tuple[E, list[Event]]:
    """Read until ``want`` arrives: that event and the ones after it."""
    loop = asyncio.get_running_loop()
    first = True
    while True:
        data = await wire.read()
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
        self._server = await asyncio.get_running_loop().create_server(
            lambda: PeerWire(self._accept),
            host,
            port,
            ssl=self.tls,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT if self.tls is not None else None,
        )
        sockname = self._server.sockets[0].getsockname()
        self.address = sockname[0], sockname[1]
        return self.address

    def _accept(self, wire: PeerWire) -> None:
        task = wire.loop.create_task(self._serve(wire))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, wire: PeerWire) -> None:
        peer = wire.get_extra_info("peername")
        loop = asyncio.get_running_loop()
        conn = Connection(Side.SERVER, self.settings, accept_streams=True, now=loop.time())
        conn.pass_opens = True  # this node only relays: the agent reads the heads
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                hello, pending = await _handshake_events(wire, conn, HelloReceived)
            source = verify_peer_token(self.key, hello.info.get("token"), self.node_id)
        except TimeoutError:
            log.warning("peer link from %s refused: no HELLO within %ss", peer, HANDSHAKE_TIMEOUT)
            wire.close()
            return
        except (CSCError, OSError) as exc:
            log.warning("peer link from %s refused: %s", peer, getattr(exc, "message", exc))
            wire.close()
            return
        conn.send_welcome({"node": self.node_id}, loop.time())
        link = Link(
            conn,
            wire.send,
            on_stream=self._relay,
            on_stream_now=self._relay_now,
            name=f"peer {source}",
            pending=pending,
        )
        self.links.add(link)
        log.info("peer link from node %s up (%s)", source, _transport(wire))
        try:
            await _pump(wire, link)
        finally:
            self.links.discard(link)
            await link.aclose()
            _end_transport(wire, link)
            log.info("peer link from node %s down", source)

    def _relay_now(self, stream: LinkStream) -> bool:
        """A stream that came with its FIN (no body: most requests) is relayed without a task
        of its own (:class:`_QuickRelay`); False for one with a body (:meth:`_relay`)."""
        if not stream.read_done:
            return False
        try:
            inner = self.open_local(stream.info)
        except CSCError as err:
            stream.reject(err)
            return True
        _QuickRelay(self, stream, inner)
        return True

    async def _relay(self, stream: LinkStream) -> None:
        try:
            inner = self.open_local(stream.info)
        except CSCError as err:
            stream.reject(err)
            return
        admission = _Admission(stream)
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
                if inner.unprocessed:
                    await cancel_quietly(upload)
                    if upload is not None and not upload.cancelled():
                        upload.exception()  # retrieved: the marker reports the refusal
                _refuse(stream, inner, err)
                return
            admission.now()  # with the head, in the same write when it was held
            binary = stream.link.conn.binary_heads
            await stream.write(encode_head(head, binary=binary, raw=inner.binary_head))
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


class _QuickRelay:
    """Relays a forwarded stream that came with its FIN by callbacks, not by a task: the FIN
    goes on to the agent at once, and the agent's answer (head, body, FIN) goes back to B from
    the callback of its ``opened`` when it came whole and fits B's credit, in the same write as
    the admission when that was held. A longer answer is copied by a task as :meth:`PeerServer._relay`
    does. Either stream failing resets the other with the same error (B's reset, or the end of
    its link, reaches the agent at once)."""

    __slots__ = ("_admission", "_ended", "_inner", "_server", "_stream")

    def __init__(self, server: PeerServer, stream: LinkStream, inner: LinkStream) -> None:
        self._server, self._stream, self._inner = server, stream, inner
        self._ended = False
        self._admission = _Admission(stream)
        server.stream_started()
        server.relaying += 1
        self._admission.hold()
        inner.write_eof()
        inner.opened.add_done_callback(self._answered)
        stream.opened.add_done_callback(self._source_failed)

    def _source_failed(self, opened: asyncio.Future[dict[str, Any]]) -> None:
        """B's stream failed (its reset, or the peer link's end): so does the agent's."""
        err = self._stream.error
        if not self._ended and err is not None:
            self._inner.reset(err)
            self._end()

    def _answered(self, opened: asyncio.Future[dict[str, Any]]) -> None:
        if self._ended:
            return
        stream, inner, admission = self._stream, self._inner, self._admission
        admission.now()
        if opened.cancelled() or (err := opened.exception()) is not None:
            failure = err if isinstance(err, CSCError) else Cancelled("the relay was cancelled")
            with contextlib.suppress(CSCError):  # B's stream failed meanwhile: nothing to tell
                _refuse(stream, inner, failure)
            self._end()
            return
        binary = stream.link.conn.binary_heads
        head = encode_head(opened.result(), binary=binary, raw=inner.binary_head)
        body = inner.read_complete()
        try:
            if body is not None and stream.write_whole(head + body if body else head):
                stream.write_eof()
                if body:
                    inner.consumed(len(body))
                self._end()
                return
        except CSCError as gone:  # B's stream failed meanwhile
            inner.reset(gone)
            self._end()
            return
        task = stream.link.loop.create_task(self._copy(head, body))
        self._server._tasks.add(task)
        task.add_done_callback(self._server._tasks.discard)

    async def _copy(self, head: bytes, body: bytes | None) -> None:
        """The rest of an answer that did not fit B's credit, or is still arriving."""
        stream, inner = self._stream, self._inner
        try:
            await stream.write(head)
            if body is not None:
                if body:
                    await stream.write(body)
                    inner.consumed(len(body))
                stream.write_eof()
            else:
                await _pipe(inner, stream)
        except CSCError as err:
            stream.reset(err)
            inner.reset(err)
        finally:
            self._end()

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        self._admission.cancel()
        self._inner.opened.remove_done_callback(self._answered)
        self._stream.opened.remove_done_callback(self._source_failed)
        self._inner.finish()
        self._stream.finish()
        self._server.relaying -= 1
        self._server.stream_finished()


def _refuse(stream: LinkStream, inner: LinkStream, err: CSCError) -> None:
    """Pass the agent's refusal of ``inner`` on to B: as the head ``{"unprocessed": true}``
    when the agent never ran it (B may try elsewhere), else as an RST with its code."""
    if inner.unprocessed and stream.write_whole(encode_head({UNPROCESSED: True})):
        stream.write_eof()
    else:
        stream.reset(err)


class _Admission:
    """When A answers OPEN_OK for a stream it relays. A stream that came with its FIN (no
    body: most requests) is admitted together with its answer when the agent answers within
    :data:`ADMISSION_HOLD`, so B reads OPEN_OK, the head and the body in one piece instead of
    waking twice; a slower answer is admitted when the hold ends, well within B's
    :data:`ADMISSION_TIMEOUT`. A stream with a body, and any failure, is admitted at once (an
    error after admission reaches B as the agent's own, not as a refusal to try elsewhere)."""

    __slots__ = ("_stream", "_timer", "admitted")

    def __init__(self, stream: LinkStream) -> None:
        self._stream = stream
        self._timer: asyncio.TimerHandle | None = None
        self.admitted = False

    def hold(self) -> None:
        self._timer = self._stream.link.loop.call_later(ADMISSION_HOLD, self.now)

    def now(self) -> None:
        self.cancel()
        if not self.admitted and not self._stream.done:
            self.admitted = True
            self._stream.accept({})

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


@dataclass(eq=False)
class _Dialled:
    address: str
    link: Link
    pump: asyncio.Task[None]
    wire: PeerWire
    #: the epoch of the node's incarnation that the latest stream was opened for
    epoch: int


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
    #: dials in progress by (node, address): a node back under its id at another address is
    #: dialled there at once, whatever became of a dial to its old one
    _dialling: dict[tuple[str, str], asyncio.Future[_Dialled]] = field(default_factory=dict)
    _suspect: dict[str, tuple[int, float]] = field(default_factory=dict)  # node: epoch, until

    @property
    def up(self) -> int:
        return sum(1 for d in self._links.values() if not d.link.is_closed)

    def suspect(self, node: str, epoch: int) -> bool:
        """Whether the link to ``node`` under ``epoch`` broke or could not be dialled moments
        ago (it is then skipped for a few seconds, sooner than its lease would tell). The
        node back under the same id with another epoch (restarted, or fenced) is not."""
        mark = self._suspect.get(node)
        if mark is None:
            return False
        if mark[1] < time.monotonic():
            del self._suspect[node]
            return False
        return mark[0] == epoch

    def mark_suspect(self, node: str, epoch: int) -> None:
        self._suspect[node] = (epoch, time.monotonic() + SUSPECT_FOR)

    async def open(self, node: str, address: str, epoch: int, info: dict[str, Any]) -> PeerStream:
        """Open a stream to ``node`` (its incarnation ``epoch``, as the directory names it)
        and wait for its admission; raises the refusal."""
        dialled = await self._link(node, address, epoch)
        stream = dialled.link.open(info)
        if info.get("kind") == "http" and info.get("body") is False:
            stream.write_eof()  # with the OPEN: A may admit it with the agent's answer
        fail_at(stream.opened, dialled.link.loop.time() + ADMISSION_TIMEOUT, _NotAdmitted)
        try:
            await stream.opened
        except _NotAdmitted:
            stream.reset(Cancelled("no admission in time"))
            self.mark_suspect(node, epoch)  # alive enough to keep its link, too slow to use now
            raise PortalOffline(f"node {node} did not admit the stream in time") from None
        except BaseException:
            stream.finish()
            raise
        return PeerStream(stream, node)

    async def _link(self, node: str, address: str, epoch: int) -> _Dialled:
        current = self._links.get(node)
        if current is not None and not current.link.is_closed and current.address == address:
            current.epoch = epoch  # a fenced node takes a new epoch and keeps its listener
            return current
        if current is not None:
            await self._drop(node)
        key = (node, address)
        waiting = self._dialling.get(key)
        if waiting is None:
            waiting = asyncio.ensure_future(self._dial(node, address, epoch))
            self._dialling[key] = waiting
            waiting.add_done_callback(lambda _f: self._dialling.pop(key, None))
        try:
            return await asyncio.shield(waiting)
        except (OSError, TimeoutError, CSCError) as exc:
            self.mark_suspect(node, epoch)
            raise PortalOffline(f"node {node} cannot be reached ({exc!r})") from None

    async def _dial(self, node: str, address: str, epoch: int) -> _Dialled:
        try:
            return await self._dial_once(node, address, epoch)
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

    async def _dial_once(self, node: str, address: str, epoch: int) -> _Dialled:
        host, port = parse_hostport(address)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(DIAL_TIMEOUT):
            _, wire = await loop.create_connection(
                PeerWire,
                host,
                port,
                ssl=self.tls,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT if self.tls is not None else None,
            )
            try:
                conn = Connection(Side.CLIENT, self.settings, accept_streams=False, now=loop.time())
                conn.send_hello(
                    {"node": self.node_id, "token": peer_token(self.key, self.node_id, node)}
                )
                wire.write(conn.data_to_send())
                _, pending = await _handshake_events(wire, conn, WelcomeReceived)
            except BaseException:
                wire.close()
                raise
        link = Link(conn, wire.send, name=f"peer to {node}", pending=pending)
        pump = loop.create_task(self._run(node, wire, link), name=f"peer-pump-{node}")
        dialled = _Dialled(address, link, pump, wire, epoch)
        replaced = self._links.get(node)
        self._links[node] = dialled
        if replaced is not None:  # a dial to the node's other address finished first
            replaced.link.close(GoingAway("peer link replaced"))
            replaced.wire.close()
        self._suspect.pop(node, None)
        log.info("peer link to node %s (%s) up (%s)", node, address, _transport(wire))
        self.on_link_change()
        return dialled

    async def _run(self, node: str, wire: PeerWire, link: Link) -> None:
        try:
            await _pump(wire, link)
        finally:
            current = self._links.get(node)
            if current is not None and current.link is link:
                del self._links[node]
                _end_transport(current.wire, link)
                self.mark_suspect(node, current.epoch)  # skipped until it answers a dial again
                log.info("peer link to node %s down", node)
                self.on_link_change()

    async def _drop(self, node: str) -> None:
        dialled = self._links.pop(node, None)
        if dialled is None:
            return
        dialled.link.close(GoingAway("peer link replaced"))
        dialled.wire.close()
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
