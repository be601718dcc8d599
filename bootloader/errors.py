"""Typed failures of the bootloader: each one names its stage, and the stage fixes the exit code.

Invariants: every failure a user can see is a :class:`BootError`; ``cli.main`` prints its
:meth:`BootError.line` (one line: stage, what went wrong, a hint, the request id when the server
gave one) and returns :data:`EXIT_CODES` of its stage. Text that came from a server passes
through :func:`printable` before it is shown, so a hostile answer cannot drive the terminal.
"""

from __future__ import annotations

import enum

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130


class Stage(enum.StrEnum):
    """The steps of a run, in order; a failure names the one it happened in."""

    CONFIG = "config"
    RESOLVE = "resolve"
    CONNECT = "connect"
    LOGON = "logon"
    DOWNLOAD = "download"
    VERIFY = "verify"
    INSTALL = "install"


#: stage -> exit status (the README's "Bootloader" section and ``--help`` show this table).
EXIT_CODES: dict[Stage, int] = {
    Stage.CONFIG: 2,
    Stage.RESOLVE: 3,
    Stage.CONNECT: 4,
    Stage.LOGON: 5,
    Stage.DOWNLOAD: 6,
    Stage.VERIFY: 7,
    Stage.INSTALL: 8,
}

_MEANINGS = {
    Stage.CONFIG: "usage or configuration error",
    Stage.RESOLVE: "the CSC could not resolve the alias (unknown, portal offline, unreachable)",
    Stage.CONNECT: "the portal could not be reached or its key was refused",
    Stage.LOGON: "the logon was refused (user, password, device type, too many attempts)",
    Stage.DOWNLOAD: "the package download failed (run again to resume it)",
    Stage.VERIFY: "the package failed verification (signature, hashes, paths, sizes)",
    Stage.INSTALL: "the package could not be installed (the old client is untouched)",
}


def exit_code_table() -> str:
    """The exit statuses, one per line, for ``--help`` and the README."""
    rows = [f"  {EXIT_OK:>3}  installed"]
    rows.append(f"  {EXIT_INTERNAL:>3}  unexpected internal error (--debug shows the traceback)")
    rows += [f"  {EXIT_CODES[s]:>3}  {s.value}: {_MEANINGS[s]}" for s in Stage]
    rows.append(
        f"  {EXIT_INTERRUPTED:>3}  interrupted (Ctrl-C); a download resumes on the next run"
    )
    return "\n".join(rows)


def printable(text: object, limit: int = 300) -> str:
    """``text`` on one line, control characters replaced, at most ``limit`` characters."""
    clean = "".join(ch if ch.isprintable() else " " for ch in str(text))
    clean = " ".join(clean.split())
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


class BootError(Exception):
    """A failure of one stage: ``message`` says what happened and what to do about it."""

    def __init__(
        self,
        stage: Stage,
        message: str,
        *,
        request_id: str | None = None,
        code: str | None = None,
    ) -> None:
        self.stage = stage
        self.message = message
        self.request_id = request_id
        self.code = code  # the server's error code, when the failure is an error answer
        super().__init__(self.line())

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.stage]

    def line(self) -> str:
        head = "config:" if self.stage is Stage.CONFIG else f"{self.stage.value} failed:"
        tail = f" (request {printable(self.request_id, 80)})" if self.request_id else ""
        return f"{head} {self.message}{tail}"


class ConfigError(BootError):
    """A usage or configuration problem, found before anything is contacted."""

    def __init__(self, message: str) -> None:
        super().__init__(Stage.CONFIG, message)
