"""shared/link.py ``coalesce``: the pieces written to a TLS transport (each becomes a record).

Whatever the chunks, the bytes and their order are kept, no two short pieces stay neighbours,
and a chunk at least ``small`` long is passed on as it is, never copied."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from shared.link import coalesce

SMALL = 16


@given(st.lists(st.binary(max_size=40), max_size=30))
def test_bytes_kept_short_runs_joined_long_chunks_untouched(chunks: list[bytes]) -> None:
    out = coalesce(chunks, SMALL)
    assert b"".join(out) == b"".join(chunks)
    for left, right in itertools.pairwise(out):
        assert len(left) >= SMALL or len(right) >= SMALL, "two short pieces left apart"
    long_in = [c for c in chunks if len(c) >= SMALL]
    long_out = [p for p in out if any(p is c for c in long_in)]
    assert len(long_out) == len(long_in), "a long chunk was copied"


def test_a_message_of_small_frames_is_one_piece() -> None:
    header, frames = b"\x82\x7e\x00\x40", [b"o" * 9, b"h" * 12, b"d" * 20, b"f" * 9]
    assert coalesce([header, *frames], 64) == [header + b"".join(frames)]
    view = memoryview(b"x" * 100)
    assert coalesce([header, view, b"y"], 64) == [header, view, b"y"]
