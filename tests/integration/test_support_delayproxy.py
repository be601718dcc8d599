"""The delay proxy delays each direction, keeps order and throughput, and forwards EOF and faults.

Everything runs on loopback, port 0. Lower bounds on delays are exact (a chunk is never early);
upper bounds are generous and scaled by ``CSC_TEST_TIMEOUT_FACTOR``.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import AsyncIterator

import pytest

from tests.support.delayproxy import EARLY, DelayProxy
from tests.support.procs import ProcFactory, scaled
from tests.support.upstream import body_bytes, start_tcp_echo_server

MiB = 1024 * 1024


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await start_tcp_echo_server()
    yield int(server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()


class _Stamper:
    """A server that answers every line at once and records when each line arrived."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            self.arrivals.append(time.monotonic())
            writer.write(line)
        writer.close()


async def _roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
    started = time.monotonic()
    writer.write(b"ping\n")
    assert await asyncio.wait_for(reader.readline(), scaled(5)) == b"ping\n"
    return time.monotonic() - started


async def _pump(port: int, payload: bytes) -> tuple[bytes, float]:
    """Send ``payload`` and EOF while reading the echo to EOF; returns (echo, seconds)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()

    async def send() -> None:
        view = memoryview(payload)
        for offset in range(0, len(view), MiB):
            writer.write(view[offset : offset + MiB])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    echoed = await asyncio.wait_for(reader.read(), scaled(30))
    await sender
    writer.close()
    return echoed, time.monotonic() - started


async def test_each_direction_is_delayed() -> None:
    stamper = _Stamper()
    server = await asyncio.start_server(stamper.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with DelayProxy("127.0.0.1", port, delay=0.1) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        await _roundtrip(reader, writer)  # connection set up
        sent = time.monotonic()
        elapsed = await _roundtrip(reader, writer)
        assert stamper.arrivals[-1] - sent >= 0.1 - EARLY
        assert 0.2 <= elapsed < 0.2 + scaled(0.15)
        proxy.delay = 0
        assert await _roundtrip(reader, writer) < scaled(0.05)
        writer.close()
    server.close()
    await server.wait_closed()


async def test_order_is_kept_across_many_chunks(echo_port: int) -> None:
    async with DelayProxy("127.0.0.1", echo_port, delay=0.01) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        lines = [f"{i:05d}\n".encode() for i in range(500)]
        for line in lines:
            writer.write(line)
            await writer.drain()
            await asyncio.sleep(0)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), scaled(10)) == b"".join(lines)
        writer.close()


async def test_throughput_at_zero_delay(echo_port: int) -> None:
    payload = body_bytes(64 * MiB)
    async with DelayProxy("127.0.0.1", echo_port, delay=0) as proxy:
        echoed, elapsed = await _pump(proxy.port, payload)
    assert echoed == payload
    rate = len(payload) / elapsed / 1e6
    print(f"delay proxy echo at delay 0: {rate:.0f} MB/s each way")
    assert rate > 40 / scaled(1)


async def test_delay_does_not_cap_throughput(echo_port: int) -> None:
    payload = body_bytes(16 * MiB)
    async with DelayProxy("127.0.0.1", echo_port, delay=0.05) as proxy:
        echoed, elapsed = await _pump(proxy.port, payload)
    assert echoed == payload
    # One chunk per delay would need 64 x 0.1 s; pipelined, it is a round trip plus transfer.
    assert 0.1 <= elapsed < scaled(2.0)


async def test_half_close_propagates_both_ways(echo_port: int) -> None:
    async with DelayProxy("127.0.0.1", echo_port, delay=0.05) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"before eof")
        writer.write_eof()  # reaches the echo server, which answers with its own EOF
        assert await asyncio.wait_for(reader.read(), scaled(5)) == b"before eof"
        assert reader.at_eof()
        writer.close()
        await asyncio.wait_for(_until(lambda: proxy.connection_count == 0), scaled(5))


async def _until(condition: object) -> None:
    assert callable(condition)
    while not condition():
        await asyncio.sleep(0.01)


async def test_kill_connections_resets(echo_port: int) -> None:
    async with DelayProxy("127.0.0.1", echo_port, delay=0) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        await _roundtrip(reader, writer)
        assert proxy.kill_connections() == 1
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), scaled(5))
        assert proxy.connection_count == 0
        writer.close()


async def test_unreachable_target_closes_client() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    async with DelayProxy("127.0.0.1", dead_port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), scaled(5))
        writer.close()


async def test_command_line(echo_port: int, procs: ProcFactory) -> None:
    ready = procs.tmp_path / "proxy.ready.json"
    argv = [sys.executable, "-m", "tests.support.delayproxy", "--target"]
    argv += [f"127.0.0.1:{echo_port}", "--delay", "0.02", "--ready-file", str(ready)]
    proc = await asyncio.to_thread(procs.spawn, "delayproxy", argv, ready_file=ready)
    port = int(proc.ready["listen"].rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _roundtrip(reader, writer)
    # each direction may send up to EARLY before its chunk is due (timer granularity)
    assert await _roundtrip(reader, writer) >= 0.04 - 2 * EARLY
    writer.close()
    proc.terminate()
    assert await asyncio.to_thread(proc.wait, 10) == 0


async def _scenario_on_current_loop() -> None:
    """Delay, order, half-close and kill on one loop (run under uvloop below)."""
    echo = await start_tcp_echo_server()
    port = int(echo.sockets[0].getsockname()[1])
    async with DelayProxy("127.0.0.1", port, delay=0) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"sent before the target is connected\n")
        assert await reader.readline() == b"sent before the target is connected\n"
        proxy.delay = 0.05
        assert await _roundtrip(reader, writer) >= 0.1 - 2 * EARLY
        proxy.delay = 0
        payload = body_bytes(8 * MiB)
        echoed, _ = await _pump(proxy.port, payload)
        assert echoed == payload
        proxy.kill_connections()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), scaled(5))
        writer.close()
    echo.close()
    await echo.wait_closed()


def test_on_uvloop() -> None:
    """The command-line tools run on uvloop, whose transports are not asyncio's classes."""
    import uvloop  # a dependency on Linux, where the tests run

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_scenario_on_current_loop())
