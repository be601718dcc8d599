"""The value parsers of shared/config: durations, sizes and host:port strings."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.config import parse_duration, parse_hostport, parse_size

# --- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 30.0),
        ("0.5", 0.5),
        ("0", 0.0),
        ("30s", 30.0),
        ("250ms", 0.25),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("30d", 30 * 86400.0),
        ("1w", 7 * 86400.0),
        ("1h30m", 5400.0),
        ("1m 30s", 90.0),
        ("1.5s", 1.5),
        (" 10S ", 10.0),
        ("3 min", 180.0),
        ("2sec", 2.0),
    ],
)
def test_parse_duration_accepts(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "s",
        "-5s",
        "5x",
        "1.2.3s",
        "nan",
        "inf",
        "1e400",
        "5s5",
        "ms",
        "1h 1h garbage",
        "+5",
    ],
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_parse_duration_accepts_plain_numbers() -> None:
    assert parse_duration(12) == 12.0
    assert parse_duration(2.5) == 2.5


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), True])
def test_parse_duration_rejects_bad_numbers(value: float) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@given(st.integers(0, 10**6), st.sampled_from(sorted(_UNITS)))
def test_parse_duration_unit_round_trip(n: int, unit: str) -> None:
    assert parse_duration(f"{n}{unit}") == pytest.approx(n * _UNITS[unit])


@given(st.lists(st.tuples(st.integers(0, 999), st.sampled_from(sorted(_UNITS))), min_size=1))
def test_parse_duration_compound_is_a_sum(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{n}{u}" for n, u in parts)
    assert parse_duration(text) == pytest.approx(sum(n * _UNITS[u] for n, u in parts))


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False))
def test_parse_duration_plain_float_text(x: float) -> None:
    assert parse_duration(repr(x)) == pytest.approx(x)


@given(st.text(max_size=20))
def test_parse_duration_never_crashes(text: str) -> None:
    try:
        result = parse_duration(text)
    except ValueError:
        return
    assert math.isfinite(result) and result >= 0


# --- sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("1024", 1024),
        ("256KiB", 256 * 1024),
        ("64MiB", 64 * 1024**2),
        ("1GiB", 1024**3),
        ("2TiB", 2 * 1024**4),
        ("16 KiB", 16 * 1024),
        ("10B", 10),
        ("1kB", 1000),
        ("1KB", 1000),
        ("5MB", 5_000_000),
        ("2GB", 2_000_000_000),
        ("256k", 256 * 1024),
        ("64M", 64 * 1024**2),
        ("1g", 1024**3),
        ("1.5MiB", 1536 * 1024),
        ("64mib", 64 * 1024**2),
    ],
)
def test_parse_size_accepts(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text", ["", "KiB", "-1", "1.5", "0.3KiB", "12 parsecs", "1KiB2", "nan", "1e3", "+4", "1_000"]
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_size_rejects_thousands_of_digits_with_its_own_message() -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size("1" * 5000 + "KiB")


def test_parse_size_accepts_plain_ints_and_rejects_others() -> None:
    assert parse_size(4096) == 4096
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            parse_size(bad)  # type: ignore[arg-type]


_SIZE_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "kB": 1000, "MB": 10**6}


@given(st.integers(0, 10**9), st.sampled_from(sorted(_SIZE_UNITS)))
def test_parse_size_round_trip(n: int, unit: str) -> None:
    assert parse_size(f"{n}{unit}") == n * _SIZE_UNITS[unit]
    assert parse_size(str(n)) == n


@given(st.text(max_size=20))
def test_parse_size_never_crashes(text: str) -> None:
    try:
        result = parse_size(text)
    except ValueError:
        return
    assert isinstance(result, int) and result >= 0


# --- host:port ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("csc.example.com:443", ("csc.example.com", 443)),
        ("[::1]:8081", ("::1", 8081)),
        ("[::]:80", ("::", 80)),
        ("[fe80::1]:1", ("fe80::1", 1)),
        (" host_a:1 ", ("host_a", 1)),
    ],
)
def test_parse_hostport_accepts(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "8080",
        ":8080",
        "host:",
        "host:65536",
        "host:-1",
        "host:+80",
        "host:http",
        "::1:80",
        "[::1]",
        "[::1]80",
        "[nothost]:80",
        "[]:80",
        "ho st:80",
        "host:8080:1",
        "host:123456",
        "http://host:80",
    ],
)
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(text)


_HOSTS = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True)


@given(_HOSTS, st.integers(0, 65535))
def test_parse_hostport_round_trip(host: str, port: int) -> None:
    assert parse_hostport(f"{host}:{port}") == (host, port)


@given(st.ip_addresses(v=6), st.integers(0, 65535))
def test_parse_hostport_ipv6_round_trip(addr: object, port: int) -> None:
    assert parse_hostport(f"[{addr}]:{port}") == (str(addr), port)


@given(st.integers().filter(lambda p: not 0 <= p <= 65535))
def test_parse_hostport_port_range(port: int) -> None:
    with pytest.raises(ValueError):
        parse_hostport(f"host:{port}")


@given(st.text(max_size=30))
def test_parse_hostport_never_crashes(text: str) -> None:
    try:
        host, port = parse_hostport(text)
    except ValueError:
        return
    assert host and 0 <= port <= 65535
