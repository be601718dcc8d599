"""Small helpers shared by the command-line entry points (``csc``, ``csc-agent``, ``csc-portal``).

Conventions they enforce: messages go to stderr prefixed with the program name; a configuration
error prints ``<prog>: configuration error:`` and then every problem, one per line, and exits 2;
argparse's own usage errors also exit 2; ``main`` returns the exit code instead of raising; lists
print as :func:`table` (left-aligned columns, two spaces apart, no trailing blanks).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from shared.config import ConfigError

T = TypeVar("T")
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def version() -> str:
    # imported here: importlib.metadata brings email, zipfile, csv and inspect (about 1 MiB
    # resident), and a serving process never needs it
    from importlib import metadata

    try:
        return metadata.version("csc")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


class _VersionAction(argparse.Action):
    """``--version``: the installed package's version, looked up only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("help", "show the program's version and exit")
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any, **_kwargs: Any) -> None:
        print(f"{parser.prog} {version()}")
        parser.exit()


def add_version_arg(parser: argparse.ArgumentParser) -> None:
    """``--version`` (prints ``PROG VERSION`` and exits 0)."""
    parser.add_argument("--version", action=_VersionAction)


def fail(prog: str, message: str, code: int = EXIT_FAILURE) -> int:
    print(f"{prog}: {message}", file=sys.stderr)
    return code


def config_file(arg: Path | None, env: Mapping[str, str], prefix: str) -> Path | None:
    """The ``--config`` file, else ``{prefix}CONFIG`` from the environment, else None."""
    if arg is not None:
        return arg
    from_env = env.get(f"{prefix}CONFIG", "").strip()
    return Path(from_env).expanduser() if from_env else None


def load_or_report(prog: str, load: Callable[[], T]) -> T | None:
    """Run a config loader; on ConfigError print every problem and return None."""
    try:
        return load()
    except ConfigError as exc:
        lines = "".join(f"\n  {problem}" for problem in exc.problems)
        print(f"{prog}: configuration error:{lines}", file=sys.stderr)
        return None


def run_parser(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    """Parse ``argv``; argparse's exits (``--help``, usage errors) become a returned code."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or EXIT_OK
        return EXIT_USAGE


def add_log_format_arg(parser: argparse.ArgumentParser) -> None:
    """``--log-format auto|json|text``: overrides the ``log_format`` setting."""
    parser.add_argument(
        "--log-format",
        choices=("auto", "json", "text"),
        help="text for people, json for collectors; auto (default): text on a terminal",
    )


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], empty: str) -> str:
    """Left-aligned columns separated by two spaces; ``empty`` when there are no rows.

    A cell of ``None`` reads ``-``, a list or tuple its items joined by commas (``-`` if none).
    """
    cells = [[_cell(v) for v in row] for row in rows]
    if not cells:
        return empty
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = [list(headers), *cells]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in lines
    )


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) or "-"
    return str(value)
