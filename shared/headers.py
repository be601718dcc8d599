"""HTTP header handling both relay sides need (RFC 9110 §7.6.1 hop-by-hop fields)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from shared.randpool import random_bytes
from shared.validpairs import ValidPairs

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def strip_hop_by_hop(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop hop-by-hop fields and every field the Connection header names."""
    # indexed loops rather than zip(): mypyc compiles these natively, zip(strict=True) it
    # calls generically (a few µs a request on the agent's side)
    pairs = list(headers)
    lowered = [name.lower() for name, _ in pairs]
    drop = HOP_BY_HOP
    if "connection" in lowered:
        named: set[str] = set()
        for i in range(len(pairs)):
            if lowered[i] == "connection":
                named.update(token.strip().lower() for token in pairs[i][1].split(","))
        drop = drop | named
    return [pairs[i] for i in range(len(pairs)) if lowered[i] not in drop]


def decode_raw(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """aiohttp's ``raw_headers`` as text pairs (latin-1 keeps every byte)."""
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in raw]


def header_pairs(value: object) -> list[tuple[str, str]] | None:
    """Validate a ``[[name, value], ...]`` list from the wire; None if malformed. A
    :class:`ValidPairs` is returned as it is (its decoder checked it)."""
    if type(value) is ValidPairs:
        return value
    if not isinstance(value, list):
        return None
    pairs: list[tuple[str, str]] = []
    for item in value:
        if not (isinstance(item, list | tuple) and len(item) == 2):
            return None
        name, val = item
        if not isinstance(name, str) or not isinstance(val, str) or not name:
            return None
        if any(c in name for c in ":\r\n ") or "\r" in val or "\n" in val:
            return None
        pairs.append((name, val))
    return pairs


#: Digits of the longest Content-Length taken (an exabyte; also far below ``int()``'s limit).
MAX_LENGTH_DIGITS = 19


def content_length(value: str) -> int | None:
    """A Content-Length value as a number, or ``None`` when it is not one: ASCII digits only
    (``str.isdigit`` also takes ``²`` and other scripts' digits), surrounding whitespace
    allowed, at most :data:`MAX_LENGTH_DIGITS` of them."""
    value = value.strip(" \t")
    if not value.isascii() or not value.isdigit() or len(value) > MAX_LENGTH_DIGITS:
        return None
    return int(value)


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_for(given: str | None) -> str:
    """The client's ``X-Request-Id`` when well formed, else a new random one.

    The CSC's ingress and the agent's local proxy use this one rule, so an id survives
    either path (and both in a row) unchanged.
    """
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given
    return random_bytes(16).hex()
