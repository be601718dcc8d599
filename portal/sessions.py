"""Logon sessions: random bearer tokens bound to a user, a device type and one package.

Invariants: a token is 32 random bytes (URL-safe base64) handed out once; only its SHA-256 is
kept, in memory, so neither a memory dump nor a log line can replay it; a session grants exactly
the package of its own logon until it expires (``ttl`` seconds, monotonic clock passed in by the
caller). At most ``max_sessions`` are kept; the oldest go first.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

MAX_TOKEN_LENGTH = 128


@dataclass(frozen=True, slots=True)
class Session:
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
        self, *, user: str, device_type: str, device_id: str, package_id: str, now: float
    ) -> str:
        """Start a session; returns its token (the only copy)."""
        token = secrets.token_urlsafe(32)
        session = Session(user, device_type, device_id, package_id, now + self.ttl)
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

    def prune(self, now: float) -> int:
        expired = [k for k, s in self._by_digest.items() if s.expires_at <= now]
        for key in expired:
            del self._by_digest[key]
        return len(expired)
