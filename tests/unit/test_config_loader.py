"""The generic loader of shared/config: sources, precedence, conversion and error collection."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shared.aliases import normalise_grant
from shared.config import (
    ConfigError,
    Secret,
    config_reference,
    load_config,
    meta,
    reference_table,
)


@dataclass(frozen=True, kw_only=True)
class Sample:
    name: str = field(default="svc", metadata=meta(help="a name"))
    listen: str = field(default="127.0.0.1:1", metadata=meta(kind="hostport"))
    backup: str | None = field(default=None, metadata=meta(kind="hostport"))
    url: str = field(default="http://x", metadata=meta(kind="url", schemes=("http", "https")))
    count: int = field(default=2, metadata=meta(minimum=1, maximum=16))
    ratio: float = 0.5
    timeout: float = field(default=30.0, metadata=meta(kind="duration", above=0))
    buf: int = field(default=65536, metadata=meta(kind="size"))
    limit: int | None = field(default=None, metadata=meta(kind="size"))
    verbose: bool = False
    home: Path = Path("/var/x")
    cert: Path | None = None
    tags: list[str] = field(default_factory=list, metadata=meta(check=normalise_grant))
    token: Secret = field(default=Secret(""))
    level: str = field(default="info", metadata=meta(choices=("debug", "info")))


@dataclass(frozen=True, kw_only=True)
class Required:
    target: str = field(metadata=meta(kind="url", schemes=("http",)))
    extra: int = 1

    def validate(self) -> list[str]:
        return ["extra must be odd"] if self.extra % 2 == 0 else []


def load(
    tmp_path: Path | None = None,
    toml: str | None = None,
    env: dict[str, str] | None = None,
    overrides: dict[str, object] | None = None,
    cls: type = Sample,
) -> object:
    file = None
    if toml is not None:
        assert tmp_path is not None
        file = tmp_path / "c.toml"
        file.write_text(toml)
    return load_config(cls, file=file, env=env or {}, env_prefix="T_", overrides=overrides or {})


def problems_of(exc: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return exc.value.problems


def test_defaults_only() -> None:
    assert load() == Sample()


def test_precedence_file_env_override(tmp_path: Path) -> None:
    toml = 'name = "from-file"\ncount = 3\nratio = 0.25\n'
    env = {"T_NAME": "from-env", "T_COUNT": "4"}
    cfg = load(tmp_path, toml, env, {"name": "from-cli", "count": None})
    assert isinstance(cfg, Sample)
    assert (cfg.name, cfg.count, cfg.ratio) == ("from-cli", 4, 0.25)


def test_none_overrides_are_ignored() -> None:
    cfg = load(overrides={"name": None, "tags": None})
    assert cfg == Sample()


def test_conversions_from_env() -> None:
    env = {
        "T_TIMEOUT": "5m",
        "T_BUF": "256KiB",
        "T_LIMIT": "64MiB",
        "T_VERBOSE": "yes",
        "T_HOME": "/tmp/h",
        "T_CERT": "/tmp/c.pem",
        "T_TAGS": "Acme@Example.com, *@example.org,,acme@example.com",
        "T_TOKEN": "s3cret",
        "T_LEVEL": "DEBUG",
        "T_BACKUP": "[::1]:9",
        "T_RATIO": "1.5",
    }
    cfg = load(env=env)
    assert isinstance(cfg, Sample)
    assert cfg.timeout == 300.0
    assert cfg.buf == 262144
    assert cfg.limit == 64 * 1024**2
    assert cfg.verbose is True
    assert cfg.home == Path("/tmp/h")
    assert cfg.cert == Path("/tmp/c.pem")
    assert cfg.tags == ["acme@example.com", "*@example.org"]
    assert cfg.token.reveal() == "s3cret"
    assert cfg.level == "debug"
    assert cfg.backup == "[::1]:9"
    assert cfg.ratio == 1.5


def test_conversions_from_toml(tmp_path: Path) -> None:
    toml = """
timeout = "250ms"
buf = 1024
limit = "1GiB"
verbose = true
tags = ["a@example.com", "B@example.com"]
token = "t"
ratio = 2
"""
    cfg = load(tmp_path, toml)
    assert isinstance(cfg, Sample)
    assert cfg.timeout == 0.25
    assert cfg.buf == 1024
    assert cfg.limit == 1024**3
    assert cfg.verbose is True
    assert cfg.tags == ["a@example.com", "b@example.com"]
    assert cfg.token == Secret("t")
    assert cfg.ratio == 2.0


@pytest.mark.parametrize("word", ["", "off", "none", "OFF"])
def test_optional_fields_can_be_disabled(word: str) -> None:
    cfg = load(env={"T_BACKUP": word, "T_LIMIT": word}, overrides={"cert": word})
    assert isinstance(cfg, Sample)
    assert (cfg.backup, cfg.limit, cfg.cert) == (None, None, None)


def test_unknown_keys_and_vars_are_all_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, 'nmae = "x"\n[section]\na = 1\n', {"T_COUNTT": "1", "OTHER": "ignored"})
    problems = problems_of(exc)
    assert len(problems) == 3
    file = tmp_path / "c.toml"
    assert f"{file}: unknown key 'nmae' (did you mean 'name'?)" in problems
    assert f"{file}: unknown key 'section'" in problems
    assert "environment T_COUNTT: unknown setting (did you mean 'T_COUNT'?)" in problems


def test_every_bad_value_is_reported_with_its_source(tmp_path: Path) -> None:
    toml = 'count = "many"\nlisten = "nohost"\ntags = "not-a-list-but-ok"\nverbose = "maybe"\n'
    env = {
        "T_TIMEOUT": "soon",
        "T_BUF": "-3",
        "T_URL": "ftp://x",
        "T_LEVEL": "loud",
        "T_TAGS": "ok@example.com,bad alias",
    }
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, toml, env, {"count": 99, "ratio": "x"})
    problems = problems_of(exc)
    # file: listen, verbose (its count and tags are overridden); env: 5; options: 2
    assert len(problems) == 9, problems
    text = "\n".join(problems)
    assert f"{tmp_path / 'c.toml'}: key 'listen'" in text
    assert f"{tmp_path / 'c.toml'}: key 'verbose'" in text
    for var in ("T_TIMEOUT", "T_BUF", "T_URL", "T_LEVEL", "T_TAGS"):
        assert f"environment {var}:" in text
    # the override wins over the file's bad count, and is itself out of range
    assert "option --count: 99 is above the maximum 16" in text
    assert "option --ratio:" in text
    assert all(p.startswith(("environment ", "option ", str(tmp_path))) for p in problems)


def test_str_of_config_error_lists_one_problem_per_line() -> None:
    err = ConfigError(["a", "b"])
    assert str(err) == "a\nb"
    assert err.problems == ["a", "b"]


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(Sample, file=tmp_path / "nope.toml", env={"T_COUNT": "x"}, env_prefix="T_")
    assert len(problems_of(exc)) == 2
    assert "configuration file not found" in problems_of(exc)[0]
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, "count = = 3")
    assert "not valid TOML" in problems_of(exc)[0]


def test_required_fields_and_validate() -> None:
    with pytest.raises(ConfigError) as exc:
        load(cls=Required)
    assert problems_of(exc) == [
        "missing required setting 'target' (set it in the file, T_TARGET or --target)"
    ]
    with pytest.raises(ConfigError) as exc:
        load(cls=Required, env={"T_TARGET": "http://h", "T_EXTRA": "2"})
    assert problems_of(exc) == ["extra must be odd"]
    cfg = load(cls=Required, env={"T_TARGET": "http://h", "T_EXTRA": "3"})
    assert cfg == Required(target="http://h", extra=3)


def test_reserved_and_ignored_env_vars() -> None:
    env = {"T_CONFIG": "/etc/x.toml", "T_SUB_THING": "1", "T_NAME": "n"}
    cfg = load_config(Sample, file=None, env=env, env_prefix="T_", ignore_env_prefixes=["T_SUB_"])
    assert cfg.name == "n"


def test_unknown_override_is_reported() -> None:
    with pytest.raises(ConfigError) as exc:
        load(overrides={"bogus": 1})
    assert problems_of(exc) == ["option --bogus: unknown setting"]


def test_env_default_uses_the_given_environment() -> None:
    @dataclass(frozen=True)
    class WithEnvDefault:
        home: Path = field(
            default=Path("/fallback"),
            metadata=meta(env_default=lambda env: Path(env.get("HOME_X", "/none"))),
        )

    cfg = load_config(WithEnvDefault, file=None, env={"HOME_X": "/h"}, env_prefix="T_")
    assert cfg.home == Path("/h")
    cfg = load_config(WithEnvDefault, file=None, env={"T_HOME": "/e"}, env_prefix="T_")
    assert cfg.home == Path("/e")


def test_resolve_hook_problems_are_collected_with_validate() -> None:
    @dataclass(frozen=True)
    class Hooked:
        x: int = 1

        def resolve(self) -> Hooked:
            raise ConfigError(["cannot resolve"])

        def validate(self) -> list[str]:
            return ["invalid too"]

    with pytest.raises(ConfigError) as exc:
        load_config(Hooked, file=None, env={}, env_prefix="T_")
    assert problems_of(exc) == ["cannot resolve", "invalid too"]


def test_unsupported_field_types_are_programming_errors() -> None:
    @dataclass(frozen=True)
    class Bad:
        x: dict[str, str] = dataclasses.field(default_factory=dict)

    with pytest.raises(TypeError):
        load_config(Bad, file=None, env={}, env_prefix="T_")
    with pytest.raises(TypeError):
        load_config(int, file=None, env={}, env_prefix="T_")


def test_bools_and_ints_are_strict() -> None:
    for bad in ({"T_VERBOSE": "2"}, {"T_COUNT": "1.5"}, {"T_COUNT": "true"}):
        with pytest.raises(ConfigError):
            load(env=bad)
    with pytest.raises(ConfigError):
        load(overrides={"count": True})


def test_secret_never_prints_itself() -> None:
    secret = Secret("hunter2")
    assert str(secret) == "***"
    assert repr(secret) == "'***'"
    assert f"{secret}" == "***"
    assert secret.reveal() == "hunter2"
    assert secret == Secret("hunter2") and secret != Secret("x") and secret != "hunter2"
    assert hash(secret) == hash(Secret("hunter2"))
    assert bool(secret) and not Secret("")
    cfg = load(env={"T_TOKEN": "hunter2"})
    assert "hunter2" not in repr(cfg) and "hunter2" not in str(cfg)
    with pytest.raises(TypeError):
        Secret(3)  # type: ignore[arg-type]


def test_config_reference() -> None:
    rows = config_reference(Sample, "T_")
    assert [r.key for r in rows][:3] == ["name", "listen", "backup"]
    by_key = {r.key: r for r in rows}
    assert by_key["name"].env == "T_NAME"
    assert by_key["name"].help == "a name"
    assert by_key["buf"].default == "64KiB"
    assert by_key["timeout"].default == "30s"
    assert by_key["backup"].default == "(unset)"
    assert by_key["tags"].default == "[]"
    assert by_key["verbose"].default == "false"
    table = reference_table(Required, "T_")
    assert "| `target` | `T_TARGET` | (required) |" in table
