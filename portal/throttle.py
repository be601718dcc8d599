"""Logon throttling: lockouts after repeated failures, per key, and the password-check queue.

The server keeps two :class:`Throttle` families: one keyed by client address, and one keyed by
user name *and* client address, so failures from one address can never lock a user out at
another address (docs/provisioning.md). :class:`HashGate` bounds the logons waiting for argon2.

A key that collects ``failures`` failed logons within ``window`` seconds is locked out: every
logon for it is refused (429, ``Retry-After``) until the lockout ends, without checking the
password. The first lockout lasts ``lockout`` seconds, each further one twice as long as the one
before, up to ``max_lockout``; a key with no failure for ``max_lockout`` seconds starts afresh.
A successful logon clears a key (the server clears the user's key, never the address's).

Pure code: the caller passes the time (monotonic seconds), so tests never sleep. Memory is
bounded: at most ``max_entries`` keys are kept, the least recently failed ones go first.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Entry:
    failures: deque[float] = field(default_factory=deque)
    strikes: int = 0
    blocked_until: float = 0.0
    last_failure: float = 0.0


class Throttle:
    """Failure counting and lockouts for one family of keys."""

    def __init__(
        self,
        *,
        failures: int,
        window: float,
        lockout: float,
        max_lockout: float,
        max_entries: int = 100_000,
    ) -> None:
        if failures < 1 or window <= 0 or lockout <= 0 or max_lockout < lockout:
            raise ValueError("invalid throttle parameters")
        self.failures = failures
        self.window = window
        self.lockout = lockout
        self.max_lockout = max_lockout
        self.max_entries = max_entries
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def retry_after(self, key: str, now: float) -> float | None:
        """Seconds until ``key`` may try again, or None when it is not locked out."""
        entry = self._entries.get(key)
        if entry is None or entry.blocked_until <= now:
            return None
        return entry.blocked_until - now

    def failure(self, key: str, now: float) -> float | None:
        """Record a failed logon; returns the lockout it started, if any."""
        entry = self._entries.pop(key, None) or _Entry()
        self._entries[key] = entry  # re-insert: dict order is least recently failed first
        if entry.last_failure and now - entry.last_failure > self.max_lockout:
            entry.strikes = 0
        entry.last_failure = now
        while entry.failures and entry.failures[0] <= now - self.window:
            entry.failures.popleft()
        entry.failures.append(now)
        started = None
        if len(entry.failures) >= self.failures:
            entry.strikes += 1
            started = min(self.lockout * 2.0 ** (entry.strikes - 1), self.max_lockout)
            entry.blocked_until = now + started
            entry.failures.clear()
        self._evict(now)
        return started

    def success(self, key: str) -> None:
        self._entries.pop(key, None)

    def prune(self, now: float) -> int:
        """Forget keys that are neither locked out nor remembered; returns how many."""
        horizon = max(self.window, self.max_lockout)
        stale = [
            key
            for key, e in self._entries.items()
            if e.blocked_until <= now and now - e.last_failure > horizon
        ]
        for key in stale:
            del self._entries[key]
        return len(stale)

    def _evict(self, now: float) -> None:
        if len(self._entries) <= self.max_entries:
            return
        self.prune(now)
        while len(self._entries) > self.max_entries:
            del self._entries[next(iter(self._entries))]


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))


class HashGate:
    """Admission to the password checks: at most ``limit`` logons verifying or waiting at once.

    Thread-safe: the event loop enters, the worker thread that ran the check leaves (so a
    logon whose client went away still counts until its argon2 run is over)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the limit must be at least 1")
        self.limit = limit
        self._count = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._count

    def try_enter(self) -> bool:
        """Take a place; False when all ``limit`` are taken."""
        with self._lock:
            if self._count >= self.limit:
                return False
            self._count += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._count -= 1
