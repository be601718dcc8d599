"""HTTP byte ranges for package downloads (RFC 9110 §14), as pure functions.

Only a single range is honoured: ``bytes=N-``, ``bytes=N-M`` or ``bytes=-S``. A header that is
absent, not in ``bytes``, malformed or asks for several ranges is ignored (the whole file is
sent, which RFC 9110 allows). A well-formed range that starts at or beyond the end raises
:class:`RangeNotSatisfiable` (416). ``If-Range`` is compared strongly with the ETag: if it does
not match (or is a date, since packages carry no ``Last-Modified``), the range is ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SPEC = re.compile(r"(\d*)-(\d*)")
_MAX_DIGITS = 19


class RangeNotSatisfiable(Exception):
    """The requested range lies beyond the end of the file."""


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The range to send for ``Range: header`` on a file of ``size`` bytes; None means all."""
    if header is None:
        return None
    unit, sep, spec = header.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    match = _SPEC.fullmatch(spec.strip())
    if match is None:
        return None
    first, last = match.groups()
    if len(first) > _MAX_DIGITS or len(last) > _MAX_DIGITS or not (first or last):
        return None
    if not first:  # suffix: the last S bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable
        return ByteRange(max(0, size - suffix), size - 1)
    start = int(first)
    if last and int(last) < start:
        return None  # invalid: ignored
    if start >= size:
        raise RangeNotSatisfiable
    end = min(int(last), size - 1) if last else size - 1
    return ByteRange(start, end)


def if_range_allows(header: str | None, etag: str) -> bool:
    """Whether a ``Range`` may be honoured given ``If-Range: header`` (None: no If-Range)."""
    if header is None:
        return True
    return header.strip() == etag and not etag.startswith("W/")
