"""HTTP messages of the local/DMZ proxy, without I/O: request heads in, response heads out.

:class:`InboundRequest` is a parsed request head and its body as it arrives;
:func:`forwarded_headers` says what the portal sees of it; :func:`encode_head` and
:func:`error_response` build what the bootloader gets back. :class:`ReadState` is what a client
connection reads next; :data:`READ_TRANSITIONS` lists its allowed changes (any other raises
:class:`~shared.errors.InvalidState` from :func:`advance_read`).

Invariants: the forwarded request has no hop-by-hop field (RFC 9110 §7.6.1), carries
``X-Forwarded-For``/``-Proto``/``-Host`` and exactly one ``X-Request-Id`` (the client's when it
is well formed, else a new one); the request target is always a path, so no request can name
another host; a response head carries that ``X-Request-Id`` and framing fields the proxy chose
itself (the portal's ``Content-Length`` is kept only when the body is sent with that length);
error bodies are the CSC's JSON ``{"error", "message", "request_id"}``.
"""

from __future__ import annotations

import json
from collections import deque
from enum import Enum
from http import HTTPStatus
from typing import Final
from urllib.parse import urlsplit

from shared.errors import BadRequest, CSCError, GoingAway, InvalidState
from shared.headers import HOP_BY_HOP, strip_hop_by_hop

RETRY_AFTER = "5"

#: Response body framings towards the client.
NONE, LENGTH, CHUNKED, CLOSE = "none", "length", "chunked", "close"

_REPLACED = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id"})


class ReadState(Enum):
    """What a :class:`ClientConnection` reads next from its client."""

    #: A request head (or nothing yet: between requests).
    HEAD = "head"
    #: The body of the request whose head was parsed last.
    BODY = "body"
    #: Nothing more: no further request is served (error, Connection: close, EOF, upgrade).
    STOPPED = "stopped"
    #: After the last answer: what the client still sends is discarded until it closes.
    LINGERING = "lingering"


_R = ReadState
#: Every allowed change of a connection's :class:`ReadState`; any other is InvalidState.
READ_TRANSITIONS: Final[dict[ReadState, frozenset[ReadState]]] = {
    _R.HEAD: frozenset({_R.HEAD, _R.BODY, _R.STOPPED}),
    _R.BODY: frozenset({_R.HEAD, _R.STOPPED}),
    _R.STOPPED: frozenset({_R.STOPPED, _R.LINGERING}),
    _R.LINGERING: frozenset({_R.LINGERING}),
}


def advance_read(state: ReadState, new: ReadState) -> ReadState:
    """``new`` if :data:`READ_TRANSITIONS` allows it after ``state``; else InvalidState."""
    if new not in READ_TRANSITIONS[state]:
        raise InvalidState(f"reading cannot go from {state.value} to {new.value}")
    return new


def origin_form(target: str) -> str:
    """The path and query a request target names (RFC 9112 §3.2).

    Origin-form passes unchanged; absolute-form (``http://host/path?q``) is reduced to its path
    and query, its host ignored: only the configured upstream is ever contacted. Authority-form
    (CONNECT) and asterisk-form are refused with :class:`BadRequest`.
    """
    if target.startswith("/"):
        return target
    scheme = target.partition("://")[0].lower()
    if scheme in ("http", "https") and "://" in target:
        parts = urlsplit(target)
        path = parts.path or "/"
        return f"{path}?{parts.query}" if parts.query else path
    raise BadRequest("the request target must be a path (CONNECT and * are not supported)")


def forwarded_headers(
    headers: list[tuple[str, str]], *, client_ip: str, proto: str, request_id: str
) -> list[tuple[str, str]]:
    """The client's end-to-end headers plus ``X-Forwarded-*`` and ``X-Request-Id``.

    Hop-by-hop fields go first, so a ``Connection`` header cannot name the fields added here.
    """
    pairs = strip_hop_by_hop(headers)
    prior = [v for n, v in pairs if n.lower() == "x-forwarded-for"]
    host = next((v for n, v in pairs if n.lower() == "host"), None)
    result = [(n, v) for n, v in pairs if n.lower() not in _REPLACED]
    result.append(("X-Forwarded-For", ", ".join([*prior, client_ip]) if prior else client_ip))
    result.append(("X-Forwarded-Proto", proto))
    if host:
        result.append(("X-Forwarded-Host", host))
    result.append(("X-Request-Id", request_id))
    return result


def body_mode(method: str, status: int, headers: list[tuple[str, str]], http11: bool) -> str:
    """How a response body is framed towards the client: NONE, LENGTH, CHUNKED or CLOSE."""
    if method == "HEAD" or status < 200 or status in (204, 304):
        return NONE
    lengths = {v.strip() for n, v in headers if n.lower() == "content-length"}
    if len(lengths) == 1 and next(iter(lengths)).isdigit():
        return LENGTH
    return CHUNKED if http11 else CLOSE


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def encode_head(
    status: int,
    reason: str,
    headers: list[tuple[str, str]],
    *,
    request_id: str,
    mode: str,
    keep_alive: bool,
    http11: bool,
) -> bytes:
    """A response head for the client: the portal's end-to-end fields and our framing."""
    lines = [f"HTTP/1.1 {status} {reason or _phrase(status)}\r\n"]
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP or lname == "x-request-id":
            continue
        if lname == "content-length" and mode in (CHUNKED, CLOSE):
            continue
        lines.append(f"{name}: {value}\r\n")
    lines.append(f"X-Request-Id: {request_id}\r\n")
    if mode == CHUNKED:
        lines.append("Transfer-Encoding: chunked\r\n")
    if not keep_alive:
        lines.append("Connection: close\r\n")
    elif not http11:
        lines.append("Connection: keep-alive\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1", "replace")


def error_response(err: CSCError, request_id: str, *, keep_alive: bool, http11: bool) -> bytes:
    """The CSC's JSON error answer: ``{"error", "message", "request_id"}`` with its status."""
    body = json.dumps(err.to_json(request_id=request_id)).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    if isinstance(err, GoingAway):
        headers.append(("Retry-After", RETRY_AFTER))
    head = encode_head(
        err.spec.http_status,
        "",
        headers,
        request_id=request_id,
        mode=LENGTH,
        keep_alive=keep_alive,
        http11=http11,
    )
    return head + body


class InboundRequest:
    """A parsed request head and its body as it arrives."""

    __slots__ = (
        "body_done",
        "chunks",
        "expect_continue",
        "has_body",
        "headers",
        "http11",
        "keep_alive",
        "length",
        "method",
        "queued",
        "received",
        "target",
    )

    def __init__(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        *,
        http11: bool,
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.http11 = http11
        self.keep_alive = keep_alive
        self.length: int | None = None
        chunked = False
        self.expect_continue = False
        for name, value in headers:
            lname = name.lower()
            if lname == "content-length" and value.strip().isdigit():
                self.length = int(value)
            elif lname == "transfer-encoding":
                chunked = True
            elif lname == "expect":
                self.expect_continue = value.strip().lower() == "100-continue"
        self.has_body = chunked or bool(self.length)
        self.body_done = not self.has_body
        self.chunks: deque[bytes] = deque()
        #: Body bytes received so far, and those of them the portal side has not taken yet.
        self.received = 0
        self.queued = 0

    @property
    def path(self) -> str:
        """The target without its query, for logs."""
        return self.target.split("?", 1)[0][:200]


def header_value(headers: list[tuple[str, str]], name: str) -> str | None:
    """The first value of field ``name`` (lower case), or None."""
    return next((v for n, v in headers if n.lower() == name), None)
