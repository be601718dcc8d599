"""The request side of the agent's HTTP client, without I/O: the origin and the request head.

:func:`parse_origin` reads the configured upstream URL once; :func:`build_request` turns an
``http`` stream's OPEN into the bytes of a request head and says how its body follows.

Invariants: the request line's target is the origin's path prefix followed by the OPEN's
target, which must start with ``/``, so no OPEN can name another host; ``Host`` is always the
origin's ``host[:port]``; hop-by-hop fields, ``Host``, ``Expect`` and any ``Content-Length`` or
``Transfer-Encoding`` from the OPEN are replaced by the agent's own framing: the body's known
length, else ``chunked``; no body means no framing field except ``Content-Length: 0`` for
POST, PUT and PATCH. Credentials in the URL become ``Authorization: Basic`` and never appear in
:attr:`Origin.name`, the form used in messages.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from shared.errors import ProtocolError
from shared.headers import content_length, header_pairs, strip_hop_by_hop

_METHOD_CHARS = frozenset(
    "!#$%&'*+-.^_`|~ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
)
#: Methods whose requests normally carry a body: without one they say ``Content-Length: 0``.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
#: Request fields the agent sets itself (hop-by-hop ones are stripped before).
_REPLACED = frozenset({"host", "content-length", "expect"})


@dataclass(frozen=True, slots=True)
class Origin:
    """The configured upstream: where to connect and what every request head starts with."""

    host: str
    port: int
    tls: bool
    prefix: str
    #: ``Host`` (and ``Authorization`` when the URL has credentials) lines, CRLF-terminated.
    fixed_lines: str
    #: For messages and logs: scheme, host, port and prefix, never the credentials.
    name: str

    @property
    def has_auth(self) -> bool:
        return "\r\nAuthorization:" in self.fixed_lines


def parse_origin(url: str) -> Origin:
    """An :class:`Origin` for an ``http(s)://[user:pass@]host[:port][/prefix]`` URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("the upstream must be an http:// or https:// URL with a host")
    tls = parts.scheme == "https"
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    hostport = shown if parts.port is None else f"{shown}:{parts.port}"
    prefix = parts.path.rstrip("/")
    lines = f"Host: {hostport}\r\n"
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        lines += f"Authorization: Basic {base64.b64encode(credentials.encode()).decode()}\r\n"
    port = parts.port or (443 if tls else 80)
    return Origin(host, port, tls, prefix, lines, f"{parts.scheme}://{hostport}{prefix}")


@dataclass(slots=True, init=False)
class Request:
    """A request ready to send: the encoded head and how its body follows."""

    head: bytes
    is_head: bool
    #: Whether a body follows (``whole`` or streamed from the link).
    body: bool
    #: The whole body, when the stream's FIN had arrived before the request was built.
    whole: bytes | None
    #: Declared length of a streamed body; ``None``: it is sent chunked.
    length: int | None

    # written out: mypyc compiles it (see shared/protocol/events.py)
    def __init__(
        self, head: bytes, is_head: bool, body: bool, whole: bytes | None, length: int | None
    ) -> None:
        self.head = head
        self.is_head = is_head
        self.body = body
        self.whole = whole
        self.length = length

    @property
    def streamed(self) -> bool:
        return self.body and self.whole is None


def request_parts(info: dict[str, Any]) -> tuple[str, str, list[tuple[str, str]]]:
    """Method, target and (hop-by-hop-free) headers of an ``http`` OPEN, validated."""
    method, target = info.get("method"), info.get("target")
    headers = header_pairs(info.get("headers"))
    if not isinstance(method, str) or not method or not set(method) <= _METHOD_CHARS:
        raise ProtocolError("OPEN has an invalid method")
    if (
        not isinstance(target, str)
        or not target.startswith("/")
        or any(c in target for c in " \r\n")
    ):
        raise ProtocolError("OPEN has an invalid target")
    if headers is None:
        raise ProtocolError("OPEN has invalid headers")
    return method, target, strip_hop_by_hop(headers)


def _declared_length(values: list[str]) -> int | None:
    """The one Content-Length of the OPEN (:func:`shared.headers.content_length`)."""
    if not values:
        return None
    length = content_length(values[0])
    if len(set(values)) != 1 or length is None:
        raise ProtocolError("OPEN has an invalid Content-Length")
    return length


def build_request(info: dict[str, Any], origin: Origin, whole: bytes | None) -> Request:
    """The request for an ``http`` OPEN; ``whole`` is the complete body if already known."""
    method, target, headers = request_parts(info)
    body = bool(info.get("body"))
    replaced = _REPLACED | {"authorization"} if origin.has_auth else _REPLACED
    lines = [f"{method} {origin.prefix}{target} HTTP/1.1\r\n", origin.fixed_lines]
    lengths: list[str] = []
    for name, value in headers:
        lname = name.lower()
        if lname in replaced:
            if lname == "content-length":
                lengths.append(value.strip())
            continue
        lines.append(f"{name}: {value}\r\n")
    declared = _declared_length(lengths) if body else None
    if whole is not None:
        if declared is not None and declared != len(whole):
            raise ProtocolError("the request body does not match its Content-Length")
        declared = len(whole)
    if declared is not None:
        lines.append(f"Content-Length: {declared}\r\n")
    elif body:
        lines.append("Transfer-Encoding: chunked\r\n")
    elif method in _BODY_METHODS:
        lines.append("Content-Length: 0\r\n")
    lines.append("\r\n")
    try:
        head = "".join(lines).encode("latin-1")
    except UnicodeEncodeError:
        raise ProtocolError("OPEN has header values outside latin-1") from None
    return Request(head, method == "HEAD", body, whole if body else None, declared)
