"""Fuzzing the public listener's connection (csc/relay/http_front.py) over a fake transport:
arbitrary bytes and arbitrary chunking of valid and broken requests. Whatever comes in, what
goes out is a sequence of clean responses (200 from the stub handler, or the listener's own
400/404/405/408/413/431 JSON) or a close; no exception escapes; no request reaches the handler
unless llhttp accepted its whole head."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import httptools
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csc.config import CSCConfig
from csc.relay.http_front import FrontConnection
from csc.relay.http_front_request import FrontRequest
from csc.relay.http_listener import HttpFront
from shared.errors import CSCError
from shared.http1 import json_response

OWN_STATUSES = {400, 404, 405, 408, 413, 431}
VALID = [
    b"GET /t/a@b.c/x HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET http://h/t/a@b.c/y?q=1 HTTP/1.1\r\nHost: h\r\n\r\n",
    b"POST /t/a@b.c/up HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
    b"PUT /t/a@b.c/up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HEAD /healthz HTTP/1.0\r\n\r\n",
    b"GET /readyz HTTP/1.1\r\nConnection: close\r\n\r\n",
    b"POST /t/a@b.c/ HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
    b"POST /t/a@b.c/ HTTP/1.1\r\nContent-Length: 5000\r\n\r\n" + b"z" * 5000,
    b"GET /v1/resolve/a@b.c HTTP/1.1\r\n\r\n",
]


class FakeTransport(asyncio.Transport):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.out = bytearray()
        self.closed = False
        self.protocol: Any = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        self.out += data

    def writelines(self, parts: Any) -> None:
        for part in parts:
            self.write(part)

    def get_write_buffer_size(self) -> int:
        return 0  # every write is taken at once

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol


class StubHandler:
    def __init__(self) -> None:
        self.served: list[FrontRequest] = []

    async def serve(self, conn: FrontConnection, request: FrontRequest) -> None:
        self.served.append(request)
        try:
            while await conn.body_chunk(request):
                pass
        except CSCError as err:
            conn.error(request, err)
            return
        conn.send(
            json_response(
                200,
                b"{}",
                request_id=request.request_id,
                keep_alive=conn.keep_alive(request),
                http11=request.http11,
                method=request.method,
            )
        )


def _accepted_heads(data: bytes) -> int:
    """How many request heads llhttp accepts in ``data`` before an error."""

    class Count:
        heads = 0

        def on_headers_complete(self) -> None:
            self.heads += 1

    counter = Count()
    parser = httptools.HttpRequestParser(counter)
    with contextlib.suppress(httptools.HttpParserError):
        parser.feed_data(data)
    return counter.heads


def _responses(out: bytes) -> list[tuple[int, bytes]]:
    """Parse what the listener wrote: status and body of every response."""
    found: list[tuple[int, bytes]] = []

    class Collect:
        body = b""

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            found.append((parser.get_status_code(), self.body))
            self.body = b""

    collect = Collect()
    parser = httptools.HttpResponseParser(collect)
    out = out.replace(b"HTTP/1.1 100 Continue\r\n\r\n", b"")
    parser.feed_data(out)
    return found


async def _run(data: bytes, cuts: list[int]) -> None:
    loop = asyncio.get_running_loop()
    errors: list[Any] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    config = CSCConfig(max_body_size=4096, http_max_head_size=1024, http_head_buffer_total=4096)
    handler = StubHandler()
    front = HttpFront(
        config,
        handler,
        draining=lambda: False,
    )
    transport = FakeTransport(loop)
    conn = FrontConnection(front)
    transport.set_protocol(conn)
    conn.connection_made(transport)
    start = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        if transport.closed or transport.protocol is not conn:
            break
        if cut > start:
            conn.data_received(data[start:cut])
            start = cut
        await asyncio.sleep(0)
    if not transport.closed and transport.protocol is conn:
        conn.eof_received()
    for _ in range(50):
        await asyncio.sleep(0)
    assert not errors, errors
    assert len(handler.served) <= _accepted_heads(data)
    for status, body in _responses(bytes(transport.out)):
        assert status == 200 or status in OWN_STATUSES, status
        if status != 200 and body:
            assert {"error", "message", "request_id"} <= set(json.loads(body))
    assert front.head_bytes >= 0
    assert conn._task is None or conn._task.done()


requests = st.lists(st.sampled_from(VALID), min_size=1, max_size=4).map(b"".join)
mutated = st.tuples(requests, st.integers(0, 400), st.binary(max_size=8)).map(
    lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]
)
payloads = st.one_of(st.binary(max_size=600), requests, mutated)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads, st.lists(st.integers(0, 10_000), max_size=12))
def test_any_bytes_any_chunking(data: bytes, cuts: list[int]) -> None:
    asyncio.run(_run(data, cuts))
