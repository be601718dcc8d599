"""Fuzz target: the portal's JSON request bodies (``POST v1/logon``, ``portal.api``).

The logon body comes from any device through the relay: at most 64 KiB (the app's
``client_max_size``), any bytes. Checks: ``_logon_request`` returns a request whose four fields
are non-empty strings within ``MAX_FIELD`` (``device_id`` printable), or raises ``ApiError`` with
a 4xx status and a stable code; nothing else escapes (an escaping exception is a 500 with a
logged traceback); and a body at the size limit is parsed within a stated memory bound.

A body nested deeper than the JSON decoder's recursion limit (60000 times ``[``) is a 400, not
a ``RecursionError`` turned into a 500 (portal/jsonbody.py bounds size and depth before decoding).
"""

from __future__ import annotations

import json
from collections.abc import Coroutine
from typing import Any, TypeVar

from hypothesis import given
from hypothesis import strategies as st

from portal.api import MAX_FIELD, LogonRequest, _logon_request
from portal.state import ApiError
from tests.fuzz.budget import KiB, fuzz, peak_memory

T = TypeVar("T")
MAX_BODY = 64 * KiB  # portal/server.py: web.Application(client_max_size=...)


class _Body:
    """What ``_logon_request`` reads of an aiohttp request: ``await request.read()``."""

    def __init__(self, raw: bytes) -> None:
        self._raw = raw

    async def read(self) -> bytes:
        return self._raw


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that never waits (no event loop needed)."""
    try:
        coro.send(None)
    except StopIteration as done:
        value: T = done.value
        return value
    coro.close()
    raise AssertionError("the coroutine waited")


def parse(raw: bytes) -> LogonRequest | ApiError:
    try:
        return run(_logon_request(_Body(raw)))  # type: ignore[arg-type]
    except ApiError as exc:
        return exc


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
field_values = (
    st.text(max_size=12)
    | st.sampled_from(["", "\x00", "a\nb", "x" * 129, "x" * 1025, "\u2028"])
    | json_values
)
logon_bodies = st.fixed_dictionaries(
    {},
    optional={name: field_values for name in MAX_FIELD} | {"extra": json_values},
).map(lambda d: json.dumps(d).encode())
bodies = (
    logon_bodies
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=80)
    | st.sampled_from([b"", b"1" * 5000, b"\xef\xbb\xbf{}", b'{"user": "\\ud800"}', b"NaN"])
)


@fuzz(400)
@given(raw=bodies)
def test_logon_body_is_a_request_or_a_4xx_api_error(raw: bytes) -> None:
    result = parse(raw)
    if isinstance(result, ApiError):
        assert 400 <= result.status < 500 and result.code and result.message
        return
    for name, limit in MAX_FIELD.items():
        value = getattr(result, name)
        assert isinstance(value, str) and 0 < len(value) <= limit
    assert result.device_id.isprintable()


def test_a_body_at_the_size_limit_is_parsed_in_bounded_memory() -> None:
    body = json.dumps({"user": "u", "pad": ["x" * 100] * (MAX_BODY // 110)}).encode()
    assert len(body) <= MAX_BODY
    result, peak = peak_memory(lambda: parse(body))
    assert isinstance(result, ApiError) and result.status == 400
    assert peak < 16 * MAX_BODY, peak


def test_a_deeply_nested_body_is_a_4xx_api_error() -> None:
    result = parse(b"[" * 60_000)
    assert isinstance(result, ApiError) and 400 <= result.status < 500
