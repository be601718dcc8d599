"""Talking to the person at the device: questions on stdin, messages on stderr.

Invariants: questions are asked only when stdin is a terminal (``interactive``); nothing but the
final result goes to stdout; a password is read without echo when stdin is the process's real
terminal (``getpass``), and from the given stream otherwise (tests drive it that way); the end
of input is a :class:`~bootloader.errors.ConfigError`, never a hang or a traceback.
"""

from __future__ import annotations

import getpass
from typing import TextIO

from bootloader.errors import ConfigError

MAX_ANSWER = 4096


class Terminal:
    def __init__(
        self, stdin: TextIO, stderr: TextIO, *, quiet: bool = False, use_getpass: bool = False
    ) -> None:
        self._stdin = stdin
        self._stderr = stderr
        self.quiet = quiet
        self._use_getpass = use_getpass
        isatty = getattr(stdin, "isatty", None)
        self.interactive = bool(callable(isatty) and isatty())

    def say(self, line: str) -> None:
        """An informational line (suppressed by ``--quiet``)."""
        if not self.quiet:
            self.warn(line)

    def warn(self, line: str) -> None:
        """A line the user must see, even with ``--quiet``."""
        self._stderr.write(line + "\n")
        self._stderr.flush()

    def ask(self, prompt: str) -> str:
        self._stderr.write(prompt)
        self._stderr.flush()
        try:
            line = self._stdin.readline(MAX_ANSWER + 1)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the answer: {exc}") from None
        if not line:
            raise ConfigError("no answer (end of input)")
        if len(line) > MAX_ANSWER:
            raise ConfigError(f"the answer is longer than {MAX_ANSWER} characters")
        return line.rstrip("\r\n")

    def ask_secret(self, prompt: str) -> str:
        if self._use_getpass:
            try:
                return getpass.getpass(prompt, stream=self._stderr)
            except EOFError:
                raise ConfigError("no answer (end of input)") from None
        return self.ask(prompt)
