"""The PROXY header gate of a listener without TLS (csc/relay/proxied.py ``HeaderFirst``), on a
transport that records what the gate does with it: every way out gives back its place among
the connections reading their header."""

from __future__ import annotations

import asyncio
from typing import Any

from csc.relay.proxied import HeaderFirst, ProxyGate
from shared.peers import TrustedPeers

BALANCER = "192.0.2.1"


class Transport:
    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.aborted = False
        self.protocol: Any = None

    def get_extra_info(self, name: str) -> Any:
        return (self.peer, 40000) if name == "peername" else None

    def abort(self) -> None:
        self.aborted = True

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def is_closing(self) -> bool:
        return self.aborted


class Listener(asyncio.Protocol):
    """The listener's own protocol: what it was given."""

    def __init__(self, client: tuple[str, int] | None) -> None:
        self.client = client
        self.made = False
        self.data = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True

    def data_received(self, data: bytes) -> None:
        self.data += data


def gate(timeout: float = 5.0, pending: int = 2) -> ProxyGate:
    return ProxyGate(TrustedPeers([BALANCER]), timeout=timeout, listener="http", pending=pending)


def connect(g: ProxyGate, peer: str = BALANCER) -> tuple[HeaderFirst, Transport]:
    protocol = HeaderFirst(g, lambda client: lambda: Listener(client))
    transport = Transport(peer)
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport


async def test_a_header_hands_the_transport_over_with_the_client_and_what_followed() -> None:
    g = gate()
    protocol, transport = connect(g)
    assert g.reading == 1
    protocol.data_received(b"PROXY TCP4 203.0.113.9 10.0.0.1 5000 80\r")
    assert transport.protocol is None
    protocol.data_received(b"\nGET / HTTP/1.1\r\n")
    listener = transport.protocol
    assert isinstance(listener, Listener) and listener.made
    assert (listener.client, listener.data) == (("203.0.113.9", 5000), b"GET / HTTP/1.1\r\n")
    assert (g.reading, g.refused, transport.aborted) == (0, 0, False)


async def test_another_peer_is_handed_over_at_once_without_a_header() -> None:
    g = gate()
    _, transport = connect(g, "198.51.100.7")
    assert isinstance(transport.protocol, Listener) and transport.protocol.client is None
    assert g.reading == 0


async def test_every_refusal_gives_its_place_back() -> None:
    g = gate(timeout=0.05)
    bad, bad_transport = connect(g)
    bad.data_received(b"GET / HTTP/1.1\r\n")
    bad.data_received(b"more")  # delivered after the abort: dropped
    closed, closed_transport = connect(g)
    closed.eof_received()
    late, late_transport = connect(g)
    await asyncio.sleep(0.3)
    assert bad_transport.aborted and closed_transport.aborted and late_transport.aborted
    assert (g.reading, g.refused) == (0, 3)
    for protocol in (bad, closed, late):
        protocol.connection_lost(None)
    assert g.reading == 0


async def test_past_the_bound_a_balancers_connection_is_refused_at_once() -> None:
    g = gate(pending=2)
    connect(g)
    connect(g)
    _, third = connect(g)
    assert third.aborted and (g.reading, g.refused) == (2, 1)
    _, other = connect(g, "198.51.100.7")  # not a balancer: no header, no bound
    assert not other.aborted and isinstance(other.protocol, Listener)
