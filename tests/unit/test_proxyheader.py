"""The PROXY protocol header parser (csc/relay/proxyheader.py): the specification's examples,
every refusal, and properties over arbitrary bytes and exact reads."""

from __future__ import annotations

import contextlib
import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csc.relay.proxyheader import (
    V1_MAX,
    V2_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    parse,
)


def v2(command: int, family: int, body: bytes, *, version: int = 2) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", version << 4 | command, family, len(body)) + body


def v2_ipv4(src: str, sport: int, tlvs: bytes = b"") -> bytes:
    body = ipaddress.IPv4Address(src).packed + bytes([10, 0, 0, 1]) + struct.pack("!HH", sport, 443)
    return v2(1, 0x11, body + tlvs)


def v2_ipv6(src: str, sport: int, tlvs: bytes = b"") -> bytes:
    dst = ipaddress.IPv6Address("2001:db8::1").packed
    body = ipaddress.IPv6Address(src).packed + dst + struct.pack("!HH", sport, 443)
    return v2(1, 0x21, body + tlvs)


def read_exactly(stream: bytes) -> tuple[ProxyHeader, int]:
    """Read the header off ``stream`` as a listener does: exactly what parse() asks, never
    more; the header and the bytes read."""
    taken = 0
    while True:
        found = parse(stream[:taken])
        if isinstance(found, ProxyHeader):
            return found, taken
        assert found >= 1
        if taken + found > len(stream):
            raise EOFError
        taken += found


# -- the specification's forms -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "client"),
    [
        (b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 443\r\n", ("192.0.2.7", 56324)),
        (b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 443\r\n", ("2001:db8::7", 4000)),
        (b"PROXY TCP6 ::ffff:192.0.2.7 ::1 0 65535\r\n", ("::ffff:c000:207", 0)),
        (b"PROXY UNKNOWN\r\n", None),
        (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None),  # the rest of the line is ignored
        (v2_ipv4("198.51.100.9", 40000), ("198.51.100.9", 40000)),
        (v2_ipv6("2001:db8::9", 1), ("2001:db8::9", 1)),
        (v2_ipv4("198.51.100.9", 7, tlvs=b"\xea\x00\x05\x01vpce"), ("198.51.100.9", 7)),
        (v2(0, 0x00, b""), None),  # LOCAL: the balancer's own health check
        (v2(0, 0x11, bytes(12)), None),  # LOCAL with addresses: they are ignored
        (v2(1, 0x00, b""), None),  # UNSPEC
        (v2(1, 0x31, bytes(216)), None),  # AF_UNIX: not a client address the CSC counts
    ],
)
def test_a_whole_header_names_its_client(header: bytes, client: tuple[str, int] | None) -> None:
    assert parse(header) == ProxyHeader(len(header), client)
    assert read_exactly(header + b"\x16\x03\x01 a TLS ClientHello") == (
        ProxyHeader(len(header), client),
        len(header),
    )


@pytest.mark.parametrize(
    "header",
    [
        b"GET / HTTP/1.1\r\n",
        b"proxy TCP4 192.0.2.7 10.0.0.1 1 2\r\n",
        b"PROXY  TCP4 192.0.2.7 10.0.0.1 1 2\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 1\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2 3\r\n",
        b"PROXY TCP5 192.0.2.7 10.0.0.1 1 2\r\n",
        b"PROXY UDP4 192.0.2.7 10.0.0.1 1 2\r\n",
        b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n",
        b"PROXY TCP6 192.0.2.7 2001:db8::1 1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 fe80::2 1 2\r\n",
        b"PROXY TCP4 192.0.2.07 10.0.0.1 1 2\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 65536 2\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 080 2\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 +80 2\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 -1 2\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2 \r\n",
        b"PROXY TCP4 192.0.2.7\t10.0.0.1 1 2\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 1 \xff\r\n",
        b"PROXY UNKNOWN" + b" x" * 60 + b"\r\n",  # past 107 bytes
        v2(1, 0x11, bytes(12), version=1),
        v2(2, 0x11, bytes(12)),
        v2(1, 0x41, bytes(12)),  # no such family
        v2(1, 0x13, bytes(12)),  # no such transport
        v2(1, 0x12, bytes(12)),  # a datagram on a TCP connection
        v2(1, 0x11, bytes(11)),  # IPv4 needs 12 address bytes
        v2(1, 0x21, bytes(35)),  # IPv6 needs 36
        V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, V2_MAX),  # too long
        b"\r\n\r\n\x00\r\nQUIT!" + bytes(4),
    ],
)
def test_anything_else_is_refused(header: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        read_exactly(header + b"trailing bytes" + bytes(V2_MAX))


def test_a_version_1_line_without_its_end_is_refused_at_107_bytes() -> None:
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX - 14)
    assert len(line) == V1_MAX
    with pytest.raises(ProxyHeaderError, match="107"):
        parse(line)
    assert parse(line[:-1]) == 2


def test_what_parse_asks_for_never_reaches_past_a_header() -> None:
    assert parse(b"") == 1
    assert parse(b"P") == 14  # the shortest version 1 header is 15 bytes
    assert parse(b"PROXY UNKNOWN\r") == 1
    assert parse(V2_SIGNATURE[:3]) == 13
    assert parse(v2_ipv4("192.0.2.1", 1)[:16]) == 12


# -- properties ----------------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, tuple[str, int] | None]:
    kind = draw(st.sampled_from(["v1-4", "v1-6", "v1-unknown", "v2-4", "v2-6", "v2-local"]))
    sport, dport = draw(ports), draw(ports)
    tlvs = draw(st.binary(max_size=64))
    if kind == "v1-4":
        src, dst = draw(ipv4), draw(ipv4)
        return f"PROXY TCP4 {src} {dst} {sport} {dport}\r\n".encode(), (src, sport)
    if kind == "v1-6":
        src, dst = draw(ipv6), draw(ipv6)
        return f"PROXY TCP6 {src} {dst} {sport} {dport}\r\n".encode(), (src, sport)
    if kind == "v1-unknown":
        return b"PROXY UNKNOWN\r\n", None
    if kind == "v2-4":
        src = draw(ipv4)
        return v2_ipv4(src, sport, tlvs), (src, sport)
    if kind == "v2-6":
        src = draw(ipv6)
        return v2_ipv6(src, sport, tlvs), (str(ipaddress.IPv6Address(src)), sport)
    return v2(0, draw(st.sampled_from([0x00, 0x11, 0x21])), tlvs), None


@given(headers(), st.binary(max_size=64))
def test_a_header_is_read_exactly_whatever_follows_it(
    case: tuple[bytes, tuple[str, int] | None], after: bytes
) -> None:
    header, client = case
    assert read_exactly(header + after) == (ProxyHeader(len(header), client), len(header))


@given(st.binary(max_size=200))
def test_arbitrary_bytes_give_a_header_a_count_or_a_refusal(data: bytes) -> None:
    for end in range(len(data) + 1):
        try:
            found = parse(data[:end])
        except ProxyHeaderError:
            return
        if isinstance(found, ProxyHeader):
            assert found.length <= end
            return
        assert 1 <= found <= V2_MAX


@given(headers(), st.integers(0, 200), st.binary(min_size=1, max_size=1))
def test_a_changed_byte_never_makes_parse_raise_anything_else(
    case: tuple[bytes, tuple[str, int] | None], where: int, byte: bytes
) -> None:
    header = bytearray(case[0])
    header[where % len(header)] = byte[0]
    with contextlib.suppress(ProxyHeaderError):
        read_exactly(bytes(header) + bytes(V2_MAX))
