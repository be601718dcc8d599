"""A deterministic HTTP upstream (a stand-in portal) and a TCP echo server, for tests and bench.

Endpoints of :func:`create_upstream_app`:

``GET /bytes/{n}``        n pseudo-random bytes with Content-Length; ``?chunk=`` write size,
                          ``?rate=`` bytes per second (a slow response).
``GET /chunked/{n}``      the same bytes, chunked transfer encoding, no Content-Length.
``POST|PUT /upload``      consumes the body as a stream; JSON ``{"bytes", "sha256"}``.
``ANY /echo/{tail}``      JSON: method, path, query, headers (list of pairs), body length/sha256.
``GET /small``            a fixed 1 KiB body, as cheap as aiohttp allows (benchmarks).
``GET /status/{code}``    answers with that status.
``GET /slow-head``        waits ``?delay=`` seconds before sending the head.
``GET /reset-mid``        sends the head and ``?n=`` body bytes of a longer declared body, then
                          aborts the transport (``&rst=1``: with SO_LINGER 0, so a TCP RST).

Body invariant: byte ``i`` of every generated body is the same for every request and endpoint,
so :func:`expected_sha256` knows the hash of ``n`` bytes without a server. The body is a fixed
1 MiB block (seeded PRNG) whose ``k``-th repetition is rotated by ``k * 7919`` bytes, so swapped
or repeated blocks change the hash too. Every piece is a slice of one immutable buffer: no
per-request generation cost.

``python -m harness.upstream --listen 127.0.0.1:0 --ready-file PATH
[--tcp-echo-listen 127.0.0.1:0]`` runs it as a process and writes
``{"http": "host:port", "tcp_echo": "host:port" | null, "pid": N}`` to PATH once listening.
The TCP echo server sends back every byte and half-closes when its client half-closes.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import os
import random
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web

from harness.readyfile import parse_hostport
from shared.runtime import format_hostport, wait_for_stop_signal, write_ready_file
from shared.runtime import run as run_main

BLOCK_SIZE = 1 << 20
DEFAULT_CHUNK = 256 * 1024
SMALL_SIZE = 1024
_SEED = 0xC5C
_ROTATE_STEP = 7919
_BLOCK = random.Random(_SEED).randbytes(BLOCK_SIZE)
_DOUBLED = memoryview(_BLOCK + _BLOCK)
SMALL_BODY = bytes(_BLOCK[:SMALL_SIZE])
_MAX_SIZE = 1 << 40


# --- deterministic bodies ------------------------------------------------------------------


def _rotation(block_index: int) -> int:
    return (block_index * _ROTATE_STEP) % BLOCK_SIZE


def body_pieces(n: int, chunk: int = DEFAULT_CHUNK) -> Iterator[memoryview]:
    """The ``n``-byte deterministic body as slices of at most ``chunk`` bytes (no copies)."""
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    pos = 0
    while pos < n:
        block_index, offset = divmod(pos, BLOCK_SIZE)
        start = _rotation(block_index) + offset
        size = min(chunk, BLOCK_SIZE - offset, n - pos)
        yield _DOUBLED[start : start + size]
        pos += size


def body_bytes(n: int) -> bytes:
    """The ``n``-byte deterministic body in one buffer (for small bodies in tests)."""
    return b"".join(body_pieces(n, BLOCK_SIZE))


def body_byte(i: int) -> int:
    """Byte ``i`` of every deterministic body, computed independently of :func:`body_pieces`."""
    block_index, offset = divmod(i, BLOCK_SIZE)
    return _BLOCK[(_rotation(block_index) + offset) % BLOCK_SIZE]


@functools.lru_cache(maxsize=64)
def expected_sha256(n: int) -> str:
    """Hex SHA-256 of the first ``n`` bytes served by ``/bytes/{n}`` and ``/chunked/{n}``."""
    digest = hashlib.sha256()
    for piece in body_pieces(n, BLOCK_SIZE):
        digest.update(piece)
    return digest.hexdigest()


# --- request parsing helpers ---------------------------------------------------------------


def _int_param(value: str | None, default: int, name: str, minimum: int = 0) -> int:
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer\n") from None
    if not minimum <= number <= _MAX_SIZE:
        raise web.HTTPBadRequest(text=f"{name} out of range\n")
    return number


def _float_param(value: str | None, default: float, name: str, maximum: float = 3600.0) -> float:
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be a number\n") from None
    if not 0 <= number <= maximum:
        raise web.HTTPBadRequest(text=f"{name} out of range\n")
    return number


async def _write_body(
    request: web.Request, resp: web.StreamResponse, n: int, chunk: int, rate: float
) -> None:
    """Write the deterministic body, paced to ``rate`` bytes/s when ``rate`` > 0."""
    if request.method == "HEAD":
        return
    loop = asyncio.get_running_loop()
    started, sent = loop.time(), 0
    for piece in body_pieces(n, chunk):
        await resp.write(piece)
        sent += len(piece)
        if rate > 0:
            pause = started + sent / rate - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)


def _chunk_and_rate(request: web.Request) -> tuple[int, float]:
    rate = _float_param(request.query.get("rate"), 0.0, "rate", maximum=float(_MAX_SIZE))
    default_chunk = DEFAULT_CHUNK if rate <= 0 else max(1, min(DEFAULT_CHUNK, int(rate / 20)))
    chunk = _int_param(request.query.get("chunk"), default_chunk, "chunk", minimum=1)
    return chunk, rate


# --- handlers ------------------------------------------------------------------------------


async def handle_bytes(request: web.Request) -> web.StreamResponse:
    n = _int_param(request.match_info["n"], 0, "n")
    chunk, rate = _chunk_and_rate(request)
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.content_length = n
    await resp.prepare(request)
    await _write_body(request, resp, n, chunk, rate)
    await resp.write_eof()
    return resp


async def handle_chunked(request: web.Request) -> web.StreamResponse:
    n = _int_param(request.match_info["n"], 0, "n")
    chunk, rate = _chunk_and_rate(request)
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    await _write_body(request, resp, n, chunk, rate)
    await resp.write_eof()
    return resp


async def _hash_body(request: web.Request) -> tuple[int, str]:
    digest, total = hashlib.sha256(), 0
    async for data in request.content.iter_any():
        digest.update(data)
        total += len(data)
    return total, digest.hexdigest()


async def handle_upload(request: web.Request) -> web.Response:
    total, sha = await _hash_body(request)
    return web.json_response({"bytes": total, "sha256": sha})


async def handle_echo(request: web.Request) -> web.Response:
    total, sha = await _hash_body(request)
    return web.json_response(
        {
            "method": request.method,
            "path": request.path,
            "raw_path": request.raw_path,
            "query": request.query_string,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_bytes": total,
            "body_sha256": sha,
        }
    )


async def handle_small(request: web.Request) -> web.Response:
    return web.Response(body=SMALL_BODY)


async def handle_status(request: web.Request) -> web.Response:
    code = _int_param(request.match_info["code"], 200, "code", minimum=200)
    if code > 599:
        raise web.HTTPBadRequest(text="code must be 200..599\n")
    if code in (204, 304):
        return web.Response(status=code)
    return web.json_response({"status": code}, status=code)


async def handle_slow_head(request: web.Request) -> web.Response:
    delay = _float_param(request.query.get("delay"), 1.0, "delay")
    await asyncio.sleep(delay)
    return web.json_response({"delayed": delay})


async def handle_reset_mid(request: web.Request) -> web.StreamResponse:
    n = _int_param(request.query.get("n"), 64 * 1024, "n")
    declared = _int_param(request.query.get("total"), 2 * n + 1, "total")
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.content_length = max(declared, n + 1)
    await resp.prepare(request)
    for piece in body_pieces(n):
        await resp.write(piece)
    await _abort_transport(request, rst=request.query.get("rst") in ("1", "true"))
    return resp


async def _abort_transport(request: web.Request, *, rst: bool) -> None:
    transport = request.transport
    if transport is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while transport.get_write_buffer_size() and loop.time() < deadline:
        await asyncio.sleep(0.001)  # let the partial body reach the kernel first
    sock = transport.get_extra_info("socket")
    if rst and sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def create_upstream_app() -> web.Application:
    """The upstream aiohttp application (see the module docstring for its endpoints)."""
    app = web.Application()
    app.router.add_get("/bytes/{n}", handle_bytes)
    app.router.add_get("/chunked/{n}", handle_chunked)
    app.router.add_post("/upload", handle_upload)
    app.router.add_put("/upload", handle_upload)
    app.router.add_route("*", "/echo/{tail:.*}", handle_echo)
    app.router.add_get("/small", handle_small)
    app.router.add_get("/status/{code}", handle_status)
    app.router.add_route("*", "/slow-head", handle_slow_head)
    app.router.add_get("/reset-mid", handle_reset_mid)
    return app


# --- TCP echo ------------------------------------------------------------------------------


class EchoProtocol(asyncio.Protocol):
    """Echo every byte; half-close when the client half-closes. Reading pauses under backpressure."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    def eof_received(self) -> bool:
        assert self._transport is not None
        if self._transport.can_write_eof():
            self._transport.write_eof()
        return False  # close once the echoed bytes are flushed

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()


async def start_tcp_echo_server(host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """A listening TCP echo server (see :class:`EchoProtocol`)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(EchoProtocol, host, port)


# --- in-process runner ---------------------------------------------------------------------


@dataclass
class UpstreamServer:
    """A running upstream in this process: ``http_url``, optional ``tcp_echo_port``."""

    runner: web.AppRunner
    host: str
    http_port: int
    tcp_echo: asyncio.Server | None = None

    @property
    def http_url(self) -> str:
        return f"http://{format_hostport(self.host, self.http_port)}"

    @property
    def tcp_echo_port(self) -> int | None:
        if self.tcp_echo is None:
            return None
        return int(self.tcp_echo.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.tcp_echo is not None:
            self.tcp_echo.close()
            await self.tcp_echo.wait_closed()
        await self.runner.cleanup()

    async def __aenter__(self) -> UpstreamServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def start_upstream_server(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    tcp_echo_port: int | None = None,
) -> UpstreamServer:
    """Serve :func:`create_upstream_app` on ``host:port`` (0: any free port).

    ``tcp_echo_port`` starts the TCP echo server too (0: any free port; ``None``: none).
    """
    runner = web.AppRunner(create_upstream_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = int(runner.addresses[0][1])
    echo = None
    if tcp_echo_port is not None:
        echo = await start_tcp_echo_server(host, tcp_echo_port)
    return UpstreamServer(runner, host, bound_port, echo)


# --- command line --------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m harness.upstream", description=__doc__)
    parser.add_argument(
        "--listen", default="127.0.0.1:0", help="HTTP host:port (default %(default)s)"
    )
    parser.add_argument("--tcp-echo-listen", default=None, help="also run the TCP echo server")
    parser.add_argument("--ready-file", default=None, help="write the bound addresses here (JSON)")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    host, port = parse_hostport(args.listen)
    echo_port = None
    if args.tcp_echo_listen:
        echo_host, echo_port = parse_hostport(args.tcp_echo_listen)
        if echo_host != host:
            raise SystemExit("--tcp-echo-listen must use the same host as --listen")
    server = await start_upstream_server(host, port, tcp_echo_port=echo_port)
    info: dict[str, Any] = {
        "http": format_hostport(host, server.http_port),
        "tcp_echo": None
        if server.tcp_echo_port is None
        else format_hostport(host, server.tcp_echo_port),
        "pid": os.getpid(),
    }
    print(f"upstream listening: {info}", flush=True)
    if args.ready_file:
        write_ready_file(args.ready_file, info)
    try:
        await wait_for_stop_signal()
    finally:
        await server.close()


def main(argv: list[str] | None = None) -> int:
    run_main(_serve(_parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
