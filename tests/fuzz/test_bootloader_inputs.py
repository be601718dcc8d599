"""Fuzz target: what the bootloader reads from outside before it trusts anything.

The provisioning SMS (any text a phone received), the migration file (INI or a Windows registry
export, UTF-8 or UTF-16, any bytes), the typed answer, ``--csc``/``--user``/``--fingerprint``,
the built-in preset, the JSON answers of the CSC and the portal (a hostile relay or network may
write them) and the package manifest. Checks: each parser returns a complete configuration or
raises its documented error (:class:`bootloader.errors.ConfigError` for configuration,
:class:`bootloader.errors.BootError` for answers and packages), nothing else; what it returns
obeys the invariants (alias xor host+port, a port in 1..65535, a 16-hex fingerprint); and the
largest accepted migration file is parsed within a stated memory bound.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from bootloader.client import Answer
from bootloader.config import (
    MAX_FILE_SIZE,
    Provisioning,
    parse_answer,
    parse_config_file,
    parse_csc_url,
    parse_sms,
    with_extras,
)
from bootloader.errors import BootError, ConfigError, Stage
from bootloader.package import parse_manifest
from bootloader.preset import parse_preset
from tests.fuzz.budget import KiB, fuzz, only, peak_memory

KEYWORDS = ["Alias:", "alias :", "Host:", "HOST:", "Port:", "User:", "Key:", "cdzprov", "CDZPROV"]
VALUES = [
    "acme@example.com",
    "a@b",
    "dmz.example.com",
    "[::1]:8443",
    "127.0.0.1",
    "8443",
    "0",
    "65536",
    "dword:000020fb",
    "0123456789abcdef",
    "0123-4567-89ab-cdef",
    "-",
    "@",
    "é",
]
words = st.sampled_from(KEYWORDS + VALUES) | st.text(max_size=12)
seps = st.sampled_from([" ", "\n", "\r\n", "\t", "", " : ", "\u00a0", "\u2028"])
sms_texts = st.lists(st.tuples(words, seps), max_size=14).map(
    lambda parts: "".join(w + s for w, s in parts)
)


def check_config(config: Provisioning) -> None:
    assert (config.alias is None) != (config.host is None)
    assert (config.host is None) == (config.port is None)
    if config.port is not None:
        assert 1 <= config.port <= 65535
    if config.fingerprint is not None:
        assert len(config.fingerprint) == 16 and int(config.fingerprint, 16) >= 0


def parsed_or_config_error(fn: Any, *args: Any) -> None:
    try:
        config = fn(*args)
    except ConfigError as exc:
        assert exc.stage is Stage.CONFIG and exc.message
        return
    check_config(config)


@fuzz(400)
@given(text=sms_texts | st.text(max_size=200))
@example("Alias: a@b cdzprov Key: " + "0" * 15 + "\u0660")
@example("Port: 99999999999999999999999999 Host: h cdzprov")
@example("Host: h Port: dword:" + "f" * 5000 + " cdzprov")
def test_sms(text: str) -> None:
    parsed_or_config_error(parse_sms, text)


@fuzz(200)
@given(text=st.text(max_size=80) | st.sampled_from(VALUES))
def test_typed_answer(text: str) -> None:
    parsed_or_config_error(parse_answer, text)


lines = (
    st.tuples(
        st.sampled_from(["Alias", "Host", "Port", "User", "Key", "alias", '"Alias"', "Other", ""]),
        st.sampled_from(["=", " = ", "", "=="]),
        st.sampled_from([*VALUES, '"x"', "'", '""']) | st.text(max_size=10),
    ).map("".join)
    | st.sampled_from(
        [
            "[Provisioning]",
            "[HKEY_CURRENT_USER\\Software\\X\\Provisioning]",
            "[Other]",
            "[",
            "]",
            "; c",
            "# c",
            "REGEDIT4",
            "Windows Registry Editor Version 5.00",
            "",
        ]
    )
    | st.text(max_size=20)
)
encodings = st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "latin-1"])


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fuzz-boot-") as name:
        yield Path(name)


@fuzz(300)
@given(
    text=st.lists(lines, max_size=10).map("\r\n".join),
    encoding=encodings,
    raw=st.none() | st.binary(max_size=200),
)
def test_migration_file(workdir: Path, text: str, encoding: str, raw: bytes | None) -> None:
    path = workdir / "migration.ini"
    if raw is None:
        try:
            raw = ("\ufeff" + text if encoding == "utf-16-le" else text).encode(encoding)
        except UnicodeEncodeError:
            raw = text.encode("utf-8", "surrogatepass")
    path.write_bytes(raw)
    parsed_or_config_error(parse_config_file, path)


def test_largest_migration_file_is_parsed_in_bounded_memory(workdir: Path) -> None:
    """64 KiB (the limit) of keys in a section that does not apply, then a valid section."""
    path = workdir / "large.ini"
    filler = "[Other]\n" + "Name = value\n" * ((MAX_FILE_SIZE - 200) // 13)
    path.write_text(filler + "[Provisioning]\nAlias = acme@example.com\n", encoding="utf-8")
    config, peak = peak_memory(lambda: parse_config_file(path))
    assert config.alias == "acme@example.com"
    assert peak < 40 * MAX_FILE_SIZE, peak  # lines of a 64 KiB file, each a small str
    path.write_bytes(b"Alias = a@b\n" + b"#" * MAX_FILE_SIZE)
    error, peak = peak_memory(lambda: only((ConfigError,), parse_config_file, path))
    assert isinstance(error, ConfigError) and "larger than" in error.message
    assert peak < 4 * MAX_FILE_SIZE, peak


@fuzz(200)
@given(
    csc=st.text(max_size=40)
    | st.sampled_from(
        ["https://csc.example", "http://[::1]:99999/x", "https://u@h", "http://h/p?q", "ftp://h"]
    ),
    user=st.none() | st.text(max_size=200),
    fingerprint=st.none() | st.text(max_size=30) | st.sampled_from(VALUES),
)
def test_flags(csc: str, user: str | None, fingerprint: str | None) -> None:
    only((ConfigError,), parse_csc_url, csc, "--csc")
    base = Provisioning(alias="acme@example.com", fingerprint="0123456789abcdef")
    try:
        config = with_extras(base, user=user, fingerprint=fingerprint)
    except ConfigError:
        return
    check_config(config)


json_texts = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
).map(lambda v: json.dumps(v).encode())
hostile_json = (
    json_texts
    | st.binary(max_size=60)
    | st.sampled_from([b"[" * 100_000, b'{"a":' * 50_000, b"1" * 5000, b"\xff\xfe{}"])
)


@fuzz(200)
@given(
    raw=hostile_json
    | st.dictionaries(st.sampled_from(["csc", "csc_key", "csc_ca", "x"]), st.text(max_size=50)).map(
        lambda d: json.dumps(d).encode()
    )
)
@example(b"[" * 100_000)
def test_preset(raw: bytes) -> None:
    only((ConfigError,), parse_preset, raw)


class _FakeResponse:
    """Just what :class:`bootloader.client.Answer` reads of an ``HTTPResponse``."""

    status = 200
    reason = "OK"
    headers: dict[str, str] = {}  # noqa: RUF012 (never mutated)

    def __init__(self, body: bytes) -> None:
        self._body = body
        self._pos = 0

    def getheader(self, name: str) -> str | None:
        return None

    def read(self, size: int) -> bytes:
        data = self._body[self._pos : self._pos + size]
        self._pos += len(data)
        return data

    def close(self) -> None:
        pass


@fuzz(200)
@given(body=hostile_json)
@example(b"[" * 100_000)
def test_json_answers_of_the_csc_and_portal(body: bytes) -> None:
    answer = Answer(Stage.RESOLVE, _FakeResponse(body), _FakeResponse(body))  # type: ignore[arg-type]
    only((BootError,), answer.json, "the CSC")
    answer = Answer(Stage.LOGON, _FakeResponse(body), _FakeResponse(body))  # type: ignore[arg-type]
    code, message = answer.error_body()
    assert isinstance(code, str) and isinstance(message, str)


@fuzz(200)
@given(raw=hostile_json)
@example(b"[" * 100_000)
def test_manifest(raw: bytes) -> None:
    only((BootError,), parse_manifest, raw, bytes(64))


def test_hostile_json_answer_is_read_in_bounded_memory() -> None:
    """An answer far larger than MAX_JSON: only MAX_JSON + 1 bytes are ever read."""
    from bootloader.client import MAX_JSON

    body = b'{"a":"' + b"x" * (8 * MAX_JSON) + b'"}'
    answer = Answer(Stage.RESOLVE, _FakeResponse(body), _FakeResponse(body))  # type: ignore[arg-type]
    error, peak = peak_memory(lambda: only((BootError,), answer.json, "the CSC"))
    assert isinstance(error, BootError) and "larger than" in error.message
    assert peak < 3 * MAX_JSON + 64 * KiB, peak
