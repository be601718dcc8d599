"""The agent's request heads (tenant_agent/http_request.py): exact bytes, no event loop."""

from __future__ import annotations

from typing import Any

import pytest

from shared.errors import ProtocolError
from tenant_agent.http_request import build_request, parse_origin

PLAIN = parse_origin("http://portal.internal:8080")


def info(method: str = "GET", target: str = "/a?b=1", body: bool = False, **over: Any) -> Any:
    return {"method": method, "target": target, "headers": over.pop("headers", []), "body": body}


def test_origin_forms() -> None:
    assert PLAIN.host == "portal.internal" and PLAIN.port == 8080 and not PLAIN.tls
    assert PLAIN.fixed_lines == "Host: portal.internal:8080\r\n"
    tls = parse_origin("https://Portal.example/base/")
    assert (tls.host, tls.port, tls.tls, tls.prefix) == ("portal.example", 443, True, "/base")
    assert tls.fixed_lines == "Host: portal.example\r\n"
    assert tls.name == "https://portal.example/base"
    v6 = parse_origin("http://[::1]:81")
    assert (v6.host, v6.fixed_lines) == ("::1", "Host: [::1]:81\r\n")
    secret = parse_origin("http://ag%40ent:pa%3Ass@h")
    assert secret.fixed_lines == "Host: h\r\nAuthorization: Basic YWdAZW50OnBhOnNz\r\n"
    assert "pa" not in secret.name and secret.has_auth
    with pytest.raises(ValueError):
        parse_origin("ftp://h")


def test_get_has_no_framing_and_the_origin_host() -> None:
    headers = [["Host", "evil"], ["X-A", "1"], ["Connection", "close, X-B"], ["X-B", "2"]]
    req = build_request(info(headers=headers), PLAIN, None)
    assert req.head == (b"GET /a?b=1 HTTP/1.1\r\nHost: portal.internal:8080\r\nX-A: 1\r\n\r\n")
    assert not req.body and not req.streamed and req.whole is None and not req.is_head


def test_prefix_is_prepended() -> None:
    req = build_request(info(method="HEAD", target="/"), parse_origin("http://h/p/"), None)
    assert req.head.startswith(b"HEAD /p/ HTTP/1.1\r\n") and req.is_head


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
def test_body_methods_without_body_say_length_zero(method: str) -> None:
    req = build_request(info(method=method, headers=[["Content-Length", "7"]]), PLAIN, None)
    assert req.head.endswith(b"\r\nContent-Length: 0\r\n\r\n")
    assert req.head.count(b"Content-Length") == 1


def test_streamed_body_keeps_the_declared_length_or_goes_chunked() -> None:
    headers = [["Content-Length", "10"], ["Transfer-Encoding", "chunked"], ["Expect", "x"]]
    req = build_request(info("POST", body=True, headers=headers), PLAIN, None)
    assert req.streamed and req.length == 10
    assert req.head.endswith(b"Host: portal.internal:8080\r\nContent-Length: 10\r\n\r\n")
    req = build_request(info("POST", body=True), PLAIN, None)
    assert req.streamed and req.length is None
    assert req.head.endswith(b"\r\nTransfer-Encoding: chunked\r\n\r\n")


def test_whole_body_is_sent_with_its_length() -> None:
    req = build_request(info("POST", body=True), PLAIN, b"hello")
    assert not req.streamed and req.whole == b"hello" and req.length == 5
    assert req.head.endswith(b"\r\nContent-Length: 5\r\n\r\n")
    with pytest.raises(ProtocolError):
        build_request(info("POST", body=True, headers=[["Content-Length", "4"]]), PLAIN, b"hello")


def test_url_credentials_replace_the_clients_authorization() -> None:
    origin = parse_origin("http://u:p@h")
    req = build_request(info(headers=[["Authorization", "Bearer t"]]), origin, None)
    assert req.head == b"GET /a?b=1 HTTP/1.1\r\nHost: h\r\nAuthorization: Basic dTpw\r\n\r\n"


@pytest.mark.parametrize(
    "bad",
    [
        {"method": "GE T"},
        {"method": ""},
        {"target": "a"},
        {"target": "/a b"},
        {"headers": [["X", "a\r\nb"]]},
        {"headers": "x"},
        {"headers": [["X", "\u2603"]]},
        {"headers": [["Content-Length", "1"], ["Content-Length", "2"]], "body": True},
        {"headers": [["Content-Length", "-1"]], "body": True},
        {"headers": [["Content-Length", "\u00b2"]], "body": True},  # isdigit(), not ASCII
        {"headers": [["Content-Length", "\u0661\u0662"]], "body": True},  # Arabic-Indic 12
        {"headers": [["Content-Length", "1" * 5000]], "body": True},  # beyond int()'s limit
    ],
)
def test_invalid_opens_are_protocol_errors(bad: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        build_request({**info(), **bad}, PLAIN, None)
