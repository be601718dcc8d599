"""Parsed requests of the public listener (csc/relay/http_front.py), without I/O: the request
target (RFC 9112 §3.2) and the route it names.

Invariants: a :class:`FrontRequest` exists only for a head llhttp accepted whole, with at most
one ``Content-Length`` or a single ``chunked`` coding (shared/http1.py ``request_framing``);
its ``target`` is always origin-form, so an absolute-form URL is routed on its path.
"""

from __future__ import annotations

from collections import deque
from urllib.parse import unquote, urlsplit

from shared.errors import BadRequest, CSCError
from shared.http1 import request_framing

#: Route kinds of :func:`route`.
TUNNEL, RESOLVE, HEALTHZ, READYZ, MISSING = "tunnel", "resolve", "healthz", "readyz", "missing"


class FrontRequest:
    """A parsed request head and its body as it arrives."""

    __slots__ = (
        "alias",
        "body_done",
        "body_error",
        "body_started",
        "chunks",
        "continued",
        "expect_continue",
        "has_body",
        "headers",
        "http11",
        "keep_alive",
        "kind",
        "last_body",
        "length",
        "method",
        "queued",
        "received",
        "request_id",
        "target",
    )

    def __init__(
        self, method: str, target: str, headers: list[tuple[str, str]], *, http11: bool
    ) -> None:
        self.method = method
        #: The origin-form target (path and query; an absolute-form URL reduced to them).
        self.target = target
        self.headers = headers
        self.http11 = http11
        self.keep_alive = True
        self.kind, self.alias = MISSING, ""
        self.length, chunked, self.expect_continue = request_framing(headers)
        self.continued = False
        self.has_body = chunked or bool(self.length)
        self.body_done = not self.has_body
        self.body_error: CSCError | None = None
        self.chunks: deque[bytes] = deque()
        self.received = self.queued = 0
        self.body_started = self.last_body = 0.0
        self.request_id = ""

    def header(self, name: str) -> str | None:
        """The first value of field ``name`` (lower case), or None."""
        return next((v for n, v in self.headers if n.lower() == name), None)


def origin_form(target: str) -> str:
    """The path and query a request target names (RFC 9112 §3.2): origin-form unchanged,
    absolute-form reduced to its path and query (§3.2.2); anything else is a BadRequest."""
    if target.startswith("/"):
        return target
    if target[:7].lower() == "http://" or target[:8].lower() == "https://":
        parts = urlsplit(target)
        path = parts.path or "/"
        return f"{path}?{parts.query}" if parts.query else path
    raise BadRequest("the request target must be a path or an absolute http(s) URL")


def route(method: str, target: str) -> tuple[str, str]:
    """``(kind, alias)`` of an origin-form target."""
    path = target.split("?", 1)[0]
    if path.startswith("/t/"):
        return TUNNEL, unquote(path[3:].split("/", 1)[0])
    if path.startswith("/v1/resolve/") and "/" not in path[12:]:
        return RESOLVE, unquote(path[12:])
    if path == "/healthz":
        return HEALTHZ, ""
    if path == "/readyz":
        return READYZ, ""
    return MISSING, ""
