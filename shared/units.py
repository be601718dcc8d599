"""Parsers for the value syntaxes of configuration: durations, sizes, host:port and URLs.

Pure functions: text (or a number from TOML) in, a value out, or ``ValueError`` with a message
that quotes the input and shows the expected syntax. They never return a negative, NaN or
infinite number, and never raise anything but ``ValueError`` for bad input.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Collection
from urllib.parse import urlsplit

__all__ = ["PLAIN_NUMBER", "check_url", "parse_duration", "parse_hostport", "parse_size"]

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_DURATION_UNITS: dict[str, float] = {
    **dict.fromkeys(("ms", "msec", "msecs", "millisecond", "milliseconds"), 0.001),
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
    **dict.fromkeys(("w", "week", "weeks"), 604800.0),
}
_DURATION_PART = re.compile(rf"\s*({_NUMBER})\s*([a-z]+)")
PLAIN_NUMBER = re.compile(_NUMBER)


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a {what}, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"expected a non-negative finite {what}, got {value!r}")
    return number


def parse_duration(value: str | float) -> float:
    """Seconds from ``"250ms"``, ``"30s"``, ``"5m"``, ``"2h"``, ``"30d"``, ``"1h30m"`` or a number."""
    if not isinstance(value, str):
        return _number(value, "duration")
    text = value.strip().lower()
    if PLAIN_NUMBER.fullmatch(text):
        return _number(float(text), "duration")
    total, pos = 0.0, 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None or match.group(2) not in _DURATION_UNITS:
            raise ValueError(
                f"{value!r} is not a duration (expected e.g. 250ms, 30s, 5m, 2h, 30d or seconds)"
            )
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos == 0:
        raise ValueError(f"{value!r} is not a duration (expected e.g. 30s, 5m or seconds)")
    return _number(total, "duration")


_SIZE_UNITS: dict[str, int] = {
    "b": 1,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}
#: at most 30 digits each side of the point: more is no size (and int() refuses > 4300 digits)
_SIZE = re.compile(r"(\d{1,30}(?:\.\d{1,30})?)\s*([a-z]*)")


def parse_size(value: str | int) -> int:
    """Bytes from ``"256KiB"``, ``"64MiB"``, ``"256k"`` (binary), ``"5MB"`` (decimal) or an int."""
    if not isinstance(value, str):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"expected a non-negative whole number of bytes, got {value!r}")
        return value
    match = _SIZE.fullmatch(value.strip().lower())
    if match is None or match.group(2) not in {"", *_SIZE_UNITS}:
        raise ValueError(f"{value!r} is not a size (expected e.g. 65536, 256KiB, 64MiB, 1GiB)")
    number, unit = match.groups()
    if not unit and "." in number:
        raise ValueError(f"{value!r} is not a whole number of bytes")
    from fractions import Fraction  # with decimal: 0.2 MiB, only for a size written out

    exact = Fraction(number) * _SIZE_UNITS.get(unit, 1)
    if exact.denominator != 1:
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return exact.numerator


_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?")
_PORT = re.compile(r"\d{1,5}")


def parse_hostport(value: str) -> tuple[str, int]:
    """``(host, port)`` from ``"HOST:PORT"`` or ``"[IPv6]:PORT"``; the port must be 0..65535."""
    text = value.strip() if isinstance(value, str) else ""
    hint = "expected HOST:PORT or [IPv6]:PORT"
    if text.startswith("["):
        addr, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{value!r} is not a host:port ({hint})")
        try:
            ipaddress.IPv6Address(addr)
        except ValueError:
            raise ValueError(f"{value!r}: {addr!r} is not an IPv6 address") from None
        host = addr
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{value!r} is not a host:port ({hint})")
        if _HOSTNAME.fullmatch(host) is None:
            raise ValueError(f"{value!r}: {host!r} is not a host name or IPv4 address ({hint})")
    if _PORT.fullmatch(port_text) is None or int(port_text) > 65535:
        raise ValueError(f"{value!r}: the port must be a number from 0 to 65535")
    return host, int(port_text)


def check_url(value: str, schemes: Collection[str]) -> str:
    """Return ``value`` if it is an absolute URL with one of ``schemes`` and a host."""
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a valid URL: {exc}") from None
    wanted = "/".join(sorted(schemes))
    if parts.scheme.lower() not in schemes:
        raise ValueError(f"{value!r} must be a URL with scheme {wanted}")
    if not parts.hostname:
        raise ValueError(f"{value!r} has no host")
    if port is not None and not 0 < port <= 65535:
        raise ValueError(f"{value!r}: the port must be a number from 1 to 65535")
    return value
