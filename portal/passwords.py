"""Password hashing: argon2id through ``argon2-cffi``'s :class:`~argon2.PasswordHasher`.

Invariants:

* Hashes are argon2id PHC strings with the parameters of the configured profile; a stored hash made
  with other parameters still verifies, and :meth:`Passwords.verify` says when it should be
  replaced (rehash on the next successful logon).
* :meth:`Passwords.verify_absent` costs one verification with the current parameters against a
  fixed dummy hash, so an unknown user takes as long to reject as a wrong password.
* Everything here is blocking and CPU-bound: the server runs it in worker threads.
* Passwords never appear in exceptions or messages raised from here.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024

#: Profile name -> argon2id parameters (time cost, memory in KiB, parallelism).
PROFILES: dict[str, tuple[int, int, int]] = {
    "standard": (3, 64 * 1024, 4),  # RFC 9106 "low memory" recommendation
    "test": (1, 256, 1),  # fast; for tests only
}


def check_password(password: str) -> str:
    """Return ``password`` if it is acceptable as a new password, else raise ValueError."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise ValueError(f"the password must have at most {MAX_PASSWORD_LENGTH} characters")
    if "\n" in password or "\r" in password or "\x00" in password:
        raise ValueError("the password must not contain line breaks or NUL characters")
    return password


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of one verification; ``new_hash`` is set when the stored hash is outdated."""

    ok: bool
    new_hash: str | None = None


class Passwords:
    """Hashes and verifies passwords with one argon2id profile."""

    def __init__(self, profile: str = "standard") -> None:
        try:
            time_cost, memory_cost, parallelism = PROFILES[profile]
        except KeyError:
            raise ValueError(f"unknown password hash profile {profile!r}") from None
        self.profile = profile
        self._hasher = PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_cost,
            parallelism=parallelism,
            hash_len=32,
            salt_len=16,
            type=Type.ID,
        )
        self._dummy: str | None = None
        self._lock = threading.Lock()

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, stored: str, password: str) -> Verdict:
        """Check ``password`` against ``stored``; a malformed stored hash is a mismatch."""
        try:
            self._hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return Verdict(False)
        if self._hasher.check_needs_rehash(stored):
            return Verdict(True, self._hasher.hash(password))
        return Verdict(True)

    def verify_absent(self, password: str) -> Verdict:
        """Spend one verification for a user that does not exist; always a mismatch."""
        self.verify(self._dummy_hash(), password)
        return Verdict(False)

    def _dummy_hash(self) -> str:
        with self._lock:
            if self._dummy is None:
                self._dummy = self._hasher.hash(secrets.token_urlsafe(24))
            return self._dummy
