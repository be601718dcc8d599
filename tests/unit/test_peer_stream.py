"""PeerStream (csc/cluster/peer.py): the agent's answer at the head of a forwarded stream is
found whatever the chunking, the bytes after it are delivered exactly once, and credit goes
back for every byte exactly once (head bytes at once, the rest when the reader consumes them)."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csc.cluster.peerstream import PeerStream, encode_head
from shared.errors import CSCError, ProtocolError


class FakeConn:
    binary_heads = True  # the link speaks 1.1 (a 1.0 link: test_binary_heads.py)


class FakeLink:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.conn = FakeConn()


class FakeInner:
    """The parts of a LinkStream that PeerStream uses."""

    def __init__(self, chunks: list[bytes], held: int = 0) -> None:
        self.link = FakeLink(asyncio.get_running_loop())
        #: how many of the chunks had arrived when the stream was admitted (``read_now``)
        self.held = held
        self.id = 1
        self.info: dict[str, Any] = {"alias": "a@example.com"}
        self.chunks = deque(chunks)
        self.credited = 0
        self.reset_with: CSCError | None = None
        self.error: CSCError | None = None

    async def read(self) -> bytes:
        await asyncio.sleep(0)
        self.held = 0
        return self.chunks.popleft() if self.chunks else b""

    def read_now(self) -> bytes | None:
        if self.held <= 0:
            return None
        self.held -= 1
        return self.chunks.popleft() if self.chunks else b""

    def consumed(self, n: int) -> None:
        self.credited += n

    def read_complete(self) -> bytes | None:
        return None

    def reset(self, err: CSCError) -> None:
        self.reset_with = err

    def finish(self) -> None:
        pass


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


@settings(max_examples=200, deadline=None)
@given(
    head=st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=20), max_size=5),
    body=st.binary(max_size=300),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    held=st.integers(min_value=0, max_value=14),
)
def test_head_and_body_survive_any_chunking(
    head: dict[str, Any], body: bytes, cuts: list[int], held: int
) -> None:
    """``held``: the chunks that came with the admission (read without waiting), the rest later."""

    async def run() -> None:
        wire = encode_head(head) + body
        inner = FakeInner(_split(wire, cuts), held)
        stream = PeerStream(inner, "A")  # type: ignore[arg-type]
        assert await stream.opened == head
        received = b""
        while chunk := await stream.read():
            received += bytes(chunk)
            stream.consumed(len(chunk))
        assert received == body
        assert inner.credited == len(wire)
        stream.finish()

    asyncio.run(run())


@pytest.mark.parametrize(
    "head", [b"{x}", b"[" * 5000, b"1" * 5000], ids=["not-json", "too-deep", "too-many-digits"]
)
def test_a_head_that_is_not_json_fails_the_open_and_resets(head: bytes) -> None:
    async def run() -> None:
        inner = FakeInner([len(head).to_bytes(4, "big") + head, b"rest"])
        stream = PeerStream(inner, "A")  # type: ignore[arg-type]
        try:
            await stream.opened
        except ProtocolError:
            pass
        else:
            raise AssertionError("a bad head was accepted")
        assert isinstance(inner.reset_with, ProtocolError)

    asyncio.run(run())


def test_an_oversized_head_is_refused_before_it_is_read() -> None:
    async def run() -> None:
        inner = FakeInner([b"\x7f\xff\xff\xff", b"x" * 10])
        stream = PeerStream(inner, "A")  # type: ignore[arg-type]
        try:
            await stream.opened
        except ProtocolError as err:
            assert "head" in err.message
        else:
            raise AssertionError("an oversized head was accepted")

    asyncio.run(run())
