"""shared/aio.py's ``splice`` when both of its directions fail at once (over real sockets)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from shared.aio import splice
from shared.errors import Cancelled, CSCError


class FailingStream:
    """A stream whose reader and writer both fail with the same error when ``fail`` is set."""

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}
        self.fail = asyncio.Event()
        self.error: CSCError | None = None
        self.unprocessed = False

    async def read(self) -> bytes:
        await self.fail.wait()
        raise Cancelled("the stream failed")

    async def write(self, data: bytes | memoryview) -> None:
        await self.fail.wait()
        raise Cancelled("the stream failed")

    def buffered(self) -> int:
        return 0

    def consumed(self, nbytes: int) -> None:
        pass

    def write_eof(self) -> None:
        pass

    def read_complete(self) -> bytes | None:
        return None

    def reset(self, err: CSCError) -> None:
        self.error = err

    def finish(self) -> None:
        pass


async def test_both_directions_failing_together_leave_no_unretrieved_error() -> None:
    """Before: the direction that failed second kept its error in a task nobody read, and
    asyncio logged "Task exception was never retrieved" with a traceback."""
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(str(context["message"])))
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
    accepted = loop.create_future()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result((reader, writer))

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, client_writer = await asyncio.open_connection("127.0.0.1", port)
    reader, writer = await accepted
    stream = FailingStream()
    try:
        client_writer.write(b"bytes for the stream")  # the outbound side waits in write()
        relay = asyncio.ensure_future(splice(stream, reader, writer, reset_code=Cancelled.code))
        await asyncio.sleep(0.05)
        stream.fail.set()  # both sides fail in the same loop pass
        await relay
        await asyncio.sleep(0)
        gc.collect()
        await asyncio.sleep(0)
        assert not [m for m in reported if "never retrieved" in m], reported
    finally:
        client_writer.close()
        writer.close()
        server.close()
        await server.wait_closed()
        loop.set_exception_handler(None)


@pytest.fixture(autouse=True)
def _no_debug_noise() -> None:
    gc.collect()  # errors of earlier tests' tasks are not this test's
