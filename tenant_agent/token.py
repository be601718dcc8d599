"""The agent's token over its life: renewed from ``token_file`` without a restart, and its
expiry watched.

A token is issued with a lifetime (``csc token issue --ttl``, 30 days by default) and the CSC
ends the sessions of an expired one. So that a tenant can put a new token in place before that
without a restart, :class:`AgentToken` re-reads ``token_file`` when its file changed (looked at
every :data:`CHECK_INTERVAL`, and on SIGHUP): a token that differs from the one in use becomes
the *candidate*. The agent dials with the candidate while there is one; the first session the
CSC welcomes with it makes it the token in use (:meth:`AgentToken.proven`), and the agent then
replaces its other sessions one by one, each new one up before the old one drains
(tenant_agent/agent.py). A candidate the CSC refuses (HTTP 401/403) is dropped and logged; the
agent goes on with the token in use, and tries the file again only once it changed again.

The expiry is read from the token's ``exp`` claim, without verifying the signature (the agent
does not hold the CSC's key and does not need to: the CSC verifies): it is logged, exported as a
metric, and warned about once a day from :data:`WARN_BEFORE` before it.

Invariants: the token in use is always one the CSC accepted last (or the configured one before
any session); a file that cannot be read or is empty changes nothing (a warning); no token is
ever logged.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from shared.config import Secret
from shared.jwtsegment import segment_json
from shared.timefmt import iso

log = logging.getLogger("csc_agent")

#: How often ``token_file`` is looked at (a ``stat``; read only when it changed).
CHECK_INTERVAL = 10.0
#: From how long before the token's expiry the agent warns (once a day).
WARN_BEFORE = 7 * 86400.0
WARN_EVERY = 86400.0


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (seconds since the epoch), unverified; None when the token
    is not a JWT with a numeric ``exp``."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = segment_json(parts[1])
    except (ValueError, RecursionError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, (int, float)):
        return None
    return float(exp)


def describe_expiry(expires: float | None, now: float) -> str:
    """``expires 2027-01-05T10:00:00Z (in 29.9 days)``, ``expired …``, or ``no expiry``."""
    if expires is None:
        return "no expiry (exp) that the agent can read"
    stamp = iso(expires)
    left = expires - now
    if left < 0:
        return f"expired {stamp}"
    if left >= 2 * 86400:
        return f"expires {stamp} (in {left / 86400:.1f} days)"
    return f"expires {stamp} (in {left / 3600:.1f} h)"


@dataclass(frozen=True)
class _Stamp:
    """What a change of the file changes (a renamed-in replacement changes ``inode``)."""

    inode: int
    size: int
    mtime_ns: int


class AgentToken:
    """The token in use, the candidate read from ``token_file``, and the expiry warnings."""

    def __init__(self, token: Secret, file: Path | None) -> None:
        self.current = token
        self.candidate: Secret | None = None
        self.file = file
        self._stamp = self._stat()
        self._refused: Secret | None = None
        self._warned: float | None = None

    @property
    def dial(self) -> Secret:
        """The token to connect with now: the candidate while there is one."""
        return self.candidate if self.candidate is not None else self.current

    @property
    def expires(self) -> float | None:
        return token_expiry(self.current.reveal())

    def _stat(self) -> _Stamp | None:
        if self.file is None:
            return None
        try:
            st = os.stat(self.file)
        except OSError:
            return None
        return _Stamp(st.st_ino, st.st_size, st.st_mtime_ns)

    def check_file(self) -> bool:
        """Re-read ``token_file`` if it changed; True when it now holds a token other than the
        one in use (and the one refused last): the new candidate."""
        if self.file is None:
            return False
        stamp = self._stat()
        if stamp is None or stamp == self._stamp:
            return False
        try:
            text = self.file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.warning(
                "token_file %s: cannot read: %s; keeping the token in use", self.file, reason
            )
            return False
        self._stamp = stamp
        if not text:
            log.warning("token_file %s: the file is empty; keeping the token in use", self.file)
            return False
        new = Secret(text)
        if new in (self.current, self.candidate, self._refused):
            return False
        self.candidate = new
        log.info(
            "token_file %s holds a new token (%s): renewing the sessions with it",
            self.file,
            describe_expiry(token_expiry(text), time.time()),
        )
        return True

    def proven(self, token: Secret) -> bool:
        """The CSC welcomed a session made with ``token``: if it is the candidate, it becomes
        the token in use; True then (the older sessions are to be renewed)."""
        if self.candidate is None or token != self.candidate:
            return False
        self.current, self.candidate = token, None
        self._warned = None
        return True

    def refused(self, token: Secret, why: str) -> bool:
        """The CSC refused ``token`` for good (401/403): if it is the candidate it is dropped
        and the agent goes on with the token in use; True then (not fatal)."""
        if self.candidate is None or token != self.candidate:
            return False
        self._refused, self.candidate = token, None
        log.error(
            "the new token in token_file %s was refused (%s); the agent goes on with the "
            "token in use, which %s",
            self.file,
            why,
            describe_expiry(self.expires, time.time()),
        )
        return True

    def warn_if_expiring(self, now: float) -> None:
        """Log a warning when the token in use expires within :data:`WARN_BEFORE` (at most
        once per :data:`WARN_EVERY`)."""
        expires = self.expires
        if expires is None or expires - now > WARN_BEFORE:
            return
        if self._warned is not None and now - self._warned < WARN_EVERY:
            return
        self._warned = now
        how = (
            f"put a new one in token_file {self.file} (the agent renews its sessions "
            "without a restart)"
            if self.file is not None
            else "restart the agent with a new one (with token_file it renews without a restart)"
        )
        log.warning("the agent token %s: %s", describe_expiry(expires, now), how)
