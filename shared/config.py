"""Configuration as data: frozen dataclasses loaded from defaults, a TOML file, the environment
and command-line overrides.

Every component describes its settings as a frozen dataclass whose fields carry their defaults
and, in ``field(metadata=meta(...))`` (see :func:`meta`), how a value is parsed and checked.
:func:`load_config` overlays the sources in this order, each one winning over the ones before it::

    dataclass defaults  <  TOML file  <  {PREFIX}{FIELD} environment variables  <  overrides

Invariants:

* Unknown keys in the file and unknown ``{PREFIX}*`` environment variables are errors, except
  the service-link variables Kubernetes (and Docker links) inject for every Service, such as
  ``CSC_SERVICE_HOST`` or ``CSC_PORT_8080_TCP`` for a Service named ``csc``: an unknown variable
  whose name and value both have that shape (:func:`is_service_link`) is ignored.
* Every problem (unknown key, unparsable value, out-of-range value, cross-field conflict from the
  dataclass's optional ``validate(self) -> list[str]``) is collected, and all of them are raised
  together as one :class:`ConfigError`, each naming where the bad value came from.
* Secrets are :class:`Secret` values: ``str()`` and ``repr()`` print ``***``; only ``reveal()``
  gives the value, so a config can be logged whole.
* Nothing here reads ``os.environ``: the entry point passes the environment in.

Value syntax: durations ``250ms``, ``30s``, ``5m``, ``2h``, ``30d``, ``1w``, ``1h30m`` or plain
seconds; sizes ``256KiB``/``64MiB`` (binary), ``256k``/``64M`` (binary, as nginx), ``1kB``/``5MB``
(decimal) or plain bytes; host:port ``HOST:PORT`` or ``[IPv6]:PORT``; booleans
``true/false/1/0/yes/no/on/off``; lists an array in TOML or comma-separated text. For an optional
field (``X | None``) the text ``""``, ``off`` or ``none`` means "not set".
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from shared.errors import CSCError
from shared.logsetup import FORMAT_CHOICES, LEVELS
from shared.units import PLAIN_NUMBER, check_url, parse_duration, parse_hostport, parse_size

__all__ = [
    "AUTO",
    "KIB",
    "LOG_LEVELS",
    "MIB",
    "ConfigError",
    "Secret",
    "config_reference",
    "duration_field",
    "is_service_link",
    "load_config",
    "meta",
    "parse_duration",
    "parse_hostport",
    "parse_size",
    "size_field",
]

T = TypeVar("T")
Kind = Literal["size", "duration", "hostport", "url", "count_or_auto"]
#: The value of a ``count_or_auto`` field set to ``auto`` (a count chosen at run time).
AUTO = 0

KIB = 1024
MIB = 1024 * 1024
#: The ``log_level`` words every program accepts (``--log-level`` lists them).
LOG_LEVELS = tuple(LEVELS)

#: Texts that mean "not set" for an optional field.
NONE_WORDS = frozenset({"", "off", "none"})


class ConfigError(Exception):
    """All the problems found while loading one configuration; ``str()`` gives one per line."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class Secret:
    """A string that never prints itself: ``str()``/``repr()`` are ``***``; see :meth:`reveal`."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("a Secret wraps a str")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "'***'"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))


# --- field metadata ----------------------------------------------------------------------------


def meta(
    *,
    kind: Kind | None = None,
    help: str = "",
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    choices: Collection[str] | None = None,
    schemes: Collection[str] | None = None,
    check: Callable[[str], str] | None = None,
    env_default: Callable[[Mapping[str, str]], Any] | None = None,
    doc_default: str | None = None,
    required_unless: Collection[str] | None = None,
) -> dict[str, Any]:
    """Field metadata :func:`load_config` understands: ``field(default=..., metadata=meta(...))``.

    ``kind`` picks the parser (size, duration, hostport, url with ``schemes``, count_or_auto: a
    whole number or the word ``auto``, read as :data:`AUTO`); ``minimum`` and
    ``maximum`` are inclusive bounds, ``above`` an exclusive lower bound; ``choices`` a set of
    allowed (lower-case) words; ``check`` normalises each string (or each list item) and raises
    ``ValueError``/an error with a message; ``env_default`` computes the default from the
    environment given to :func:`load_config`; ``doc_default`` is what the docs show as default;
    ``required_unless`` names fields any of which, when given, make this defaulted field optional
    (otherwise it is reported missing like a field without a default).
    """
    result: dict[str, Any] = {"help": help}
    for key, value in (
        ("kind", kind),
        ("minimum", minimum),
        ("maximum", maximum),
        ("above", above),
        ("choices", tuple(choices) if choices is not None else None),
        ("schemes", tuple(schemes) if schemes is not None else None),
        ("check", check),
        ("env_default", env_default),
        ("doc_default", doc_default),
        ("required_unless", tuple(required_unless) if required_unless is not None else None),
    ):
        if value is not None:
            result[key] = value
    return result


def check_network(text: str) -> str:
    """Normalise one entry of a list of peers: an IP address or network (``10.0.0.0/8``)."""
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or network (e.g. 10.0.0.0/8)") from None


def xdg_state_dir(env: Mapping[str, str], program: str) -> Path:
    """``$XDG_STATE_HOME/<program>`` when that is absolute, else ``~/.local/state/<program>``."""
    xdg = env.get("XDG_STATE_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / program
    home = env.get("HOME")
    return (Path(home) if home else Path.home()) / ".local" / "state" / program


def log_level_field() -> Any:
    """The ``log_level`` setting every program has (``info`` by default)."""
    spec = meta(choices=LOG_LEVELS, help="debug, info, warning or error")
    return dataclasses.field(default="info", metadata=spec)


def log_format_field() -> Any:
    """The ``log_format`` setting every program has (``auto`` by default)."""
    spec = meta(
        choices=FORMAT_CHOICES,
        help="auto (text when stderr is a terminal, else json), json (one object per line) or text",
    )
    return dataclasses.field(default="auto", metadata=spec)


def duration_field(default: float, help: str, *, minimum: float | None = None) -> Any:
    """A duration field: positive unless ``minimum`` is given (e.g. 0 to allow zero)."""
    above = None if minimum is not None else 0.0
    spec = meta(kind="duration", minimum=minimum, above=above, help=help)
    return dataclasses.field(default=default, metadata=spec)


def size_field(
    default: int, help: str, *, minimum: int | None = None, maximum: int | None = None
) -> Any:
    """A size field (bytes), with optional inclusive bounds."""
    spec = meta(kind="size", minimum=minimum, maximum=maximum, help=help)
    return dataclasses.field(default=default, metadata=spec)


@dataclasses.dataclass(frozen=True, slots=True)
class _FieldType:
    base: Any
    optional: bool
    is_list: bool


def _field_type(annotation: Any) -> _FieldType:
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported config type {annotation!r}")
        optional, annotation = True, args[0]
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        if item is not str:
            raise TypeError(f"unsupported config type {annotation!r}: only list[str]")
        return _FieldType(str, optional, True)
    if annotation not in (str, int, float, bool, Path, Secret):
        raise TypeError(f"unsupported config type {annotation!r}")
    return _FieldType(annotation, optional, False)


# --- conversion --------------------------------------------------------------------------------

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def _as_text(value: object, expected: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected {expected}, got {type(value).__name__} {value!r}")
    return value


def _check_item(text: str, spec: Mapping[str, Any]) -> str:
    check = spec.get("check")
    if check is None:
        return text
    try:
        result: str = check(text)
    except CSCError as exc:  # a typed error (e.g. BadAlias) from a normaliser
        raise ValueError(exc.message) from None
    return result


def _convert_str(value: object, spec: Mapping[str, Any]) -> str:
    text = _as_text(value, "a string")
    kind = spec.get("kind")
    if kind == "hostport":
        text = text.strip()
        parse_hostport(text)
    elif kind == "url":
        text = check_url(text.strip(), spec.get("schemes", ("http", "https")))
    choices = spec.get("choices")
    if choices is not None:
        text = text.strip().lower()
        if text not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
    return _check_item(text, spec)


def _convert_int(value: object, spec: Mapping[str, Any]) -> int:
    kind = spec.get("kind")
    if kind == "size":
        if isinstance(value, str | int):
            return parse_size(value)
        raise ValueError(f"expected a size, got {type(value).__name__} {value!r}")
    if kind == "count_or_auto":
        if isinstance(value, str) and value.strip().lower() == "auto":
            return AUTO
        count = _whole_number(value, "a whole number or auto")
        if count == AUTO:
            raise ValueError(f"{value!r} is not a count: write auto, or a number from 1")
        return count
    return _whole_number(value, "a whole number")


def _whole_number(value: object, expected: str) -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"expected {expected}, got {value!r}")


def _convert_float(value: object, spec: Mapping[str, Any]) -> float:
    if spec.get("kind") == "duration":
        if isinstance(value, str | int | float):
            return parse_duration(value)
        raise ValueError(f"expected a duration, got {type(value).__name__} {value!r}")
    if isinstance(value, str) and PLAIN_NUMBER.fullmatch(value.strip().lstrip("-")):
        return float(value)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise ValueError(f"expected a number, got {value!r}")


def _convert_bool(value: object, spec: Mapping[str, Any]) -> bool:
    if isinstance(value, bool):
        return value
    word = _as_text(value, "true or false").strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"{value!r} is not a boolean (expected true/false, yes/no, 1/0, on/off)")


def _convert_path(value: object, spec: Mapping[str, Any]) -> Path:
    if isinstance(value, Path):
        return value
    text = _as_text(value, "a path")
    if not text.strip():
        raise ValueError("the path is empty")
    return Path(text).expanduser()


def _convert_secret(value: object, spec: Mapping[str, Any]) -> Secret:
    if isinstance(value, Secret):
        return value
    return Secret(_as_text(value, "a string"))


_SCALARS: dict[Any, Callable[[object, Mapping[str, Any]], object]] = {
    str: _convert_str,
    int: _convert_int,
    float: _convert_float,
    bool: _convert_bool,
    Path: _convert_path,
    Secret: _convert_secret,
}


def _convert_list(value: object, spec: Mapping[str, Any]) -> list[str]:
    if isinstance(value, str):
        items: list[object] = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ValueError(f"expected a list of strings, got {type(value).__name__} {value!r}")
    result: list[str] = []
    for item in items:
        text = _check_item(_as_text(item, "a string in the list").strip(), spec)
        if text not in result:
            result.append(text)
    return result


def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _check_bounds(value: object, spec: Mapping[str, Any]) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    if spec.get("kind") == "count_or_auto" and value == AUTO:
        return
    low, high, above = spec.get("minimum"), spec.get("maximum"), spec.get("above")
    if low is not None and value < low:
        raise ValueError(f"{_num(value)} is below the minimum {_num(low)}")
    if high is not None and value > high:
        raise ValueError(f"{_num(value)} is above the maximum {_num(high)}")
    if above is not None and value <= above:
        raise ValueError(f"{_num(value)} must be greater than {_num(above)}")


def convert_value(value: object, ftype: _FieldType, spec: Mapping[str, Any]) -> object:
    """Convert one raw value (TOML, environment text or an override) to the field's type."""
    if ftype.optional and (
        value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS)
    ):
        return None
    if ftype.is_list:
        return _convert_list(value, spec)
    result = _SCALARS[ftype.base](value, spec)
    _check_bounds(result, spec)
    return result


# --- the loader --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Raw:
    value: object
    source: str


def _suggest(name: str, known: Collection[str]) -> str:
    import difflib  # only for a misspelt key

    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _from_file(path: Path, fields: Collection[str], problems: list[str]) -> dict[str, _Raw]:
    import tomllib  # only when there is a configuration file

    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        problems.append(f"{path}: configuration file not found")
        return {}
    except OSError as exc:
        problems.append(f"{path}: cannot read the configuration file: {exc.strerror or exc}")
        return {}
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"{path}: not valid TOML: {exc}")
        return {}
    raw: dict[str, _Raw] = {}
    for key, value in data.items():
        if key not in fields:
            problems.append(f"{path}: unknown key {key!r}{_suggest(key, fields)}")
        else:
            raw[key] = _Raw(value, f"{path}: key {key!r}")
    return raw


def env_var(prefix: str, name: str) -> str:
    """The environment variable that sets field ``name``: ``{prefix}{NAME}``."""
    return f"{prefix}{name.upper()}"


#: Kubernetes service-link variables (and Docker's legacy links): name suffix -> value shape.
_SERVICE_LINK = re.compile(
    r"_(?:(?P<host>SERVICE_HOST)|(?P<port>SERVICE_PORT(?:_[A-Z0-9_]+)?)"
    r"|(?P<url>PORT(?:_[0-9]+_(?:TCP|UDP|SCTP))?)|PORT_[0-9]+_(?:TCP|UDP|SCTP)_(?P<part>PROTO|PORT|ADDR))$"
)
_LINK_URL = re.compile(r"(?:tcp|udp|sctp)://[0-9A-Fa-f.:\[\]]+:[0-9]+")
_LINK_ADDR = re.compile(r"[0-9A-Fa-f.:]+")


def is_service_link(var: str, value: str) -> bool:
    """Whether ``var=value`` is a service-link variable Kubernetes injects for a Service (e.g.
    ``CSC_SERVICE_HOST=10.0.0.7``, ``CSC_PORT=tcp://10.0.0.7:8080``,
    ``CSC_PORT_8080_TCP_PROTO=tcp``), judged by the name's suffix and the value's shape."""
    m = _SERVICE_LINK.search(var)
    if m is None:
        return False
    if m["host"] or m["part"] == "ADDR":
        return _LINK_ADDR.fullmatch(value) is not None
    if m["port"] or m["part"] == "PORT":
        return value.isdigit()
    if m["part"] == "PROTO":
        return value in ("tcp", "udp", "sctp")
    return _LINK_URL.fullmatch(value) is not None


def _from_env(
    env: Mapping[str, str],
    prefix: str,
    fields: Collection[str],
    ignore: Collection[str],
    problems: list[str],
) -> dict[str, _Raw]:
    raw: dict[str, _Raw] = {}
    reserved = {f"{prefix}CONFIG"}
    for var in sorted(env):
        if not var.startswith(prefix) or var in reserved:
            continue
        if any(var.startswith(other) for other in ignore):
            continue
        name = var[len(prefix) :].lower()
        if name not in fields and is_service_link(var, env[var]):
            continue
        if name not in fields:
            known = [env_var(prefix, f) for f in fields]
            problems.append(f"environment {var}: unknown setting{_suggest(var, known)}")
        else:
            raw[name] = _Raw(env[var], f"environment {var}")
    return raw


def option_name(name: str) -> str:
    """The command-line option conventionally naming field ``name``: ``--{name-with-dashes}``."""
    return "--" + name.replace("_", "-")


def _from_overrides(
    overrides: Mapping[str, object], fields: Collection[str], problems: list[str]
) -> dict[str, _Raw]:
    raw: dict[str, _Raw] = {}
    for name, value in overrides.items():
        if value is None:
            continue
        if name not in fields:
            problems.append(f"option {option_name(name)}: unknown setting")
        else:
            raw[name] = _Raw(value, f"option {option_name(name)}")
    return raw


def _missing(
    name: str, fld: dataclasses.Field[Any], given: Collection[str], prefix: str
) -> str | None:
    how = f"set it in the file, {env_var(prefix, name)} or {option_name(name)}"
    alternatives = fld.metadata.get("required_unless")
    if alternatives is not None:
        if any(alt in given for alt in alternatives):
            return None
        return f"missing required setting {name!r} ({how}; or set {' or '.join(alternatives)})"
    if fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
        return f"missing required setting {name!r} ({how})"
    return None


def _run_hooks(instance: T, problems: list[str]) -> T:
    resolve = getattr(instance, "resolve", None)
    if callable(resolve):
        try:
            instance = resolve()
        except ConfigError as exc:
            problems.extend(exc.problems)
    validate = getattr(instance, "validate", None)
    if callable(validate):
        problems.extend(validate())
    return instance


def load_config(
    cls: type[T],
    *,
    file: Path | None,
    env: Mapping[str, str],
    env_prefix: str,
    overrides: Mapping[str, object] | None = None,
    ignore_env_prefixes: Collection[str] = (),
) -> T:
    """Build ``cls`` from its defaults, ``file``, ``env`` and ``overrides``; see the module doc.

    ``{env_prefix}CONFIG`` is reserved (the entry point reads the file name from it) and variables
    starting with any of ``ignore_env_prefixes`` belong to other components. After conversion, an
    optional ``resolve(self) -> Self`` hook may read referenced files (raising ConfigError), then
    an optional ``validate(self) -> list[str]`` hook reports cross-field problems.
    Raises :class:`ConfigError` with every problem found.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    problems: list[str] = []
    layers = [
        _from_file(file, fields, problems) if file is not None else {},
        _from_env(env, env_prefix, fields, ignore_env_prefixes, problems),
        _from_overrides(overrides or {}, fields, problems),
    ]
    given = {name for layer in layers for name in layer}
    values: dict[str, object] = {}
    for name, fld in fields.items():
        ftype = _field_type(hints[name])
        raw = next((layer[name] for layer in reversed(layers) if name in layer), None)
        if raw is None:
            missing = _missing(name, fld, given, env_prefix)
            if missing is not None:
                problems.append(missing)
            elif "env_default" in fld.metadata:
                values[name] = fld.metadata["env_default"](env)
            continue
        try:
            values[name] = convert_value(raw.value, ftype, fld.metadata)
        except ValueError as exc:
            problems.append(f"{raw.source}: {exc}")
    if problems:
        raise ConfigError(problems)
    instance = _run_hooks(cls(**values), problems)
    if problems:
        raise ConfigError(problems)
    return instance


# --- documentation -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class SettingDoc:
    """One row of a configuration reference table."""

    key: str
    env: str
    default: str
    help: str


def _default_text(fld: dataclasses.Field[Any]) -> str:
    if "doc_default" in fld.metadata:
        return str(fld.metadata["doc_default"])
    if fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
        return "(required)"
    factory = fld.default_factory
    value = fld.default if factory is dataclasses.MISSING else factory()
    if value is None:
        return "(unset)"
    if isinstance(value, list):
        return "[]" if not value else ", ".join(map(str, value))
    if isinstance(value, Secret):
        return "(unset)" if not value else "***"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) and fld.metadata.get("kind") == "size":
        return _size_text(value)
    if value == AUTO and fld.metadata.get("kind") == "count_or_auto":
        return "auto"
    if isinstance(value, float) and fld.metadata.get("kind") == "duration":
        return f"{value:g}s"
    return str(value)


def _size_text(value: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value and value % factor == 0:
            return f"{value // factor}{unit}"
    return str(value)


def config_reference(cls: type[Any], env_prefix: str) -> list[SettingDoc]:
    """Key, environment variable, default and help of every field of ``cls``, in order."""
    return [
        SettingDoc(
            f.name, env_var(env_prefix, f.name), _default_text(f), f.metadata.get("help", "")
        )
        for f in dataclasses.fields(cls)
        if f.init
    ]


def reference_table(cls: type[Any], env_prefix: str) -> str:
    """A Markdown table of :func:`config_reference` (the README's tables are checked against it)."""
    lines = ["| key | environment | default | meaning |", "|---|---|---|---|"]
    for d in config_reference(cls, env_prefix):
        literal = not d.default.startswith(("(", "`", "["))
        default = f"`{d.default}`" if literal else d.default
        lines.append(f"| `{d.key}` | `{d.env}` | {default} | {d.help} |")
    return "\n".join(lines)
