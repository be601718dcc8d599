"""The ``/metrics`` listener of the CSC and the agent, without aiohttp (shared/metrics_http.py), over real sockets: the
answers the former aiohttp route gave (paths, methods, status codes, content type), keep-alive
and pipelining, and the bounds on what a client can make it hold."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from csc.metrics import CSCMetrics, start_metrics_listener
from shared.metrics_http import MAX_HEAD, MetricsServer, serve_metrics
from tests.support.procs import scaled

BODY = b"# HELP x_total X.\n# TYPE x_total counter\nx_total 1.0\n"


@pytest.fixture
async def server() -> AsyncIterator[MetricsServer]:
    running = await serve_metrics(lambda: BODY, CONTENT_TYPE_LATEST, "127.0.0.1", 0)
    try:
        yield running
    finally:
        await running.stop()


async def _exchange(server: MetricsServer, raw: bytes) -> bytes:
    """Send ``raw``, read until the server closes the connection."""
    host, port = server.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(raw)
    try:
        return await asyncio.wait_for(reader.read(), scaled(5))
    finally:
        writer.close()


def _answers(data: bytes) -> list[tuple[str, dict[str, str], bytes]]:
    """(status line, fields, body) of each response in ``data`` (Content-Length framed)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status, *lines = head.decode("latin-1").split("\r\n")
        fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        size = int(fields["content-length"])
        body, data = rest[:size], rest[size:]
        out.append((status, fields, body))
    return out


async def test_get_metrics_answers_the_registry_with_its_content_type(
    server: MetricsServer,
) -> None:
    data = await _exchange(
        server, b"GET /metrics?name[]=x HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n"
    )
    [(status, fields, body)] = _answers(data)
    assert status == "HTTP/1.1 200 OK"
    assert fields["content-type"] == CONTENT_TYPE_LATEST
    assert fields["connection"] == "close"
    assert body == BODY


async def test_head_has_the_length_and_no_body(server: MetricsServer) -> None:
    data = await _exchange(
        server, b"HEAD /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n"
    )
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert f"Content-Length: {len(BODY)}".encode() in head
    assert rest == b""


@pytest.mark.parametrize(
    ("request_line", "status", "body", "allow"),
    [
        (b"GET / HTTP/1.1", "HTTP/1.1 404 Not Found", b"404: Not Found", None),
        (b"GET /metrics/ HTTP/1.1", "HTTP/1.1 404 Not Found", b"404: Not Found", None),
        (b"GET /healthz HTTP/1.1", "HTTP/1.1 404 Not Found", b"404: Not Found", None),
        (
            b"POST /metrics HTTP/1.1",
            "HTTP/1.1 405 Method Not Allowed",
            b"405: Method Not Allowed",
            "GET,HEAD",
        ),
        (
            b"DELETE /metrics HTTP/1.1",
            "HTTP/1.1 405 Method Not Allowed",
            b"405: Method Not Allowed",
            "GET,HEAD",
        ),
    ],
)
async def test_other_paths_and_methods_are_refused_as_before(
    server: MetricsServer, request_line: bytes, status: str, body: bytes, allow: str | None
) -> None:
    raw = request_line + b"\r\nHost: m\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    [(got_status, fields, got_body)] = _answers(await _exchange(server, raw))
    assert (got_status, got_body, fields.get("allow")) == (status, body, allow)
    assert fields["content-type"] == "text/plain; charset=utf-8"


async def test_keep_alive_and_pipelined_requests_are_answered_in_order(
    server: MetricsServer,
) -> None:
    one = b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n"
    last = b"GET /nope HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n"
    answers = _answers(await _exchange(server, one + one + last))
    assert [a[0] for a in answers] == ["HTTP/1.1 200 OK"] * 2 + ["HTTP/1.1 404 Not Found"]
    assert "connection" not in answers[0][1]


async def test_http_1_0_closes_after_the_answer(server: MetricsServer) -> None:
    [(status, _, body)] = _answers(await _exchange(server, b"GET /metrics HTTP/1.0\r\n\r\n"))
    assert (status, body) == ("HTTP/1.1 200 OK", BODY)


async def test_a_request_body_is_discarded(server: MetricsServer) -> None:
    raw = (
        b"POST /metrics HTTP/1.1\r\nHost: m\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n"
    )
    [(status, _, _)] = _answers(await _exchange(server, raw + b"x" * 100_000))
    assert status == "HTTP/1.1 405 Method Not Allowed"


async def test_garbage_gets_400_and_a_close(server: MetricsServer) -> None:
    [(status, fields, _)] = _answers(await _exchange(server, b"\x16\x03\x01 not http\r\n\r\n"))
    assert (status, fields["connection"]) == ("HTTP/1.1 400 Bad Request", "close")


async def test_a_head_beyond_the_limit_gets_431(server: MetricsServer) -> None:
    raw = b"GET /metrics HTTP/1.1\r\nHost: m\r\nX-Big: " + b"a" * (MAX_HEAD + 1) + b"\r\n\r\n"
    [(status, _, _)] = _answers(await _exchange(server, raw))
    assert status == "HTTP/1.1 431 Request Header Fields Too Large"


async def test_stop_closes_open_connections() -> None:
    running = await serve_metrics(lambda: BODY, CONTENT_TYPE_LATEST, "127.0.0.1", 0)
    host, port = running.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n")
    await reader.readuntil(BODY)
    await running.stop()
    assert await asyncio.wait_for(reader.read(), scaled(5)) == b""
    writer.close()


async def test_a_taken_address_names_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            OSError, match=rf"^\[Errno \d+\] metrics_listen: 127.0.0.1:{port} is already in use"
        ):
            await start_metrics_listener(CSCMetrics(), f"127.0.0.1:{port}", None)
