"""The floor of a two-process Python relay: what the tunnel's architecture costs with nothing of
the product in it, as a reference row of bench/run.py (``floor``).

Two processes, like the CSC and its agent: an *edge* that parses bootloader requests with
llhttp (``httptools``) and an *agent* that it starts as its child, joined by one loopback TCP
connection that carries length-prefixed binary frames; the agent keeps a pool of keep-alive
HTTP/1.1 connections to the upstream, parses each response with llhttp and sends it back in one
frame; the edge writes it to the client in one write. Everything is an ``asyncio.Protocol``
callback on uvloop: no task, no coroutine, no timer per request.

What it leaves out, on purpose, is what the tunnel is measured with: flow control and credit,
streams as a state machine, heartbeats, WebSocket framing and masking, TLS, routing and tenant
limits, deadlines, the access log, metrics, request ids, header checks, error answers, drain.
So the gap between this row and the tunnel is the cost of those, and this row is the least a
Python relay of this shape pays per request on this machine.

Bounds: bodies of at most :data:`MAX_BODY` bytes (Content-Length only; ``/small`` is 1 KiB);
anything else closes the client connection. Loopback only. It is a measuring device, not a
relay to deploy.

Run: ``python bench/floor.py --upstream-port N --port P`` (the edge; it starts the agent).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct
import subprocess
import sys
from typing import Any

import httptools
import uvloop

#: Frame header: stream id, payload length.
HEADER = struct.Struct("!II")
MAX_BODY = 1 << 20


class Framer:
    """Length-prefixed frames out of a byte stream."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buffer += data
        frames: list[tuple[int, bytes]] = []
        offset, size = 0, len(self.buffer)
        while size - offset >= HEADER.size:
            sid, length = HEADER.unpack_from(self.buffer, offset)
            end = offset + HEADER.size + length
            if end > size:
                break
            frames.append((sid, bytes(self.buffer[offset + HEADER.size : end])))
            offset = end
        del self.buffer[:offset]
        return frames


# -- the edge --------------------------------------------------------------------------------


class Edge:
    def __init__(self) -> None:
        self.link: asyncio.Transport | None = None
        self.waiting: dict[int, ClientConn] = {}
        self.next_id = 1


class LinkToAgent(asyncio.Protocol):
    def __init__(self, edge: Edge) -> None:
        self.edge = edge
        self.framer = Framer()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.edge.link = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        for sid, payload in self.framer.feed(data):
            conn = self.edge.waiting.pop(sid, None)
            if conn is not None:
                conn.answer(payload)


class ClientConn(asyncio.Protocol):
    def __init__(self, edge: Edge) -> None:
        self.edge = edge
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[bytes] = []
        self.body = b""
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", [], b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers += (name, value)

    def on_body(self, body: bytes) -> None:
        self.body += body
        if len(self.body) > MAX_BODY and self.transport is not None:
            self.transport.close()

    def on_message_complete(self) -> None:
        edge = self.edge
        sid, edge.next_id = edge.next_id, edge.next_id + 1
        edge.waiting[sid] = self
        self.keep_alive = self.parser.should_keep_alive()
        payload = b"\0".join([self.parser.get_method(), self.url, *self.headers, self.body])
        assert edge.link is not None
        edge.link.write(HEADER.pack(sid, len(payload)) + payload)

    def answer(self, payload: bytes) -> None:
        head, _, body = payload.partition(b"\0\0")
        if self.transport is not None and not self.transport.is_closing():
            if self.keep_alive:
                self.transport.write(head + b"\r\n\r\n" + body)
            else:  # the client asked to close (or spoke HTTP/1.0)
                self.transport.write(head + b"\r\nConnection: close\r\n\r\n" + body)
                self.transport.close()


async def run_edge(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    edge = Edge()
    link_server = socket.socket()
    link_server.bind(("127.0.0.1", 0))
    link_server.listen(1)
    link_port = link_server.getsockname()[1]
    agent = subprocess.Popen(
        [sys.executable, __file__, "--agent", str(link_port), "--upstream-port", str(upstream_port)]
    )
    try:
        link_server.setblocking(False)
        sock, _ = await loop.sock_accept(link_server)
        link_server.close()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.connect_accepted_socket(lambda: LinkToAgent(edge), sock)
        server = await loop.create_server(lambda: ClientConn(edge), "127.0.0.1", port)
        async with server:
            await server.serve_forever()
    finally:
        agent.terminate()
        agent.wait()


# -- the agent -------------------------------------------------------------------------------


class Agent:
    def __init__(self, loop: asyncio.AbstractEventLoop, upstream_port: int) -> None:
        self.loop = loop
        self.upstream_port = upstream_port
        self.link: asyncio.Transport | None = None
        self.idle: list[UpstreamConn] = []
        self.host = f"127.0.0.1:{upstream_port}".encode()

    def request(self, sid: int, payload: bytes) -> None:
        method, url, *rest = payload.split(b"\0")
        body = rest.pop()
        lines = [method + b" " + url + b" HTTP/1.1", b"Host: " + self.host]
        for i in range(0, len(rest), 2):
            name = rest[i].lower()
            if name not in (b"host", b"connection", b"keep-alive"):
                lines.append(rest[i] + b": " + rest[i + 1])
        data = b"\r\n".join(lines) + b"\r\n\r\n" + body
        if self.idle:
            self.idle.pop().send(sid, data)
        else:
            conn = UpstreamConn(self)
            conn.pending = (sid, data)
            self.loop.create_task(
                self.loop.create_connection(lambda: conn, "127.0.0.1", self.upstream_port)
            )

    def answer(self, sid: int, payload: bytes) -> None:
        assert self.link is not None
        self.link.write(HEADER.pack(sid, len(payload)) + payload)


class LinkToEdge(asyncio.Protocol):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.framer = Framer()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.agent.link = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        for sid, payload in self.framer.feed(data):
            self.agent.request(sid, payload)

    def connection_lost(self, exc: Exception | None) -> None:
        os._exit(0)  # the edge is gone


class UpstreamConn(asyncio.Protocol):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: tuple[int, bytes] | None = None
        self.sid = 0
        self.head: list[bytes] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.pending is not None:
            self.send(*self.pending)

    def send(self, sid: int, data: bytes) -> None:
        self.sid, self.head, self.body = sid, [], []
        assert self.transport is not None
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        self.head.insert(0, b"HTTP/1.1 %d OK" % status)

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in (b"connection", b"keep-alive"):
            self.head.append(name + b": " + value)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.agent.answer(self.sid, b"\r\n".join(self.head) + b"\0\0" + b"".join(self.body))
        self.agent.idle.append(self)


async def run_agent(link_port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    agent = Agent(loop, upstream_port)
    transport, _ = await loop.create_connection(lambda: LinkToEdge(agent), "127.0.0.1", link_port)
    transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0, help="the edge's port (loopback)")
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--agent", type=int, metavar="LINK_PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    runner: Any = uvloop.run  # as the CSC and the agent run (shared/runtime.py)
    if args.agent is not None:
        runner(run_agent(args.agent, args.upstream_port))
    else:
        runner(run_edge(args.port, args.upstream_port))


if __name__ == "__main__":
    main()
