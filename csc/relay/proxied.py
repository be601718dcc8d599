"""Listeners behind a balancer that sends the PROXY protocol (the ``proxy_protocol`` setting).

A connection from a peer in ``proxy_protocol`` (the balancer's addresses) must start with a
PROXY header (csc/relay/proxyheader.py): it is read exactly, within ``http_head_timeout``, before
anything else, TLS included, and the client address it names becomes the connection's client for
the bounds per address, the access log and ``X-Forwarded-For``. A connection from any other peer
(a health check of the kubelet, a device that reaches a node directly) is served as it comes. A
trusted peer's connection without a valid header is closed, counted and logged.

Reading the header exactly (never a byte of what follows it, so that TLS can start on the
socket afterwards) needs the socket before any transport reads from it, so these listeners
accept by themselves (:class:`ProxiedServer`) and hand each socket, with its client, to the
listener's own protocol through ``loop.connect_accepted_socket``. Connections of trusted peers
waiting for their header are bounded (``pending``, :data:`PENDING`); beyond that, new ones from
those peers are closed at once (each waits ``http_head_timeout`` at most).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from ssl import SSLContext

from csc.config import CSCConfig
from csc.relay.conncap import LOG_EVERY, LogTally
from csc.relay.proxyheader import ProxyHeader, ProxyHeaderError, parse
from shared.aio import cancel_quietly
from shared.runtime import bound_sockets

log = logging.getLogger("csc.relay")

#: ``(socket, client)``: serve an accepted connection; ``client`` is what its header named (None:
#: the peer's own address stands)
Connect = Callable[[socket.socket, "tuple[str, int] | None"], Awaitable[None]]
#: connections of trusted peers that may be reading their header at once, per listener
PENDING = 1024
#: after an error of ``accept`` itself (out of file descriptors), wait this long before the next
ACCEPT_PAUSE = 0.1


class TrustedPeers:
    """The addresses allowed, and required, to send a PROXY header."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


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
    ``connect``, after reading the PROXY header of a trusted peer. Quacks like the parts of
    ``asyncio.Server`` the node uses: ``sockets``, ``close()``, ``wait_closed()``."""

    def __init__(
        self,
        sockets: Sequence[socket.socket],
        trusted: TrustedPeers,
        connect: Connect,
        *,
        timeout: float,
        listener: str,
        on_refused: Callable[[str, str], None] | None = None,
        pending: int = PENDING,
        backlog: int = 1024,
    ) -> None:
        self.sockets = list(sockets)
        self.trusted = trusted
        self.connect = connect
        self.timeout = timeout
        #: ``http`` or ``tcp``: in log lines and for ``on_refused(listener, "proxy_header")``
        self.listener = listener
        self.on_refused = on_refused
        self.pending = pending
        self.backlog = backlog
        #: connections from trusted peers closed for a missing, late or malformed header
        self.refused = 0
        self._tally = LogTally()
        self._accepting: list[asyncio.Task[None]] = []
        self._admitting: set[asyncio.Task[None]] = set()
        self._reading = 0  # connections of trusted peers reading their header

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
        while True:
            try:
                sock, address = await loop.sock_accept(listening)
            except OSError as exc:  # out of file descriptors, a connection reset in the queue
                log.warning("%s listener: cannot accept: %s", self.listener, exc)
                await asyncio.sleep(ACCEPT_PAUSE)
                continue
            peer = str(address[0])
            trusted = peer in self.trusted
            if trusted and self._reading >= self.pending:
                self._refuse(sock, peer, f"{self._reading} connections wait for their header")
                continue
            task = loop.create_task(self._admit(sock, peer, trusted))
            self._admitting.add(task)
            task.add_done_callback(self._admitting.discard)

    async def _admit(self, sock: socket.socket, peer: str, trusted: bool) -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        client: tuple[str, int] | None = None
        try:
            if trusted:
                self._reading += 1
                try:
                    async with asyncio.timeout(self.timeout):
                        client = (await read_header(loop, sock)).client
                except (ProxyHeaderError, TimeoutError, OSError) as exc:
                    late = isinstance(exc, TimeoutError)
                    self._refuse(
                        sock, peer, f"no header within {self.timeout:g} s" if late else exc
                    )
                    return
                finally:
                    self._reading -= 1
            await self.connect(sock, client)
        except OSError as exc:  # the TLS handshake failed, the peer went away
            log.debug("%s listener: connection from %s ended at once: %s", self.listener, peer, exc)
            sock.close()
        except BaseException:
            sock.close()
            raise

    def _refuse(self, sock: socket.socket, peer: str, why: object) -> None:
        """Close a trusted peer's connection without a valid header; count it, and log at
        most one line per :data:`LOG_EVERY` (a balancer that sends none would log each)."""
        sock.close()
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


def listen_proxied(
    config: CSCConfig,
    host: str | None,
    port: int,
    protocol_for: Callable[[tuple[str, int] | None], Callable[[], asyncio.BaseProtocol]],
    *,
    ssl: SSLContext | None,
    handshake: float | None,
    listener: str,
    on_refused: Callable[[str, str], None] | None,
) -> ProxiedServer | None:
    """With ``proxy_protocol`` set, a listener on ``host:port`` that reads the trusted peers'
    headers and serves each connection with ``protocol_for(client)()`` (TLS first with
    ``ssl``); None without it (the caller listens as usual)."""
    trusted = TrustedPeers(config.proxy_protocol)
    if not trusted:
        return None
    loop = asyncio.get_running_loop()

    async def connect(sock: socket.socket, client: tuple[str, int] | None) -> None:
        await loop.connect_accepted_socket(
            protocol_for(client), sock, ssl=ssl, ssl_handshake_timeout=handshake
        )

    server = ProxiedServer(
        bound_sockets(host, port),
        trusted,
        connect,
        timeout=config.http_head_timeout,
        listener=listener,
        on_refused=on_refused,
    )
    server.start()
    return server
