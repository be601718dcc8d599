"""Two agent links joined back to back in memory: a CSC side that opens streams and an agent
side that serves them with a given handler, both past their handshake."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

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


async def link_pair(
    serve: StreamHandler,
    serve_now: QuickHandler | None = None,
    settings: LinkSettings | None = None,
) -> tuple[Link, Link]:
    """(CSC side, agent side); the agent side runs ``serve`` for every stream opened (offered
    to ``serve_now`` first when given)."""
    loop = asyncio.get_running_loop()
    settings = settings or LinkSettings()
    agent_conn = Connection(Side.CLIENT, settings, accept_streams=True, now=loop.time())
    csc_conn = Connection(Side.SERVER, settings, accept_streams=False, now=loop.time())
    agent_conn.send_hello({"agent": "test"})
    csc_conn.receive_data(b"".join(agent_conn.data_to_send()), loop.time())
    assert any(isinstance(e, HelloReceived) for e in csc_conn.events())
    csc_conn.send_welcome({"node": "test"}, loop.time())
    agent_conn.receive_data(b"".join(csc_conn.data_to_send()), loop.time())
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
