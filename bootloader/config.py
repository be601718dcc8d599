"""Where the portal is: parse a provisioning SMS, a migration file, flags or a typed answer.

A configuration (:class:`Provisioning`) names the portal by an *alias* (resolved at the CSC) **or**
by the *host and port* of a local/DMZ proxy, never both, and may carry the user name and the
portal key's fingerprint. Every parser here either returns a complete, validated configuration or
raises :class:`~bootloader.errors.ConfigError` saying what is wrong and where; nothing else
escapes, whatever the input (the SMS parser is property-tested for that).

The SMS format is docs/provisioning.md "The provisioning SMS": the configuration is what stands
between ``Alias:`` (or ``Host:``/``Port:``) and the word ``cdzprov``; ``User:`` may come before it
and ``Key:`` (16 hex digits) after it. Keywords are case-insensitive, must start the text or follow
whitespace, and may have spaces before their colon; values may be separated by line breaks.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass, replace
from pathlib import Path

from bootloader.errors import ConfigError
from shared.aliases import normalise_alias
from shared.errors import BadAlias

MAX_USER_LENGTH = 128
MAX_FILE_SIZE = 64 * 1024
DEFAULT_CSC = "https://csc.example.com"

_KEYWORD_RE = re.compile(r"(?<!\S)(alias|host|port|user|key)[ \t]*:", re.IGNORECASE)
_MARKER_RE = re.compile(r"(?<!\S)cdzprov(?![0-9A-Za-z])", re.IGNORECASE)
_KEY_AFTER_RE = re.compile(r"(?<!\S)key[ \t]*:", re.IGNORECASE)
_FINGERPRINT_RE = re.compile(r"\s*((?:[0-9a-fA-F][\s-]*){15}[0-9a-fA-F])(?![0-9A-Za-z])")
_HEX16_RE = re.compile(r"[0-9a-f]{16}")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


@dataclass(frozen=True, slots=True)
class Provisioning:
    """A validated configuration: ``alias`` xor (``host`` and ``port``); optional extras."""

    alias: str | None = None
    host: str | None = None
    port: int | None = None
    user: str | None = None
    fingerprint: str | None = None

    def describe(self) -> str:
        if self.alias is not None:
            return f"alias {self.alias}"
        return f"proxy {format_hostport(self.host or '', self.port or 0)}"


# --- single values ---------------------------------------------------------------------------


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_alias(raw: str, where: str) -> str:
    try:
        return normalise_alias(raw)
    except BadAlias as exc:
        raise ConfigError(f"the Alias in {where} is wrong: {exc.message}") from None


def parse_host(raw: str, where: str) -> str:
    """A host name, an IPv4 address or an IPv6 address (brackets optional), normalised."""
    text = raw.strip()
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    host = text.lower()
    if not host:
        raise ConfigError(f"the Host in {where} is empty")
    if len(host) > 253 or not host.isascii() or _HOSTNAME_RE.fullmatch(host) is None:
        raise ConfigError(
            f"the Host in {where} is {_show(raw)}: expected a host name or an IP address"
        )
    return host


def parse_port(raw: str, where: str) -> int:
    text = raw.strip()
    if text.lower().startswith("dword:"):  # a registry export: hexadecimal
        digits, base = text[6:].strip(), 16
    else:
        digits, base = text, 10
    try:
        port = int(digits, base) if digits.isascii() and digits.isalnum() else -1
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise ConfigError(f"the Port in {where} is {_show(raw)}: expected a number 1-65535")
    return port


def parse_user(raw: str, where: str) -> str:
    user = " ".join(raw.split())
    if not user:
        raise ConfigError(f"the User in {where} is empty")
    if len(user) > MAX_USER_LENGTH or not user.isprintable():
        raise ConfigError(
            f"the User in {where} is not a user name (printable, at most {MAX_USER_LENGTH} "
            "characters)"
        )
    return user


def normalise_fingerprint(raw: str, where: str) -> str:
    """16 lowercase hex digits; ``-`` and spaces are ignored (docs/provisioning.md)."""
    text = "".join(ch for ch in raw if ch not in "- \t\r\n").lower()
    if _HEX16_RE.fullmatch(text) is None:
        raise ConfigError(f"the key fingerprint in {where} is {_show(raw)}: expected 16 hex digits")
    return text


def parse_csc_url(raw: str, where: str) -> str:
    """An ``http(s)://host[:port][/prefix]`` URL without trailing slash."""
    try:
        parts: urllib.parse.SplitResult | None = urllib.parse.urlsplit(raw.strip())
        _ = parts.port if parts is not None else None  # raises on a bad port
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.query
        or parts.fragment
    ):
        raise ConfigError(f"the CSC URL in {where} is {_show(raw)}: expected https://host[:port]")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _show(raw: str) -> str:
    text = raw if len(raw) <= 80 else raw[:79] + "…"
    return repr(text)


# --- whole configurations --------------------------------------------------------------------


def build(
    where: str,
    *,
    alias: str | None,
    host: str | None,
    port: str | None,
    user: str | None = None,
    fingerprint: str | None = None,
    names: tuple[str, str, str] = ("Alias", "Host", "Port"),
) -> Provisioning:
    """Validate raw texts (``None`` or blank: not set) into a :class:`Provisioning`."""
    alias, host, port = (v if v is not None and v.strip() else None for v in (alias, host, port))
    a, h, p = names
    if alias is not None and (host is not None or port is not None):
        other = h if host is not None else p
        raise ConfigError(
            f"both {a} and {other} are set in {where}; a configuration has one or the other"
        )
    if alias is None and host is None and port is None:
        raise ConfigError(f"neither {a} nor {h} is set in {where}; a configuration needs one")
    if host is not None and port is None:
        host, port = _split_host_port(host, where, names)
    if host is None and port is not None:
        raise ConfigError(f"{p} is set without {h} in {where}")
    return Provisioning(
        alias=parse_alias(alias, where) if alias is not None else None,
        host=parse_host(host, where) if host is not None else None,
        port=parse_port(port, where) if port is not None else None,
        user=parse_user(user, where) if user is not None and user.strip() else None,
        fingerprint=(
            normalise_fingerprint(fingerprint, where)
            if fingerprint is not None and fingerprint.strip()
            else None
        ),
    )


def _split_host_port(text: str, where: str, names: tuple[str, str, str]) -> tuple[str, str]:
    """``host:port`` (or ``[v6]:port``) given as the host alone; a bare host lacks its port."""
    stripped = text.strip()
    host, sep, port = stripped.rpartition(":")
    if sep and port.isdigit() and (host.startswith("[") or ":" not in host):
        return host, port
    raise ConfigError(f"{names[1]} is set without {names[2]} in {where}")


def parse_sms(text: str) -> Provisioning:
    """The configuration in a provisioning SMS (see the module docstring)."""
    where = "the SMS"
    markers = list(_MARKER_RE.finditer(text))
    if not markers:
        raise ConfigError(
            "the SMS holds no configuration: expected 'Alias: … cdzprov' or "
            "'Host: … Port: … cdzprov'"
        )
    if len(markers) > 1:
        raise ConfigError("the SMS holds 'cdzprov' more than once; give one provisioning message")
    marker = markers[0]
    values = _keyword_values(text[: marker.start()], where)
    after = _fingerprint_after(text[marker.end() :])
    if after is not None:
        before = values.get("key")
        if before is not None and normalise_fingerprint(before, where) != after:
            raise ConfigError("the SMS holds two different Key: values")
        values["key"] = after
    return build(
        where,
        alias=_required_value(values, "alias"),
        host=_required_value(values, "host"),
        port=_required_value(values, "port"),
        user=_required_value(values, "user"),
        fingerprint=values.get("key"),
    )


def _keyword_values(segment: str, where: str) -> dict[str, str]:
    found = list(_KEYWORD_RE.finditer(segment))
    values: dict[str, str] = {}
    for index, match in enumerate(found):
        name = match.group(1).lower()
        end = found[index + 1].start() if index + 1 < len(found) else len(segment)
        if name in values:
            raise ConfigError(f"{name.capitalize()}: appears more than once in {where}")
        values[name] = segment[match.end() : end]
    return values


def _required_value(values: dict[str, str], name: str) -> str | None:
    """A keyword's value; a keyword present with nothing after it is an error."""
    if name not in values:
        return None
    value = values[name].strip()
    if not value:
        raise ConfigError(f"{name.capitalize()}: has no value in the SMS")
    if name != "user" and len(value.split()) > 1:
        raise ConfigError(
            f"the {name.capitalize()} in the SMS is {_show(' '.join(value.split()))}: "
            "expected one word before 'cdzprov'"
        )
    return value


def _fingerprint_after(tail: str) -> str | None:
    key = _KEY_AFTER_RE.search(tail)
    if key is None:
        return None
    digits = _FINGERPRINT_RE.match(tail, key.end())
    if digits is None:
        raise ConfigError("the Key: in the SMS is not followed by the key's 16 hex digits")
    return normalise_fingerprint(digits.group(1), "the SMS")


def parse_answer(text: str) -> Provisioning:
    """What a user typed at the prompt: an alias, or ``host:port`` of a local/DMZ proxy."""
    where = "your answer"
    answer = text.strip()
    if "@" in answer or ":" not in answer:
        return build(where, alias=answer, host=None, port=None)
    return build(where, alias=None, host=answer, port=None)


# --- migration file --------------------------------------------------------------------------

_FILE_KEYS = frozenset({"alias", "host", "port", "user", "key"})
_REGISTRY_HEADERS = ("Windows Registry Editor", "REGEDIT4")


def parse_config_file(path: Path) -> Provisioning:
    """A migration file: INI-style ``Alias = …`` or ``Host = …`` and ``Port = …``.

    A ``[Provisioning]`` section (or a registry path ending in ``\\Provisioning``) is optional;
    keys outside any section count too; keys and section names are case-insensitive; values may
    be quoted; an empty value means "not set"; other sections are ignored.
    """
    where = str(path)
    values, problems = _file_values(_read_text(path))
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    return build(
        where,
        alias=values.get("alias"),
        host=values.get("host"),
        port=values.get("port"),
        user=values.get("user"),
        fingerprint=values.get("key"),
    )


def _file_values(text: str) -> tuple[dict[str, str], list[str]]:
    """The values of the keys that apply, and every problem found (with its line number)."""
    values: dict[str, str] = {}
    problems: list[str] = []
    section_applies = True
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line[0] in "#;" or line.startswith(_REGISTRY_HEADERS):
            continue
        if line.startswith("[") and line.endswith("]"):
            name = line[1:-1].strip().lower()
            section_applies = name.rsplit("\\", 1)[-1] == "provisioning"
            continue
        key, sep, value = line.partition("=")
        key = _unquote(key).lower()
        if not sep or not key:
            problems.append(f"line {number}: expected 'Name = value', got {_show(line)}")
        elif not section_applies:
            continue
        elif key not in _FILE_KEYS:
            problems.append(
                f"line {number}: unknown key {_show(key)} (known: Alias, Host, Port, User, Key)"
            )
        elif key in values:
            problems.append(f"line {number}: {key.capitalize()} is set twice")
        else:
            values[key] = _unquote(value)
    return values, problems


def _read_text(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE_SIZE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_SIZE:
        raise ConfigError(
            f"{path} is larger than {MAX_FILE_SIZE // 1024} KiB; is it the right file?"
        )
    try:
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # a registry export is UTF-16
            return data.decode("utf-16")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 or UTF-16 text") from None


def _unquote(text: str) -> str:
    value = text.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1].strip()
    return value


def with_extras(config: Provisioning, *, user: str | None, fingerprint: str | None) -> Provisioning:
    """Add ``--user`` (wins over the configuration's) and ``--fingerprint`` (must agree)."""
    if user is not None:
        config = replace(config, user=parse_user(user, "--user"))
    if fingerprint is not None:
        given = normalise_fingerprint(fingerprint, "--fingerprint")
        if config.fingerprint is not None and config.fingerprint != given:
            raise ConfigError(
                f"--fingerprint {given} disagrees with the Key {config.fingerprint} of the "
                "configuration; give one of them"
            )
        config = replace(config, fingerprint=given)
    return config
