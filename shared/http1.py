"""HTTP/1.1 response heads and error answers, without I/O, for every HTTP front end we write.

Used by the CSC's public listener (csc/relay/http_front.py) and the agent's local proxy
(tenant_agent/proxy/http.py): both parse requests with llhttp and write responses themselves.

Invariants: a head carries exactly one ``X-Request-Id`` and framing fields chosen here (no
hop-by-hop field of the portal's, RFC 9110 §7.6.1; no ``Content-Length`` beside chunked or
close-delimited framing); error bodies are the JSON ``{"error", "message", "request_id"}`` of
shared/errors.py with its status, and ``Retry-After`` when the error says when to come back.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from shared.errors import (
    BadRequest,
    CSCError,
    GoingAway,
    NodeFull,
    PortalOffline,
    TenantLimit,
    TooManyConnections,
)
from shared.headers import HOP_BY_HOP, content_length

#: Seconds a client is told to wait after ``portal_offline`` or ``going_away``.
RETRY_AFTER = "5"

#: Response body framings towards the client.
NONE, LENGTH, CHUNKED, CLOSE = "none", "length", "chunked", "close"

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"


def request_framing(headers: list[tuple[str, str]]) -> tuple[int | None, bool, bool]:
    """``(content_length, chunked, expect_continue)`` of a request head that llhttp accepted
    (it refuses two lengths, a length beside ``Transfer-Encoding``, signs and spaces in it).

    Any transfer coding but a single ``chunked`` is refused with :class:`BadRequest`: the body
    is forwarded de-chunked, so another coding could not be passed on faithfully, and a list
    of codings is a classic smuggling shape.
    """
    length: int | None = None
    chunked = expect_continue = False
    for name, value in headers:
        lname = name.lower()
        if lname == "content-length" and (given := content_length(value)) is not None:
            length = given
        elif lname == "transfer-encoding":
            if chunked or value.strip().lower() != "chunked":
                raise BadRequest("only 'Transfer-Encoding: chunked' is accepted")
            chunked = True
        elif lname == "expect":
            expect_continue = value.strip().lower() == "100-continue"
    return length, chunked, expect_continue


def body_mode(method: str, status: int, headers: list[tuple[str, str]], http11: bool) -> str:
    """How a response body is framed towards the client: NONE, LENGTH, CHUNKED or CLOSE."""
    if method == "HEAD" or status < 200 or status in (204, 304):
        return NONE
    lengths = {v.strip() for n, v in headers if n.lower() == "content-length"}
    if len(lengths) == 1 and content_length(next(iter(lengths))) is not None:
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


def retry_after(err: CSCError) -> str | None:
    """The ``Retry-After`` value an error answer carries, if any."""
    if isinstance(err, PortalOffline | GoingAway | NodeFull):
        return RETRY_AFTER
    if isinstance(err, TenantLimit):
        return str(err.retry_after)
    if isinstance(err, TooManyConnections):
        return "1"
    return None


def json_response(
    status: int,
    body: bytes,
    *,
    request_id: str,
    keep_alive: bool,
    http11: bool,
    headers: list[tuple[str, str]] | None = None,
    method: str = "GET",
) -> bytes:
    """A complete ``application/json`` answer (no body bytes after the head of a HEAD answer)."""
    fields = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    head = encode_head(
        status,
        "",
        fields + (headers or []),
        request_id=request_id,
        mode=LENGTH,
        keep_alive=keep_alive,
        http11=http11,
    )
    return head if method == "HEAD" else head + body


def error_response(
    err: CSCError, request_id: str, *, keep_alive: bool, http11: bool, method: str = "GET"
) -> bytes:
    """The CSC's JSON error answer: ``{"error", "message", "request_id"}`` with its status."""
    body = json.dumps(err.to_json(request_id=request_id)).encode()
    wait = retry_after(err)
    return json_response(
        err.spec.http_status,
        body,
        request_id=request_id,
        keep_alive=keep_alive,
        http11=http11,
        headers=[("Retry-After", wait)] if wait is not None else None,
        method=method,
    )
