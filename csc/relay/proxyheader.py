"""The PROXY protocol header (versions 1 and 2) that a load balancer puts before a connection's
first byte to name the client it relays, sans-I/O.

A balancer in front of the CSC (HAProxy ``send-proxy``/``send-proxy-v2``, an AWS Network Load
Balancer, nginx's ``proxy_protocol``) opens its own connections, so the CSC sees the balancer's
address for every device. With the header, the device's address counts again for the bounds per
client address, the access log and the ``X-Forwarded-For`` the portal gets.

:func:`parse` reads the start of a connection and says either how many more bytes it needs or
what the header says; it never asks for a byte beyond the header's end, so a reader that reads
exactly what it asks leaves the bytes after it (a TLS ClientHello, a request) on the socket.
Version 1 is a text line of at most :data:`V1_MAX` bytes, read up to its end; version 2 is a
16-byte preamble and at most :data:`V2_MAX` bytes in all (its addresses and TLVs, which are
skipped). A ``LOCAL`` (v2) or ``UNKNOWN`` (v1) header, or addresses of another family than IPv4
and IPv6 (v2), name no client: the balancer's own connection (a health check), whose own
address stands. Anything else that is not a header exactly as the specification writes it raises
:class:`ProxyHeaderError`; nothing else escapes (tests/unit/test_proxyheader.py fuzzes it).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

#: The longest version 1 header, ``\r\n`` included (the specification's bound).
V1_MAX = 107
#: The shortest version 1 header: ``PROXY UNKNOWN\r\n``.
V1_MIN = 15
V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_PREAMBLE = 16
#: The largest version 2 header accepted, preamble, addresses and TLVs together.
V2_MAX = 4096
#: v2 address family (high nibble of byte 13) -> (IP version, size of the address block)
_V2_FAMILIES = {0x1: (4, 12), 0x2: (6, 36)}
_V2_UNSPEC, _V2_UNIX = 0x0, 0x3
_V2_STREAM = 0x1


class ProxyHeaderError(ValueError):
    """The bytes are not a PROXY protocol header the CSC accepts."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A whole header: its ``length`` in bytes and the ``client`` it names (address, port),
    or None when it names none (the connection's own peer stands)."""

    length: int
    client: tuple[str, int] | None


def parse(data: bytes) -> ProxyHeader | int:
    """The header at the start of ``data``, or how many more bytes it needs (at least 1, never
    beyond the header's end). Raises :class:`ProxyHeaderError` for anything else."""
    if not data:
        return 1
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    raise ProxyHeaderError("the connection does not start with a PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | int:
    head = data[: len(V1_PREFIX)]
    if head != V1_PREFIX[: len(head)]:
        raise ProxyHeaderError("not a PROXY protocol header (version 1 starts with 'PROXY ')")
    end = data.find(b"\r\n")
    line = data[len(head) : end if end >= 0 else len(data)]
    if end < 0 and line.endswith(b"\r"):
        line = line[:-1]
    if not all(0x20 <= b <= 0x7E for b in line):
        raise ProxyHeaderError("a version 1 header is one line of printable ASCII")
    length = end + 2 if end >= 0 else None
    if (length or len(data)) > V1_MAX or (length is None and len(data) == V1_MAX):
        raise ProxyHeaderError(f"a version 1 header ends within {V1_MAX} bytes")
    if length is None:
        if len(data) < V1_MIN:
            return V1_MIN - len(data)
        return 1 if data.endswith(b"\r") else 2  # the line ends with "\r\n", no sooner
    fields = line.split(b" ")
    if fields[0] == b"UNKNOWN":
        return ProxyHeader(length, None)  # the rest of the line is ignored (the specification)
    if fields[0] not in (b"TCP4", b"TCP6") or len(fields) != 5:
        raise ProxyHeaderError("a version 1 header is 'PROXY TCP4|TCP6 SRC DST SPORT DPORT'")
    version = 4 if fields[0] == b"TCP4" else 6
    source = _v1_address(fields[1], version)
    _v1_address(fields[2], version)
    port = _v1_port(fields[3])
    _v1_port(fields[4])
    return ProxyHeader(length, (source, port))


def _v1_address(text: bytes, version: int) -> str:
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except ValueError:
        raise ProxyHeaderError(f"not an IPv{version} address: {text[:64]!r}") from None
    if address.version != version or b"%" in text:
        raise ProxyHeaderError(f"not an IPv{version} address: {text[:64]!r}")
    return str(address)


def _v1_port(text: bytes) -> int:
    if not 1 <= len(text) <= 5 or not text.isdigit() or (text[0] == 0x30 and len(text) > 1):
        raise ProxyHeaderError(f"not a port: {text[:16]!r}")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError(f"not a port: {port}")
    return port


def _parse_v2(data: bytes) -> ProxyHeader | int:
    if not V2_SIGNATURE.startswith(data[: len(V2_SIGNATURE)]):
        raise ProxyHeaderError("not a PROXY protocol header (a bad version 2 signature)")
    if len(data) < V2_PREAMBLE:
        return V2_PREAMBLE - len(data)
    version_command, family_transport, size = data[12], data[13], int.from_bytes(data[14:16])
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"PROXY protocol version {version_command >> 4} is not 2")
    command = version_command & 0x0F
    if command > 1:
        raise ProxyHeaderError(f"a version 2 command is LOCAL or PROXY, not {command}")
    length = V2_PREAMBLE + size
    if length > V2_MAX:
        raise ProxyHeaderError(f"a version 2 header of {length} bytes (at most {V2_MAX})")
    if len(data) < length:
        return length - len(data)
    family, transport = family_transport >> 4, family_transport & 0x0F
    if family > _V2_UNIX or transport > 2:
        raise ProxyHeaderError(f"an undefined version 2 address family 0x{family_transport:02x}")
    if command == 0 or family in (_V2_UNSPEC, _V2_UNIX):
        return ProxyHeader(length, None)  # LOCAL, or no address of the kind the CSC serves
    if transport != _V2_STREAM:
        raise ProxyHeaderError("a version 2 header for a TCP connection names a stream transport")
    ip_version, block = _V2_FAMILIES[family]
    if size < block:
        raise ProxyHeaderError(f"a version 2 IPv{ip_version} header needs {block} address bytes")
    width = 4 if ip_version == 4 else 16
    start = V2_PREAMBLE
    raw = data[start : start + width]
    address = ipaddress.IPv4Address(raw) if ip_version == 4 else ipaddress.IPv6Address(raw)
    (port,) = struct.unpack_from("!H", data, start + 2 * width)
    return ProxyHeader(length, (str(address), port))
