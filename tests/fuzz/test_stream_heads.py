"""Fuzz target: the OPEN head as the agent parses it, and ``shared.headers.header_pairs``.

The CSC's OPEN of an ``http`` stream carries ``method``, ``target``, ``headers`` (a list of
``[name, value]`` pairs) and ``body``; a hostile CSC (or a bug) controls all of it. Checks:
:func:`tenant_agent.http_request.build_request` raises only ``ProtocolError``; a head it does
build is one request line naming the configured origin's prefix, a ``Host`` of the origin and
``name: value`` lines without CR/LF injection, at most one framing field, and its size is
bounded by the OPEN's own size. ``header_pairs`` returns None or pairs without ``:``, CR, LF or
space in a name and without CR/LF in a value. (The CSC's parsing of OPEN_OK heads is
``test_open_ok_head.py``.)
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from shared.errors import ProtocolError
from shared.headers import header_pairs
from tenant_agent.http_request import Origin, build_request, parse_origin
from tests.fuzz.budget import KiB, MiB, fuzz, only, peak_memory

ORIGINS = [parse_origin(u) for u in ("http://127.0.0.1:8000", "https://u:p@portal.internal/app/")]
names = st.sampled_from(
    [
        "Content-Length",
        "content-length",
        "Transfer-Encoding",
        "Host",
        "Connection",
        "Expect",
        "X-A",
        "Authorization",
        "Keep-Alive",
        "",
        "a:b",
        "a b",
        "a\r\nb",
        "\u00e9",
        "Upgrade",
    ]
) | st.text(max_size=8)
values = st.sampled_from(
    [
        "0",
        "7",
        " 7 ",
        "-1",
        "\u00b2",
        "\u0661",
        "1" * 30,
        "1" * 5000,
        "chunked",
        "close, X-A",
        "a\r\nb",
        "a\nb",
        "\u2603",
        "\x00",
        "",
    ]
) | st.text(max_size=12)
pairs = st.lists(st.tuples(names, values).map(list), max_size=6)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
opens = st.fixed_dictionaries(
    {},
    optional={
        "method": st.sampled_from(["GET", "POST", "HEAD", "PUT", "", "G T", "GET\r\n"])
        | json_values,
        "target": st.sampled_from(["/", "/a?b=c", "//evil.example/", "x", "/a b", "/\r\nX: y"])
        | st.text(max_size=10)
        | json_values,
        "headers": pairs | json_values,
        "body": st.booleans() | json_values,
    },
)


def check_head(head: bytes, info: dict[str, Any], origin: Origin) -> None:
    text = head.decode("latin-1")
    assert text.endswith("\r\n\r\n")
    request_line, *fields = text[:-4].split("\r\n")
    method, target, version = request_line.split(" ")
    assert (method, version) == (info["method"], "HTTP/1.1")
    assert target == origin.prefix + info["target"]
    lowered = [f.split(":", 1)[0].lower() for f in fields]
    assert all(": " in f for f in fields)
    assert lowered[0] == "host" and lowered.count("host") == 1
    assert lowered.count("content-length") + lowered.count("transfer-encoding") <= 1
    assert "expect" not in lowered and "connection" not in lowered


@fuzz(500)
@given(info=opens, origin=st.sampled_from(ORIGINS), whole=st.none() | st.binary(max_size=8))
@example(
    {"method": "POST", "target": "/", "headers": [["Content-Length", "\u00b2"]], "body": True},
    ORIGINS[0],
    None,
)
@example(
    {"method": "POST", "target": "/", "headers": [["Content-Length", "1" * 5000]], "body": True},
    ORIGINS[0],
    None,
)
def test_agent_builds_a_clean_request_or_raises_protocol_error(
    info: dict[str, Any], origin: Origin, whole: bytes | None
) -> None:
    try:
        request = build_request(info, origin, whole)
    except ProtocolError:
        return
    check_head(request.head, info, origin)
    wire = len(json.dumps(info))
    assert len(request.head) <= 2 * wire + len(origin.fixed_lines) + 64


@fuzz(300)
@given(value=json_values | pairs)
def test_header_pairs_returns_none_or_clean_pairs(value: Any) -> None:
    result = header_pairs(value)
    if result is None:
        return
    for name, val in result:
        assert name and not any(c in name for c in ":\r\n ")
        assert "\r" not in val and "\n" not in val


def test_a_large_open_is_built_in_memory_proportional_to_it() -> None:
    """4 MiB of headers (beyond any frame, so only a local caller could pass it): the head
    costs a small multiple of its own size."""
    info = {"method": "GET", "target": "/", "headers": [["X-A", "v" * 1000]] * (4 * KiB)}
    error, peak = peak_memory(lambda: only((ProtocolError,), build_request, info, ORIGINS[0], None))
    assert error is None
    assert peak < 4 * 4 * MiB + 256 * KiB, peak
