"""Two agent links joined back to back in memory: a CSC side that opens streams and an agent
side that serves them with a given handler, both past their handshake."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from shared.link import Link, QuickHandler, SendFn, StreamHandler
from shared.protocol import Connection, HelloReceived, LinkSettings, Side

#: The OPEN info of a GET forwarded from one node to another (it names the tenant).
FORWARDED_GET = {
    "kind": "http",
    "alias": "a@example.com",
    "tenant": "acme",
    "client": "127.0.0.1:1",
    "request_id": "r1",
    "method": "GET",
    "target": "/",
    "headers": [],
    "body": False,
}


def handshaken(
    settings: LinkSettings,
    now: float,
    hello: dict[str, Any] | None = None,
    welcome: dict[str, Any] | None = None,
) -> tuple[Connection, Connection]:
    """(client, server): an agent's side that accepts streams and a CSC's that opens them,
    past HELLO and WELCOME (their events left for whoever reads them next)."""
    client = Connection(Side.CLIENT, settings, accept_streams=True, now=now)
    server = Connection(Side.SERVER, settings, accept_streams=False, now=now)
    client.send_hello(hello or {})
    server.receive_data(b"".join(client.data_to_send()), now)
    server.send_welcome(welcome or {}, now)
    client.receive_data(b"".join(server.data_to_send()), now)
    return client, server


async def link_pair(
    serve: StreamHandler,
    serve_now: QuickHandler | None = None,
    settings: LinkSettings | None = None,
) -> tuple[Link, Link]:
    """(CSC side, agent side); the agent side runs ``serve`` for every stream opened (offered
    to ``serve_now`` first when given)."""
    loop = asyncio.get_running_loop()
    agent_conn, csc_conn = handshaken(
        settings or LinkSettings(), loop.time(), {"agent": "test"}, {"node": "test"}
    )
    assert any(isinstance(e, HelloReceived) for e in csc_conn.events())
    links: dict[str, Link] = {}

    def sender(to: str) -> SendFn:
        async def send(chunks: Sequence[bytes | memoryview]) -> None:
            target = links[to]
            if not target.is_closed:
                target.feed(b"".join(bytes(c) for c in chunks))

        return send

    links["csc"] = Link(csc_conn, sender("agent"), name="csc")
    links["agent"] = Link(
        agent_conn,
        sender("csc"),
        on_stream=serve,
        on_stream_now=serve_now,
        name="agent",
        pending=agent_conn.events(),
    )
    return links["csc"], links["agent"]
