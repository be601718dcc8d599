"""Micro-benchmark of stream heads (docs/protocol.md §6.1): encode and decode of a typical
request head (OPEN) and response head (OPEN_OK) as JSON (protocol 1.0) and binary (1.1), with
the receivers' header validation (``header_pairs``) that each form needs, in µs per head.

Usage: ``.venv/bin/python bench/heads.py`` (a few seconds; numbers are per call, best of 5).
"""

from __future__ import annotations

import timeit
from collections.abc import Callable
from typing import Any

from shared.headers import header_pairs
from shared.protocol.codec import decode_json, encode_json
from shared.protocol.heads import decode_answer, decode_open, encode_answer, encode_open

REQUEST: dict[str, Any] = {
    "kind": "http",
    "alias": "acme@example.com",
    "client": "198.51.100.7:50312",
    "request_id": "4be0c6f1a8d94e2b9c3f7a1d5e6b8c90",
    "method": "GET",
    "target": "/packages/tool-1.4.2.zip?device=x1",
    "headers": [
        ("User-Agent", "csc-bootloader/0.1.0"),
        ("Accept", "*/*"),
        ("Accept-Encoding", "gzip, deflate"),
        ("X-Forwarded-For", "198.51.100.7"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "csc.example"),
        ("X-Forwarded-Prefix", "/t/acme@example.com"),
        ("X-Request-Id", "4be0c6f1a8d94e2b9c3f7a1d5e6b8c90"),
    ],
    "body": False,
}
RESPONSE: dict[str, Any] = {
    "status": 200,
    "reason": "OK",
    "headers": [
        ("Content-Type", "application/octet-stream"),
        ("Content-Length", "1024"),
        ("Date", "Sat, 05 Dec 2026 01:32:52 GMT"),
        ("Server", "Python/3.12 aiohttp/3.10"),
        ("ETag", '"5f3a-1024"'),
    ],
}


def _best(fn: Callable[[], object], number: int = 20000) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    req_json, resp_json = encode_json(REQUEST), encode_json(RESPONSE)
    req_bin, resp_bin = encode_open(REQUEST), encode_answer(RESPONSE)
    assert req_bin is not None and resp_bin is not None
    rows = [
        ("request head, JSON encode", lambda: encode_json(REQUEST)),
        (
            "request head, JSON decode + header_pairs",
            lambda: header_pairs(decode_json(req_json, "OPEN")["headers"]),
        ),
        ("request head, binary encode", lambda: encode_open(REQUEST)),
        (
            "request head, binary decode (+ header_pairs)",
            lambda: header_pairs(decode_open(req_bin)["headers"]),
        ),
        ("response head, JSON encode", lambda: encode_json(RESPONSE)),
        (
            "response head, JSON decode + header_pairs",
            lambda: header_pairs(decode_json(resp_json, "OPEN_OK")["headers"]),
        ),
        ("response head, binary encode", lambda: encode_answer(RESPONSE)),
        (
            "response head, binary decode (+ header_pairs)",
            lambda: header_pairs(decode_answer(resp_bin)["headers"]),
        ),
    ]
    print(
        f"request head: JSON {len(req_json)} B, binary {len(req_bin)} B; "
        f"response head: JSON {len(resp_json)} B, binary {len(resp_bin)} B"
    )
    for name, fn in rows:
        print(f"{name:48s} {_best(fn):6.2f} µs")


if __name__ == "__main__":
    main()
