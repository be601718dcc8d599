"""Logon sessions: random bearer tokens bound to a user, a device type and one package.

Invariants: a token is 32 random bytes (URL-safe base64) handed out once; only its SHA-256 is
kept, in memory, so neither a memory dump nor a log line can replay it; a session grants exactly
the package of its own logon until it expires (``ttl`` seconds, monotonic clock passed in by the
caller) or its user's password changes: a session remembers the user's password epoch of its
logon, and the server ends every session of a user whose stored epoch differs
(:meth:`Sessions.end_user`). At most ``max_sessions`` are kept; the oldest go first.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

MAX_TOKEN_LENGTH = 128


@dataclass(frozen=True, slots=True)
class Session:
    user_id: int
    epoch: int
    user: str
    device_type: str
    device_id: str
    package_id: str
    expires_at: float


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "replace")).digest()


class Sessions:
    """The live sessions of one portal process."""

    def __init__(self, ttl: float, max_sessions: int = 100_000) -> None:
        self.ttl = ttl
        self.max_sessions = max_sessions
        self._by_digest: dict[bytes, Session] = {}

    def __len__(self) -> int:
        return len(self._by_digest)

    def create(
        self,
        *,
        user_id: int,
        epoch: int,
        user: str,
        device_type: str,
        device_id: str,
        package_id: str,
        now: float,
    ) -> str:
        """Start a session; returns its token (the only copy)."""
        token = secrets.token_urlsafe(32)
        session = Session(user_id, epoch, user, device_type, device_id, package_id, now + self.ttl)
        self._by_digest[_digest(token)] = session
        if len(self._by_digest) > self.max_sessions:
            self.prune(now)
            while len(self._by_digest) > self.max_sessions:
                del self._by_digest[next(iter(self._by_digest))]
        return token

    def get(self, token: str, now: float) -> Session | None:
        """The live session of ``token``, or None (unknown, malformed or expired)."""
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        key = _digest(token)
        session = self._by_digest.get(key)
        if session is None:
            return None
        if session.expires_at <= now:
            del self._by_digest[key]
            return None
        return session

    def end_user(self, user_id: int, keep_epoch: int | None = None) -> int:
        """End the sessions of ``user_id`` (all, or those of another epoch than
        ``keep_epoch``); returns how many."""
        ended = [
            k
            for k, s in self._by_digest.items()
            if s.user_id == user_id and (keep_epoch is None or s.epoch != keep_epoch)
        ]
        for key in ended:
            del self._by_digest[key]
        return len(ended)

    def prune(self, now: float) -> int:
        expired = [k for k, s in self._by_digest.items() if s.expires_at <= now]
        for key in expired:
            del self._by_digest[key]
        return len(expired)
