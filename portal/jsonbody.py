"""Bounded JSON request bodies: size and nesting depth are checked before anything is decoded.

:func:`parse_json_body` is the only way the portal turns a request body into JSON. Invariants:

* a body longer than ``max_bytes`` is refused without being decoded;
* nesting deeper than ``max_depth`` arrays/objects is refused before :func:`json.loads` runs, by
  a scan that skips string literals, so a hostile ``[[[[…`` can never reach the decoder's
  recursion (a ``RecursionError`` would otherwise become a 500);
* every refusal is a :class:`BadJson` whose message is one sentence fit for the client (the
  server answers 400 ``bad_request``); nothing from the body is echoed back.
"""

from __future__ import annotations

import json
import re
from typing import Any

#: A complete JSON string literal (escapes included); removed before counting brackets.
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


class BadJson(ValueError):
    """The body is not acceptable JSON (message fit for the client)."""


def nesting_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in ``raw`` (0 for a scalar).

    Brackets inside complete string literals do not count; an unterminated string counts its
    brackets, which can only overstate the depth of a body the decoder refuses anyway."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub(b'""', raw)):
        if match.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def parse_json_body(raw: bytes, *, max_bytes: int, max_depth: int) -> Any:
    """Decode ``raw`` (UTF-8 JSON) within the bounds; raises :class:`BadJson`."""
    if len(raw) > max_bytes:
        raise BadJson(f"the request body is larger than {max_bytes} bytes")
    if nesting_depth(raw) > max_depth:
        raise BadJson(f"the JSON body is nested deeper than {max_depth} levels")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadJson("the body must be a JSON object") from None


def check_text(value: str, name: str, *, printable: bool) -> str:
    """``value`` if it is valid Unicode (no lone surrogates) and, when ``printable``, has no
    control characters; else :class:`BadJson` naming the field."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadJson(f"the field {name!r} is not valid Unicode") from None
    if printable and not value.isprintable():
        raise BadJson(f"the field {name!r} has control characters")
    if "\x00" in value:
        raise BadJson(f"the field {name!r} has a NUL character")
    return value
