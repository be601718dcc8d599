"""The raw TCP ingress: ``CONNECT <alias>\\r\\n``, then ``OK\\r\\n`` and bytes both ways.

The first line (at most :data:`MAX_LINE` bytes, enforced while reading, within the handshake
timeout) names the alias; every refusal is one ``ERR <status> <code>: <message>\\r\\n`` line
(shared/errors.py) followed by a close. After ``OK`` the connection is spliced to a ``tcp``
stream with half-close both ways; the CSC never interprets those bytes (they are usually TLS
end to end). A client that acknowledges none of the bytes waiting for it within
``client_send_timeout`` is aborted (shared/sendwatch.py), also after the tunnel's end. The
bytes waiting for it, and those read from it that wait for the stream's credit, count toward
the node's ``client_buffer_limit``; past it the connection may be closed earlier.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as ssl_module
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from csc.relay import accesslog
from csc.relay.conncap import ConnectionCounts
from csc.relay.http_front import LINGER
from csc.relay.ingress_stream import StreamUse, refused
from csc.relay.proxied import ProxiedServer, listen_proxied
from csc.relay.routing import lookup_alias, open_stream
from csc.state import NodeState
from shared.aio import splice
from shared.errors import BadRequest, Cancelled, CSCError, UpstreamTimeout, tcp_err_line
from shared.headers import request_id_for
from shared.link import LinkCounters
from shared.linkstream import TunnelStream
from shared.runtime import listen_on
from shared.sendwatch import Hold, SendWatch

log = logging.getLogger("csc.tcp")

MAX_LINE = 512
#: StreamReader buffer limit: large, so that spliced bytes flow in big reads.
READ_LIMIT = 256 * 1024


async def _read_alias(reader: asyncio.StreamReader, timeout: float) -> str:
    """The alias of the ``CONNECT <alias>`` line, read through its newline and no further;
    BadRequest when there is none within ``timeout`` or within :data:`MAX_LINE` bytes.

    The line limit holds while reading: the reader's buffer limit is :data:`MAX_LINE` until
    the line is in (asyncio pauses the socket at twice the limit and ``readuntil`` gives up
    beyond it), so a client that sends a long line without a newline is answered at once
    instead of being buffered, up to :data:`READ_LIMIT`, for the whole handshake timeout.
    """
    with _line_limit(reader):
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), timeout)
        except TimeoutError:
            raise BadRequest(f"no CONNECT line within {timeout:g} s") from None
        except asyncio.LimitOverrunError:
            raise BadRequest(f"the CONNECT line is longer than {MAX_LINE} bytes") from None
        except asyncio.IncompleteReadError:
            raise BadRequest("the connection closed before a complete CONNECT line") from None
    return parse_connect_line(line)


def parse_connect_line(line: bytes) -> str:
    """The alias of one ``CONNECT <alias>`` line (its line ending included), or BadRequest."""
    if len(line) > MAX_LINE:
        raise BadRequest(f"the CONNECT line is longer than {MAX_LINE} bytes")
    try:
        text = line.decode("ascii").rstrip("\r\n")
    except UnicodeDecodeError:
        raise BadRequest("the CONNECT line must be ASCII") from None
    verb, _, alias = text.partition(" ")
    if verb != "CONNECT" or not alias.strip():
        raise BadRequest("expected 'CONNECT <alias>'")
    return alias.strip()


@contextlib.contextmanager
def _line_limit(reader: asyncio.StreamReader) -> Iterator[None]:
    """Lower the reader's buffer limit to :data:`MAX_LINE` for the block (asyncio has no public
    setter; ``_limit`` is what ``readuntil`` and the transport's pause/resume read)."""
    saved = getattr(reader, "_limit", None)
    if not isinstance(saved, int):  # pragma: no cover - every asyncio since 3.4 has it
        yield
        return
    reader._limit = MAX_LINE  # type: ignore[attr-defined]
    try:
        yield
    finally:
        reader._limit = saved  # type: ignore[attr-defined]


async def start_tcp_listener(
    state: NodeState,
    host: str | None,
    port: int,
    ssl: ssl_module.SSLContext | None,
    handshake: float | None,
) -> asyncio.Server | ProxiedServer:
    """The TCP listener: ``asyncio.start_server``, or behind a balancer that sends the PROXY
    protocol (``proxy_protocol``) a listener that reads it first (csc/relay/proxied.py)."""
    handle = make_handler(state)
    loop = asyncio.get_running_loop()

    def protocol_for(client: tuple[str, int] | None) -> Callable[[], asyncio.BaseProtocol]:
        def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Awaitable[None]:
            return handle(reader, writer, client)  # type: ignore[no-any-return]

        return lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader(READ_LIMIT, loop), serve)

    proxied = await listen_proxied(
        state.config,
        host,
        port,
        protocol_for,
        ssl=ssl,
        handshake=handshake,
        listener="tcp",
        on_refused=state.connections.on_refused,
        backlog=100,  # asyncio.start_server's
    )
    if proxied is not None:
        return proxied
    return await asyncio.start_server(
        handle, **listen_on(host, port), ssl=ssl, limit=READ_LIMIT, ssl_handshake_timeout=handshake
    )


def make_handler(state: NodeState):  # type: ignore[no-untyped-def]
    async def handle(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: tuple[str, int] | None = None,
    ) -> None:
        """Serve one connection; ``client``: what a balancer's PROXY header named (else the
        peer's own address stands)."""
        peer = client or writer.get_extra_info("peername")
        counts = state.connections
        counted = counts.take(str(peer[0]) if peer else "", "tcp")
        traffic = LinkCounters()
        watch = SendWatch(
            writer.transport,
            state.config.client_send_timeout,
            lambda: traffic.data_received,
            lambda shed: _stalled(state, writer, watch, shed, peer),
            counts.watches,
        )
        try:
            if isinstance(counted, CSCError):
                await _refuse_connection(counts, reader, writer, counted)
            else:
                await _serve(state, reader, writer, traffic, watch, peer)
        except asyncio.CancelledError:
            # the node stops with the connection open: nothing awaits this task, and asyncio
            # 3.11's stream callback would log a cancelled one as an error (traceback)
            pass
        finally:
            writer.close()
            watch.start()  # the last bytes must leave too
            if isinstance(counted, str):
                counts.close(counted)

    return handle


def _stalled(
    state: NodeState, writer: asyncio.StreamWriter, watch: SendWatch, shed: bool, peer: Any
) -> None:
    """The client took no byte for ``client_send_timeout``, or for less while the node holds
    too much for slow clients (``shed``; shared/sendwatch.py)."""
    counts = state.connections
    log.info("closing %s: %s", peer, watch.reason(shed), extra={"tenant": watch.tenant})
    counts.stalled("tcp", shed)
    writer.transport.abort()


def _shed_upload(
    state: NodeState,
    writer: asyncio.StreamWriter,
    peer: Any,
    upload: Hold,
    stream: TunnelStream,
    why: str,
) -> None:
    """Bytes from the client wait for a stream that takes none of them (the portal does not
    read), and the node is over ``client_buffer_limit`` (shared/sendwatch.py): the connection
    is aborted and the stream reset, which ends the splice."""
    counts = state.connections
    log.info(
        "closing %s: %d bytes from it waiting for the portal, %s, %s",
        peer,
        upload.waiting,
        why,
        counts.watches.state(),
        extra={"tenant": upload.tenant},
    )
    counts.stalled("tcp", True)
    writer.transport.abort()
    stream.reset(Cancelled("the client was closed: the node holds too much for slow portals"))


async def _refuse_connection(
    counts: ConnectionCounts,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    err: CSCError,
) -> None:
    """The ``ERR`` line for a connection refused as it was accepted (csc/relay/conncap.py);
    when it may linger, half-close and discard what the client sends until it closes or
    ``LINGER`` passes, so that it reads the refusal rather than a reset."""
    writer.write(tcp_err_line(err.code, err.message))
    if not counts.may_linger():
        return
    try:
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(LINGER):
                if writer.can_write_eof():
                    writer.write_eof()
                while await reader.read(READ_LIMIT):
                    pass
    finally:
        counts.linger_done()


async def _serve(
    state: NodeState,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    traffic: LinkCounters,
    watch: SendWatch,
    peer: Any,
) -> None:
    request_id = request_id_for(None)  # the HTTP ingress's rule: a new random one
    started = time.monotonic()
    client = f"{peer[0]}:{peer[1]}" if peer else "?"
    tenant: str | None = None
    record = accesslog.RequestRecord("tcp", request_id, client, started)
    try:
        raw_alias = record.alias = await _read_alias(reader, state.config.tcp_handshake_timeout)
        alias, found = lookup_alias(state, raw_alias)
        tenant, record.alias = found.tenant, alias
        info = {"kind": "tcp", "alias": alias, "client": client, "request_id": request_id}
        stream = await open_stream(state, alias, found, info)
    except CSCError as err:
        await _refuse(state, writer, err, request_id, tenant)
        refused(state, record, tenant, err)
        return
    # the bytes read from the client while the stream has no credit for them (the splice)
    upload = Hold(
        state.connections.watches,
        writer.transport,
        None,
        lambda: traffic.data_sent,
        lambda: watch.tenant,
        lambda why: _shed_upload(state, writer, peer, upload, stream, why),
    )
    async with StreamUse(state, record, tenant, stream):
        try:
            try:
                await asyncio.wait_for(asyncio.shield(stream.opened), state.config.open_timeout)
            except TimeoutError:
                timeout = UpstreamTimeout("the portal did not answer in time")
                stream.reset(timeout)
                await _refuse(state, writer, timeout, request_id, tenant)
                record.status = timeout.spec.http_status
                return
            except CSCError as exc:
                await _refuse(state, writer, exc, request_id, tenant)
                record.status = exc.spec.http_status
                return
            writer.write(b"OK\r\n")
            watch.tenant = tenant or ""
            await splice(
                stream,
                reader,
                writer,
                reset_code=Cancelled.code,
                traffic=traffic,
                watch=watch,
                hold=upload,
            )
        finally:
            record.bytes_in, record.bytes_out = traffic.data_sent, traffic.data_received
            upload.leave()  # a splice that failed while it waited for credit


async def _refuse(
    state: NodeState,
    writer: asyncio.StreamWriter,
    err: CSCError,
    request_id: str,
    tenant: str | None,
) -> None:
    """Answer the ``ERR`` line for ``err``, kept among the node's recent errors."""
    log.info(
        "tcp ingress refused: %s",
        err.code,
        extra={"request_id": request_id, "tenant": tenant or ""},
    )
    state.errors.record("tcp", err, request_id=request_id, tenant=tenant)
    writer.write(tcp_err_line(err.code, err.message))
    with contextlib.suppress(ConnectionError):
        await writer.drain()
