"""HTTP messages of the local/DMZ proxy, without I/O: request heads in, response heads out.

:class:`InboundRequest` is a parsed request head and its body as it arrives;
:func:`forwarded_headers` says what the portal sees of it; :func:`encode_head` and
:func:`error_response` (shared/http1.py, shared with the CSC's listener) build what the
bootloader gets back. :class:`ReadState` is what a client connection reads next;
:data:`READ_TRANSITIONS` lists its allowed changes (any other raises
:class:`~shared.errors.InvalidState` from :func:`advance_read`).

Invariants: the forwarded request has no hop-by-hop field (RFC 9110 §7.6.1), carries
``X-Forwarded-For``/``-Proto``/``-Host`` and exactly one ``X-Request-Id`` (the client's when it
is well formed, else a new one); the request target is always a path, so no request can name
another host; a response head carries that ``X-Request-Id`` and framing fields the proxy chose
itself (the portal's ``Content-Length`` is kept only when the body is sent with that length);
error bodies are the CSC's JSON ``{"error", "message", "request_id"}``.
"""

from __future__ import annotations

from collections import deque
from enum import Enum
from typing import Final
from urllib.parse import urlsplit

from shared.errors import BadRequest, InvalidState
from shared.headers import strip_hop_by_hop
from shared.http1 import (  # re-exported: the proxy's modules import them from here
    CHUNKED,
    CLOSE,
    LENGTH,
    NONE,
    RETRY_AFTER,
    body_mode,
    encode_head,
    error_response,
    request_framing,
)

__all__ = [
    "CHUNKED",
    "CLOSE",
    "LENGTH",
    "NONE",
    "RETRY_AFTER",
    "InboundRequest",
    "body_mode",
    "encode_head",
    "error_response",
    "forwarded_headers",
    "header_value",
    "origin_form",
]

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
        self.length, chunked, self.expect_continue = request_framing(headers)
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
