"""The listener's parsing rules without I/O: request targets, routes, request framing, and the
bytes of the answers it writes itself."""

from __future__ import annotations

import json

import pytest

from csc.relay.http_front_request import (
    HEALTHZ,
    MISSING,
    READYZ,
    RESOLVE,
    TUNNEL,
    origin_form,
    route,
)
from shared.errors import BadRequest, RequestTimeout, TenantLimit
from shared.http1 import error_response, request_framing


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/t/a@b.c/x?q=1", "/t/a@b.c/x?q=1"),
        ("http://host:8080/t/a@b.c/x?q=1", "/t/a@b.c/x?q=1"),
        ("HTTPS://host/t/a@b.c", "/t/a@b.c"),
        ("http://host", "/"),
    ],
)
def test_origin_form(target: str, expected: str) -> None:
    assert origin_form(target) == expected


@pytest.mark.parametrize("target", ["*", "host:443", "ftp://host/x", ""])
def test_other_targets_are_bad_requests(target: str) -> None:
    with pytest.raises(BadRequest):
        origin_form(target)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/t/acme%40example.com/x/y", (TUNNEL, "acme@example.com")),
        ("/t/a@b.c", (TUNNEL, "a@b.c")),
        ("/t/a@b.c?x", (TUNNEL, "a@b.c")),
        ("/v1/resolve/bad%20alias!", (RESOLVE, "bad alias!")),
        ("/v1/resolve/a/b", (MISSING, "")),
        ("/healthz", (HEALTHZ, "")),
        ("/readyz?x=1", (READYZ, "")),
        ("/v1/agent/connect", (MISSING, "")),  # an upgrade path: the listener's, not a route
        ("/metrics", (MISSING, "")),  # on its own listener
        ("/", (MISSING, "")),
    ],
)
def test_route(target: str, expected: tuple[str, str]) -> None:
    assert route("GET", target) == expected


def test_request_framing() -> None:
    assert request_framing([("Content-Length", "12")]) == (12, False, False)
    assert request_framing([("Transfer-Encoding", "Chunked"), ("Expect", "100-continue")]) == (
        None,
        True,
        True,
    )
    for bad in (
        [("Transfer-Encoding", "gzip, chunked")],
        [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")],
        [("Transfer-Encoding", "identity")],
    ):
        with pytest.raises(BadRequest):
            request_framing(bad)


def test_error_response_bytes() -> None:
    out = error_response(RequestTimeout("slow"), "rid1", keep_alive=False, http11=True)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 408 Request Timeout"
    assert b"Content-Type: application/json" in head
    assert b"Connection: close" in head
    assert json.loads(body) == {"error": "request_timeout", "message": "slow", "request_id": "rid1"}
    limited = error_response(TenantLimit("busy", retry_after=3), "r", keep_alive=True, http11=True)
    assert b"Retry-After: 3\r\n" in limited
    head_only = error_response(RequestTimeout(), "r", keep_alive=True, http11=False, method="HEAD")
    assert head_only.endswith(b"\r\n\r\n") and b"Connection: keep-alive" in head_only
