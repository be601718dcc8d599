"""Binary stream heads (docs/protocol.md §6.1, protocol 1.1), sans-I/O.

The OPEN of an HTTP or TCP stream and the OPEN_OK of an HTTP stream (the request and response
heads) travel as a 6-byte prefix ``layout:u8 flags:u8 status:u16 count:u16`` followed by UTF-8
text fields, each terminated by NUL, in a fixed order (request: alias, client, request_id,
method, target, [tenant], then ``count`` header name/value pairs; response: reason, then the
pairs; TCP: alias, client, request_id, [tenant]). Encoding is one ``str.join`` and one
``encode``; decoding one ``decode``, one ``split`` and one regular expression over the names.
:func:`encode` and :func:`decode` pick the binary or the JSON form of a frame for the
multiplexer (shared/protocol/mux.py), by the link's negotiation and the frame's BINARY flag.

Invariants:

- :func:`encode_open` / :func:`encode_answer` return ``None`` for a head that does not fit its
  layout exactly (another key, another type, a name that is not an HTTP token, CR, LF or NUL in
  any field, a status outside 100..999, text that is not encodable): the sender then sends the
  head as JSON, which carries anything a 1.0 head could. Whatever they do return is accepted by
  the decoder, so a binary head can never end a link by being malformed.
- A node that only relays a forwarded stream to its agent (docs/protocol.md §9) need not
  decode its head: :func:`peek_open` reads the alias and the tenant of a binary OPEN that names
  a tenant and keeps the rest as the bytes the agent is to get (:data:`RAW_OPEN`: the same
  payload with the tenant field and flag removed, byte for byte what :func:`encode_open` makes
  of the head without its tenant), which :func:`encode_open` then sends as they are. The agent
  decodes and checks them as any head.
- :func:`decode_open` / :func:`decode_answer` raise only :class:`~shared.errors.ProtocolError`:
  unknown layout or flag bits, a count that does not match the fields, invalid UTF-8, CR or LF
  anywhere, a method or header name that is not a token, a status outside 100..999. The heads
  they return have exactly the keys and types of the JSON heads, and their ``headers`` are a
  :class:`~shared.validpairs.ValidPairs` (checked here; :func:`shared.headers.header_pairs` takes
  it as it is).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from itertools import chain
from typing import Any

from shared.errors import ProtocolError
from shared.protocol.codec import FLAG_BINARY, Frame, FrameType, decode_json, encode_json
from shared.validpairs import ValidPairs

Encoder = Callable[[dict[str, Any]], bytes | None]
Decoder = Callable[[bytes | memoryview], dict[str, Any]]

#: The minor protocol version from which both sides may send binary heads (§6.1).
MINOR = 1

PREFIX = struct.Struct("!BBHH")
PREFIX_SIZE = PREFIX.size
#: layouts (first prefix byte)
REQUEST = 1
RESPONSE = 2
TCP = 3
#: flags of REQUEST and TCP (a RESPONSE has none)
BODY = 0x01
TENANT = 0x02
_OPEN_FLAGS = {REQUEST: BODY | TENANT, TCP: TENANT}
#: text fields before the header pairs: request, then with ``tenant``
_REQUEST_FIELDS = 5

_REQUEST_KEYS = frozenset({"kind", "alias", "client", "request_id", "method", "target", "headers"})
_REQUEST_KEYS_BODY = _REQUEST_KEYS | {"body"}
_TCP_KEYS = frozenset({"kind", "alias", "client", "request_id"})
_RESPONSE_KEYS = frozenset({"status", "reason", "headers"})
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
#: the method and the header names, joined by NUL: each an RFC 9110 token
_TOKENS = re.compile(f"(?:{_TOKEN}(?:\0{_TOKEN})*)?")
MAX_COUNT = 0xFFFF
#: The key of a head :func:`peek_open` read: its binary OPEN as the agent is to get it.
RAW_OPEN = "raw_open"


def _pack(layout: int, flags: int, status: int, fields: list[str], count: int) -> bytes | None:
    """Prefix and NUL-terminated fields, or None when a field holds NUL, CR or LF, is not a
    string, or the text is not encodable."""
    try:
        text = "\0".join(fields)
        if "\r" in text or "\n" in text or text.count("\0") != len(fields) - 1:
            return None
        return PREFIX.pack(layout, flags, status, count) + text.encode() + b"\0"
    except (TypeError, UnicodeEncodeError):
        return None


def _header_fields(fields: list[str], headers: object, tokens: list[str]) -> int | None:
    """Append the header pairs to ``fields``; their number, or None when they are not pairs
    of token names and strings."""
    if not isinstance(headers, list) or len(headers) > MAX_COUNT:
        return None
    start = len(fields)
    fields += chain.from_iterable(headers)
    count = len(headers)
    if len(fields) - start != 2 * count:
        return None
    tokens += fields[start::2]
    try:
        if not _TOKENS.fullmatch("\0".join(tokens)):
            return None
    except TypeError:
        return None
    return count


def encode_open(info: dict[str, Any]) -> bytes | None:
    """The binary OPEN payload of an ``http`` or ``tcp`` stream, or None (send it as JSON)."""
    raw = info.get(RAW_OPEN)
    if raw is not None:  # a forwarded head, passed on as it came (peek_open)
        return bytes(raw)
    keys = info.keys() - {"tenant"}
    tenant = info.get("tenant")
    flags = 0 if tenant is None else TENANT
    if keys == _TCP_KEYS and info["kind"] == "tcp":
        fields = [info["alias"], info["client"], info["request_id"]]
        if tenant is not None:
            fields.append(tenant)
        return _pack(TCP, flags, 0, fields, 0)
    if keys != _REQUEST_KEYS_BODY or info["kind"] != "http":
        return None
    body = info["body"]
    if body is True:
        flags |= BODY
    elif body is not False:
        return None
    method = info["method"]
    if not method:
        return None
    fields = [info["alias"], info["client"], info["request_id"], method, info["target"]]
    if tenant is not None:
        fields.append(tenant)
    count = _header_fields(fields, info["headers"], [method])
    if count is None:
        return None
    return _pack(REQUEST, flags, 0, fields, count)


def encode_answer(info: dict[str, Any]) -> bytes | None:
    """The binary OPEN_OK payload of an HTTP response head, or None (send it as JSON)."""
    if info.keys() != _RESPONSE_KEYS:
        return None
    status = info["status"]
    if type(status) is not int or not 100 <= status <= 999:
        return None
    fields = [info["reason"]]
    count = _header_fields(fields, info["headers"], [])
    if count is None:
        return None
    return _pack(RESPONSE, 0, status, fields, count)


def _fields(payload: bytes | memoryview, what: str) -> tuple[int, int, int, int, list[str]]:
    """The prefix and the text fields (without the final empty one) of a binary head."""
    if len(payload) < PREFIX_SIZE:
        raise ProtocolError(f"binary {what} head shorter than its prefix")
    layout, flags, status, count = PREFIX.unpack_from(payload)
    try:
        text = str(payload[PREFIX_SIZE:], "utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"binary {what} head is not UTF-8") from None
    if "\r" in text or "\n" in text:
        raise ProtocolError(f"binary {what} head holds CR or LF")
    parts = text.split("\0")
    if parts.pop() != "":
        raise ProtocolError(f"binary {what} head does not end with NUL")
    return layout, flags, status, count, parts


def _pairs(parts: list[str], start: int, count: int, tokens: list[str], what: str) -> ValidPairs:
    if len(parts) != start + 2 * count:
        raise ProtocolError(f"binary {what} head: {len(parts)} fields for {count} headers")
    names = parts[start::2]
    tokens += names
    if not _TOKENS.fullmatch("\0".join(tokens)):
        raise ProtocolError(f"binary {what} head: a method or header name is not a token")
    # pairs by index: mypyc compiles it natively, zip(strict=True) it calls generically
    return ValidPairs([(parts[i], parts[i + 1]) for i in range(start, len(parts), 2)])


def decode_open(payload: bytes | memoryview) -> dict[str, Any]:
    """An OPEN's head from its binary payload; ProtocolError if malformed."""
    layout, flags, status, count, parts = _fields(payload, "OPEN")
    allowed = _OPEN_FLAGS.get(layout)
    if allowed is None or flags & ~allowed or status:
        raise ProtocolError(f"binary OPEN head of layout {layout}, flags {flags}")
    has_tenant = bool(flags & TENANT)
    if layout == TCP:
        if count or len(parts) != 3 + has_tenant:
            raise ProtocolError("binary OPEN head of a TCP stream with wrong fields")
        tcp = {"kind": "tcp", "alias": parts[0], "client": parts[1], "request_id": parts[2]}
        if has_tenant:
            tcp["tenant"] = parts[3]
        return tcp
    start = _REQUEST_FIELDS + has_tenant
    if len(parts) < start:
        raise ProtocolError("binary OPEN head with too few fields")
    method = parts[3]
    if not method:
        raise ProtocolError("binary OPEN head without a method")
    head: dict[str, Any] = {
        "kind": "http",
        "alias": parts[0],
        "client": parts[1],
        "request_id": parts[2],
        "method": method,
        "target": parts[4],
        "headers": _pairs(parts, start, count, [method], "OPEN"),
        "body": bool(flags & BODY),
    }
    if has_tenant:
        head["tenant"] = parts[5]
    return head


def peek_open(payload: bytes | memoryview) -> dict[str, Any] | None:
    """The routing fields of a binary OPEN that names a tenant (a forwarded one): ``kind``,
    ``alias``, ``tenant``, ``body`` and, under :data:`RAW_OPEN`, the payload without the
    tenant; None for any other payload (decode it with :func:`decode_open`). Only the prefix,
    the alias and the tenant are looked at: the agent checks the rest."""
    data = bytes(payload)
    if len(data) < PREFIX_SIZE:
        return None
    layout, flags, status, count = PREFIX.unpack_from(data)
    allowed = _OPEN_FLAGS.get(layout)
    if allowed is None or not flags & TENANT or flags & ~allowed or status:
        return None
    before = _REQUEST_FIELDS if layout == REQUEST else 3  # the fields before the tenant
    parts = data[PREFIX_SIZE:].split(b"\0", before + 1)
    if len(parts) != before + 2 or (layout == TCP and (count or parts[-1])):
        return None
    try:
        alias, tenant = str(parts[0], "utf-8"), str(parts[before], "utf-8")
    except UnicodeDecodeError:
        return None
    fields = b"\0".join(parts[:before])
    raw = PREFIX.pack(layout, flags & ~TENANT, 0, count) + fields + b"\0" + parts[-1]
    return {
        "kind": "http" if layout == REQUEST else "tcp",
        "alias": alias,
        "tenant": tenant,
        "body": bool(flags & BODY),
        RAW_OPEN: raw,
    }


def decode_answer(payload: bytes | memoryview) -> dict[str, Any]:
    """An OPEN_OK's response head from its binary payload; ProtocolError if malformed."""
    layout, flags, status, count, parts = _fields(payload, "OPEN_OK")
    if layout != RESPONSE or flags or not 100 <= status <= 999 or not parts:
        raise ProtocolError(f"binary OPEN_OK head of layout {layout}, status {status}")
    return {"status": status, "reason": parts[0], "headers": _pairs(parts, 1, count, [], "OPEN_OK")}


def encode(info: dict[str, Any], binary: Encoder | None) -> tuple[int, bytes]:
    """The flags and payload of an OPEN / OPEN_OK: BINARY and ``binary(info)`` when the link
    negotiated binary heads (``binary`` given) and the head fits, else 0 and JSON."""
    payload = binary(info) if binary is not None else None
    if payload is None:
        raw = info.get(RAW_OPEN)
        return 0, encode_json(info if raw is None else decode_open(raw))
    return FLAG_BINARY, payload


def decode(frame: Frame, binary: Decoder, negotiated: bool) -> dict[str, Any]:
    """The head an OPEN / OPEN_OK carries, binary or JSON as its flag says; a binary head on a
    link where either side announced 1.0 is a ProtocolError, as the undefined flag is for 1.0."""
    if not frame.flags & FLAG_BINARY:
        return decode_json(frame.payload, FrameType(frame.type).name)
    if not negotiated:
        raise ProtocolError(f"binary {FrameType(frame.type).name} head without protocol 1.1")
    return binary(frame.payload)
