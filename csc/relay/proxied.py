"""Listeners behind a balancer that sends the PROXY protocol (the ``proxy_protocol`` setting).

A connection from a peer in ``proxy_protocol`` (the balancer's addresses) must start with a
PROXY header (csc/relay/proxyheader.py), read within ``http_head_timeout`` before anything else,
TLS included; the client address it names becomes the connection's client for the bounds per
address, the access log and ``X-Forwarded-For``. A connection from any other peer (a health
check of the kubelet, a device that reaches a node directly) is served as it comes. A trusted
peer's connection without a valid header is closed, counted and logged (:class:`ProxyGate`).
Connections of trusted peers waiting for their header are bounded (:data:`PENDING` per
listener); beyond that, new ones from those peers are closed at once.

Two ways in, by whether the node terminates TLS on the listener:

* without TLS, the listener is the event loop's own server with :class:`HeaderFirst` as its
  protocol: it reads the header from what arrives and then hands the transport, with the client
  and the bytes after the header, to the listener's protocol (``set_protocol``); a peer that is
  not a balancer is handed over at once. Accepting stays in the loop's C code.
* with TLS, the header must be read exactly, never a byte of the ClientHello after it, which
  needs the socket before any transport reads from it: :class:`ProxiedServer` accepts by
  itself, reads what :func:`parse` asks for and nothing more, and hands the socket to the
  listener's protocol through ``loop.connect_accepted_socket``, which starts TLS.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from ssl import SSLContext
from typing import cast

from csc.config import CSCConfig
from csc.relay.conncap import LOG_EVERY, LogTally
from csc.relay.proxyheader import ProxyHeader, ProxyHeaderError, parse
from shared.aio import cancel_quietly
from shared.peers import TrustedPeers
from shared.runtime import bound_sockets, listen_on

log = logging.getLogger("csc.relay")

#: ``(socket, client)``: serve an accepted connection; ``client`` is what its header named (None:
#: the peer's own address stands)
Connect = Callable[[socket.socket, "tuple[str, int] | None"], Awaitable[None]]
#: ``client -> protocol factory``: the listener's own protocol for a connection of ``client``
ProtocolFor = Callable[["tuple[str, int] | None"], Callable[[], asyncio.BaseProtocol]]
#: connections of trusted peers that may be reading their header at once, per listener
PENDING = 1024
#: after an error of ``accept`` itself (out of file descriptors), wait this long before the next
ACCEPT_PAUSE = 0.1


class ProxyGate:
    """What a listener's connections share: the trusted peers, the deadline, the bound on
    connections reading their header, and the refusals (counted, logged once per
    :data:`LOG_EVERY`)."""

    def __init__(
        self,
        trusted: TrustedPeers,
        *,
        timeout: float,
        listener: str,
        on_refused: Callable[[str, str], None] | None = None,
        pending: int = PENDING,
    ) -> None:
        self.trusted = trusted
        self.timeout = timeout
        #: ``http`` or ``tcp``: in log lines and for ``on_refused(listener, "proxy_header")``
        self.listener = listener
        self.on_refused = on_refused
        self.pending = pending
        #: connections of trusted peers reading their header now
        self.reading = 0
        #: connections of trusted peers closed for a missing, late or malformed header
        self.refused = 0
        self._tally = LogTally()

    def full(self) -> bool:
        return self.reading >= self.pending

    def refuse(self, peer: str, why: object) -> None:
        """Count a trusted peer's connection closed without a valid header; log at most one
        line per :data:`LOG_EVERY` (a balancer that sends none would log each)."""
        self.refused += 1
        if self.on_refused is not None:
            self.on_refused(self.listener, "proxy_header")
        if count := self._tally.due():
            log.warning(
                "%s listener: closed %d connection(s) of a proxy_protocol peer in the last %g s "
                "that had no valid PROXY header; the last from %s: %s",
                self.listener,
                count,
                LOG_EVERY,
                peer,
                why,
            )


class HeaderFirst(asyncio.Protocol):
    """The protocol of a listener without TLS: the PROXY header of a trusted peer, then the
    listener's own protocol (``protocol_for(client)()``) on the same transport."""

    def __init__(self, gate: ProxyGate, protocol_for: ProtocolFor) -> None:
        self.gate = gate
        self.protocol_for = protocol_for
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self._data = b""
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        gate = self.gate
        if self.peer not in gate.trusted:
            self._hand_over(None, b"")
            return
        if gate.full():
            self._refuse(f"{gate.reading} connections wait for their header")
            return
        gate.reading += 1
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(gate.timeout, self._late)

    def data_received(self, data: bytes) -> None:
        if self.transport is None:  # refused: what a transport still delivers is dropped
            return
        self._data += data
        try:
            found = parse(self._data)
        except ProxyHeaderError as exc:
            self._refuse(exc)
            return
        if isinstance(found, ProxyHeader):
            self._done_reading()
            self._hand_over(found.client, self._data[found.length :])

    def eof_received(self) -> bool | None:
        if self.transport is not None:
            self._refuse("the connection closed within its PROXY protocol header")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._done_reading()

    def _late(self) -> None:
        self._refuse(f"no header within {self.gate.timeout:g} s")

    def _done_reading(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self.gate.reading -= 1

    def _refuse(self, why: object) -> None:
        self._done_reading()
        self.gate.refuse(self.peer, why)
        transport, self.transport, self._data = self.transport, None, b""
        if transport is not None:
            transport.abort()

    def _hand_over(self, client: tuple[str, int] | None, rest: bytes) -> None:
        transport = self.transport
        assert transport is not None
        self.transport, self._data = None, b""
        protocol = self.protocol_for(client)()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if rest and not transport.is_closing():
            cast(asyncio.Protocol, protocol).data_received(rest)


async def read_header(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> ProxyHeader:
    """The PROXY header at the start of ``sock``, read exactly (ProxyHeaderError if there is
    none, or the peer closed within it)."""
    data = b""
    while not isinstance(found := parse(data), ProxyHeader):
        chunk = await loop.sock_recv(sock, found)
        if not chunk:
            raise ProxyHeaderError("the connection closed within its PROXY protocol header")
        data += chunk
    return found


class ProxiedServer:
    """Accepts on ``sockets`` (bound, not yet listening) and serves each connection through
    ``connect``, after reading the PROXY header of a trusted peer exactly. Quacks like the
    parts of ``asyncio.Server`` the node uses: ``sockets``, ``close()``, ``wait_closed()``."""

    def __init__(
        self, sockets: Sequence[socket.socket], gate: ProxyGate, connect: Connect, backlog: int
    ) -> None:
        self.sockets = list(sockets)
        self.gate = gate
        self.connect = connect
        self.backlog = backlog
        self._accepting: list[asyncio.Task[None]] = []
        self._admitting: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            sock.listen(self.backlog)
            sock.setblocking(False)
            self._accepting.append(loop.create_task(self._accept_forever(sock)))

    def close(self) -> None:
        """Stop accepting; connections waiting for their header are closed."""
        for task in self._accepting + list(self._admitting):
            task.cancel()
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self) -> None:
        for task in self._accepting + list(self._admitting):
            await cancel_quietly(task)

    async def _accept_forever(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        gate = self.gate
        while True:
            try:
                sock, address = await loop.sock_accept(listening)
            except OSError as exc:  # out of file descriptors, a connection reset in the queue
                log.warning("%s listener: cannot accept: %s", gate.listener, exc)
                await asyncio.sleep(ACCEPT_PAUSE)
                continue
            peer = str(address[0])
            trusted = peer in gate.trusted
            if trusted and gate.full():
                sock.close()
                gate.refuse(peer, f"{gate.reading} connections wait for their header")
                continue
            task = loop.create_task(self._admit(sock, peer, trusted))
            self._admitting.add(task)
            task.add_done_callback(self._admitting.discard)

    async def _admit(self, sock: socket.socket, peer: str, trusted: bool) -> None:
        loop = asyncio.get_running_loop()
        gate = self.gate
        sock.setblocking(False)
        client: tuple[str, int] | None = None
        try:
            if trusted:
                gate.reading += 1
                try:
                    async with asyncio.timeout(gate.timeout):
                        client = (await read_header(loop, sock)).client
                except (ProxyHeaderError, TimeoutError, OSError) as exc:
                    sock.close()
                    late = isinstance(exc, TimeoutError)
                    gate.refuse(peer, f"no header within {gate.timeout:g} s" if late else exc)
                    return
                finally:
                    gate.reading -= 1
            await self.connect(sock, client)
        except OSError as exc:  # the TLS handshake failed, the peer went away
            log.debug("%s listener: connection from %s ended at once: %s", gate.listener, peer, exc)
            sock.close()
        except BaseException:
            sock.close()
            raise


async def listen_proxied(
    config: CSCConfig,
    host: str | None,
    port: int,
    protocol_for: ProtocolFor,
    *,
    ssl: SSLContext | None,
    handshake: float | None,
    listener: str,
    on_refused: Callable[[str, str], None] | None,
    backlog: int = 1024,
) -> asyncio.Server | ProxiedServer | None:
    """With ``proxy_protocol`` set, a listener on ``host:port`` that reads the trusted peers'
    headers and serves each connection with ``protocol_for(client)()`` (TLS first with
    ``ssl``); None without it (the caller listens as usual)."""
    trusted = TrustedPeers(config.proxy_protocol)
    if not trusted:
        return None
    gate = ProxyGate(
        trusted, timeout=config.http_head_timeout, listener=listener, on_refused=on_refused
    )
    loop = asyncio.get_running_loop()
    if ssl is None:
        return await loop.create_server(
            lambda: HeaderFirst(gate, protocol_for), **listen_on(host, port), backlog=backlog
        )

    async def connect(sock: socket.socket, client: tuple[str, int] | None) -> None:
        await loop.connect_accepted_socket(
            protocol_for(client), sock, ssl=ssl, ssl_handshake_timeout=handshake
        )

    server = ProxiedServer(bound_sockets(host, port), gate, connect, backlog)
    server.start()
    return server
