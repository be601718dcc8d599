"""Bootloader configuration: the SMS parser (examples and properties), flags, migration files,
and the command line's configuration errors (exit 2, before anything is contacted)."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from bootloader.config import (
    Provisioning,
    build,
    normalise_fingerprint,
    parse_answer,
    parse_config_file,
    parse_csc_url,
    parse_sms,
    with_extras,
)
from bootloader.errors import ConfigError
from tests.support.packages import TtyInput, run_bootloader

FP = "3f2a9c4177d012be"

# --- SMS: examples -----------------------------------------------------------------------------


def test_sms_with_alias_and_key_from_the_contract() -> None:
    sms = (
        f"Get the client: http://portal.example/get/ then Alias: acme@example.com cdzprov Key: {FP}"
    )
    assert parse_sms(sms) == Provisioning(alias="acme@example.com", fingerprint=FP)


def test_sms_with_host_port_and_user() -> None:
    sms = (
        "Get the client: http://portal.example/get/ then User: alice "
        f"Host: dmz.example.com Port: 8443 cdzprov Key: {FP}"
    )
    assert parse_sms(sms) == Provisioning(
        host="dmz.example.com", port=8443, user="alice", fingerprint=FP
    )


def test_sms_tolerates_line_breaks_spaces_and_case() -> None:
    sms = "get it at http://x.example/get\r\n  ALIAS :\n  Acme@Example.COM\n\nCDZPROV\nkey:3F2A-9C41-77D0-12BE\n"
    assert parse_sms(sms) == Provisioning(alias="acme@example.com", fingerprint=FP)


def test_sms_without_key_has_no_fingerprint() -> None:
    assert parse_sms("Alias: acme cdzprov").fingerprint is None


def test_sms_host_with_port_in_one_value() -> None:
    config = parse_sms("Host: 10.0.0.5:8443 cdzprov")
    assert (config.host, config.port) == ("10.0.0.5", 8443)


def test_sms_user_may_hold_spaces() -> None:
    assert parse_sms("User: Alice  Smith Alias: acme cdzprov").user == "Alice Smith"


@pytest.mark.parametrize(
    ("sms", "fragment"),
    [
        ("Alias: acme@example.com Host: h.example Port: 1 cdzprov", "both Alias and Host"),
        ("Hello there cdzprov Key: " + FP, "neither Alias nor Host"),
        ("Alias: acme@example.com", "holds no configuration"),
        ("Host: h.example cdzprov", "Host is set without Port"),
        ("Port: 8443 cdzprov", "Port is set without Host"),
        ("Host: h.example Port: 99999 cdzprov", "expected a number 1-65535"),
        ("Host: bad_host! Port: 80 cdzprov", "expected a host name or an IP address"),
        ("Alias: acme example cdzprov", "expected one word"),
        ("Alias: cdzprov", "has no value"),
        ("Alias: a@b.example cdzprov Key: 12345", "16 hex digits"),
        ("Alias: a@b.example cdzprov Key: 3f2a9c4177d012be77", "16 hex digits"),
        ("Alias: a cdzprov cdzprov", "more than once"),
        ("Alias: a Alias: b cdzprov", "appears more than once"),
        ("Alias: -bad- cdzprov", "the Alias in the SMS is wrong"),
        (f"Key: 0000000000000000 Alias: a cdzprov Key: {FP}", "two different Key"),
    ],
)
def test_sms_errors_say_what_is_wrong(sms: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_sms(sms)
    assert fragment in info.value.message
    assert info.value.line().startswith("config: ")


# --- SMS: properties -------------------------------------------------------------------------

_FORBIDDEN = re.compile(r"(alias|host|port|user|key)\s*:|cdzprov", re.IGNORECASE)
_SEPARATORS = st.sampled_from([" ", "  ", "\n", "\r\n", "\t", " \n  "])
_LABEL = r"[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?"
_ALIASES = st.from_regex(
    rf"[a-z0-9]([a-z0-9._+-]{{0,8}}[a-z0-9])?(@{_LABEL}(\.{_LABEL}){{1,3}})?", fullmatch=True
)
_HOSTNAMES = st.from_regex(rf"{_LABEL}(\.{_LABEL}){{0,3}}", fullmatch=True)
_HOSTS = st.one_of(_HOSTNAMES, st.ip_addresses().map(str))
_FINGERPRINTS = st.text("0123456789abcdefABCDEF", min_size=16, max_size=16)
_USERS = st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True)
_FREE_TEXT = st.text(max_size=60).filter(lambda t: _FORBIDDEN.search(t) is None)


@st.composite
def _keyword(draw: st.DrawFn, word: str) -> str:
    cased = "".join(ch.upper() if draw(st.booleans()) else ch for ch in word)
    return cased + draw(st.sampled_from([":", " :", "\t:"]))


def _mixed_case(draw: st.DrawFn, text: str) -> str:
    return "".join(ch.upper() if draw(st.booleans()) else ch for ch in text)


@st.composite
def _sms(draw: st.DrawFn) -> tuple[str, Provisioning]:
    parts = [draw(_FREE_TEXT)]
    user = draw(st.none() | _USERS)
    assume(user is None or "cdzprov" not in user.lower())
    if user is not None:
        parts += [draw(_keyword("user")), user]
    if draw(st.booleans()):
        alias = draw(_ALIASES)
        assume("cdzprov" not in alias)
        parts += [draw(_keyword("alias")), _mixed_case(draw, alias)]
        expected = Provisioning(alias=alias)
    else:
        host, port = draw(_HOSTS), draw(st.integers(1, 65535))
        assume("cdzprov" not in host)
        parts += [draw(_keyword("host")), host, draw(_keyword("port")), str(port)]
        try:
            canonical = str(ipaddress.ip_address(host))
        except ValueError:
            canonical = host
        expected = Provisioning(host=canonical, port=port)
    parts.append(_mixed_case(draw, "cdzprov"))
    fp = draw(st.none() | _FINGERPRINTS)
    if fp is not None:
        parts += [draw(_keyword("key")), fp]
    parts.append(draw(st.text(max_size=40).filter(lambda t: "cdzprov" not in t.lower())))
    text = parts[0] + "".join(draw(_SEPARATORS) + part for part in parts[1:])
    return text, Provisioning(
        alias=expected.alias,
        host=expected.host,
        port=expected.port,
        user=user,
        fingerprint=fp.lower() if fp else None,
    )


@settings(max_examples=300, deadline=None)
@given(_sms())
def test_sms_round_trips_whatever_surrounds_it(case: tuple[str, Provisioning]) -> None:
    text, expected = case
    try:
        expected_alias = expected.alias
        assert parse_sms(text) == expected, text
    except ConfigError as exc:  # only a generated alias the product rejects may fail
        assert expected_alias is not None, (text, exc.message)
        assert "the Alias in the SMS is wrong" in exc.message


_TOKENS = st.sampled_from(
    [
        "Alias:",
        "Host:",
        "Port:",
        "User:",
        "Key:",
        "cdzprov",
        "acme@example.com",
        "8443",
        "::1",
        "[",
        "]",
        " ",
        "\n",
        ":",
        "-",
        "0",
        FP,
        "x" * 300,
        "é",
        "\x00",
        "Host :",
        "dword:1f",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=200), st.lists(_TOKENS, max_size=25).map("".join)))
@example("Alias: cdzprov Key:")
@example("Host: [::1 Port: 1 cdzprov")
def test_sms_garbage_raises_only_config_errors(text: str) -> None:
    try:
        result = parse_sms(text)
    except ConfigError as exc:
        assert exc.message and "\n" not in exc.line()
        return
    assert (result.alias is None) != (result.host is None)


# --- flags and answers ---------------------------------------------------------------------


def test_flags_host_and_port() -> None:
    names = ("--alias", "--host", "--port")
    config = build("the options", alias=None, host="DMZ.Example.com", port="8443", names=names)
    assert (config.host, config.port) == ("dmz.example.com", 8443)


@pytest.mark.parametrize(
    ("alias", "host", "port", "fragment"),
    [
        ("a@b.example", "h", "1", "both --alias and --host"),
        ("a@b.example", None, "1", "both --alias and --port"),
        (None, None, None, "neither --alias nor --host"),
        (None, "h.example", None, "--host is set without --port"),
        (None, None, "80", "--port is set without --host"),
        (None, "h.example", "0", "expected a number 1-65535"),
    ],
)
def test_flag_conflicts(
    alias: str | None, host: str | None, port: str | None, fragment: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        build(
            "the options", alias=alias, host=host, port=port, names=("--alias", "--host", "--port")
        )


def test_answers_typed_at_the_prompt() -> None:
    assert parse_answer(" Acme@Example.com ").alias == "acme@example.com"
    assert parse_answer("acme").alias == "acme"
    assert parse_answer("proxy.example:8443") == Provisioning(host="proxy.example", port=8443)
    assert parse_answer("[::1]:80") == Provisioning(host="::1", port=80)
    with pytest.raises(ConfigError):
        parse_answer("proxy.example:")


def test_extras_user_wins_and_fingerprints_must_agree() -> None:
    base = Provisioning(alias="a", user="bob", fingerprint=FP)
    assert with_extras(base, user="carol", fingerprint=FP.upper()).user == "carol"
    with pytest.raises(ConfigError, match="disagrees"):
        with_extras(base, user=None, fingerprint="0" * 16)


def test_fingerprint_and_csc_url_normalisation() -> None:
    assert normalise_fingerprint("3F2A 9C41-77D0 12BE", "x") == FP
    assert parse_csc_url("https://csc.example.com/", "x") == "https://csc.example.com"
    assert parse_csc_url("http://127.0.0.1:8080/prefix/", "x") == "http://127.0.0.1:8080/prefix"
    for bad in ("ftp://x", "https://", "https://u:p@h", "https://h:99999", "https://h/?q=1"):
        with pytest.raises(ConfigError):
            parse_csc_url(bad, "x")


# --- migration files -------------------------------------------------------------------------


def _file(tmp_path: Path, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / "provisioning.ini"
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.parametrize(
    "text",
    [
        "[Provisioning]\nAlias = acme@example.com\n",
        "alias=acme@example.com\n",
        "; migrated\n[PROVISIONING]\nALIAS = 'Acme@Example.com'\nHost =\nPort =\n",
        '[Other]\nHost = x.example\n[provisioning]\nalias = "acme@example.com"\n',
    ],
)
def test_file_with_alias(tmp_path: Path, text: str) -> None:
    assert parse_config_file(_file(tmp_path, text)).alias == "acme@example.com"


def test_file_with_host_and_port(tmp_path: Path) -> None:
    config = parse_config_file(_file(tmp_path, "HOST = dmz.example.com\nport=8443\n"))
    assert (config.host, config.port) == ("dmz.example.com", 8443)


def test_registry_export_in_utf16(tmp_path: Path) -> None:
    text = (
        "\ufeffWindows Registry Editor Version 5.00\r\n\r\n"
        "[HKEY_CURRENT_USER\\Software\\CommonTime\\Cadenza\\Provisioning]\r\n"
        '"Alias"=""\r\n"Host"="dmz.example.com"\r\n"Port"=dword:000020fb\r\n'
    )
    config = parse_config_file(_file(tmp_path, text, "utf-16-le"))
    assert (config.alias, config.host, config.port) == (None, "dmz.example.com", 8443)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("Alias = a@b.example\nHost = h\nPort = 1\n", "both Alias and Host are set in {file}"),
        ("[Provisioning]\n# nothing\n", "neither Alias nor Host is set in {file}"),
        ("Alias = a@b.example\nColour = blue\n", "{file}: line 2: unknown key 'colour'"),
        ("Alias = a@b.example\nalias = c@d.example\n", "line 2: Alias is set twice"),
        ("Alias a@b.example\n", "line 1: expected 'Name = value'"),
        ("Host = h.example\n", "Host is set without Port in {file}"),
    ],
)
def test_file_errors_name_the_file(tmp_path: Path, text: str, fragment: str) -> None:
    path = _file(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        parse_config_file(path)
    assert fragment.format(file=path) in info.value.message


def test_file_unreadable_or_not_text(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        parse_config_file(tmp_path / "missing.ini")
    with pytest.raises(ConfigError, match="not UTF-8"):
        parse_config_file(_bytes(tmp_path, b"\xc3\x28=\xff"))
    with pytest.raises(ConfigError, match="larger than"):
        parse_config_file(_bytes(tmp_path, b"#" * (70 * 1024)))


def _bytes(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "raw.ini"
    path.write_bytes(data)
    return path


# --- the command line's configuration errors ---------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--sms", "Alias: a cdzprov", "--alias", "a"], "give the configuration one way"),
        (["--alias", "a", "--tls"], "--tls applies to a Host/Port configuration"),
        (["--host", "h.example", "--port", "1", "--csc", "http://x"], "--csc applies to an alias"),
        ([], "no configuration"),
        (["--alias", "a", "--timeout", "soon"], "--timeout must be"),
        (["--alias", "a", "--csc", "ftp://x"], "the CSC URL in --csc"),
        (["--alias", "a"], "no user name"),
        (["--alias", "a", "--user", "bob"], "no password"),
        (["--alias", "a", "--user", "bob", "--password", "p", "--device-id", ""], "--device-id"),
        (["--sms", "-"], "holds no configuration"),
    ],
)
def test_cli_configuration_errors_exit_2(tmp_path: Path, argv: list[str], fragment: str) -> None:
    result = run_bootloader([*argv, "--target", str(tmp_path / "t")])
    assert result.code == 2, result.err
    assert "csc-bootloader: config: " in result.err
    assert fragment in result.err
    assert result.out == ""
    assert "Traceback" not in result.err


def test_cli_environment_csc_is_checked(tmp_path: Path) -> None:
    result = run_bootloader(
        ["--alias", "a", "--target", str(tmp_path)], env={"CSC_BOOTLOADER_CSC": "nonsense"}
    )
    assert result.code == 2 and "CSC_BOOTLOADER_CSC" in result.err


def test_cli_prompt_gives_up_after_three_bad_answers(tmp_path: Path) -> None:
    answers = TtyInput("not an alias!\n-\n::\n")
    result = run_bootloader(["--target", str(tmp_path)], stdin=answers)
    assert result.code == 2
    assert result.err.count("Alias (or host:port): ") == 3


def test_cli_prompt_end_of_input(tmp_path: Path) -> None:
    result = run_bootloader(["--target", str(tmp_path)], stdin=TtyInput(""))
    assert result.code == 2 and "end of input" in result.err


def test_cli_help_shows_exit_codes_and_usage_errors_exit_2() -> None:
    shown = run_bootloader(["--help"])
    assert shown.code == 0
    for line in (
        "2  config",
        "3  resolve",
        "4  connect",
        "5  logon",
        "6  download",
        "7  verify",
        "8  install",
    ):
        assert line in shown.out
    wrong = run_bootloader(["--no-such-flag"])
    assert wrong.code == 2 and "unrecognized arguments" in wrong.err
