"""A TCP relay on loopback that keeps what it passes, and a reader of TLS record headers, for
tests that look at the bytes on the wire between two parts (peer links, the agent's link)."""

from __future__ import annotations

import asyncio

#: The TLS record content type of application data (RFC 8446 §5.1).
APPLICATION_DATA = 0x17


class CaptureRelay:
    """A TCP relay on loopback that keeps every byte it passes, per direction."""

    def __init__(self) -> None:
        self.target: tuple[str, int] | None = None
        self.up = bytearray()  # dialler → listener
        self.down = bytearray()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._relay(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.target is None:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        await asyncio.gather(
            self._pipe(reader, up_writer, self.up), self._pipe(up_reader, writer, self.down)
        )

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, seen: bytearray) -> None:
        try:
            while data := await src.read(65536):
                seen += data
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            dst.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def tls_records(data: bytes | bytearray, start: int) -> list[int]:
    """The content types of the TLS records in ``data`` that begin at or after ``start``."""
    types, pos = [], 0
    while pos + 5 <= len(data):
        if pos >= start:
            types.append(data[pos])
        pos += 5 + int.from_bytes(data[pos + 3 : pos + 5], "big")
    return types
