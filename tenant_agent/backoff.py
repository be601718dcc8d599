"""Reconnect policy as pure functions: tests drive them without sleeping.

Delays grow exponentially from ``initial`` and are capped at ``maximum``; "equal jitter" keeps
each delay in ``[base/2, base]`` so a fleet of agents that lost the same CSC does not reconnect
in lock step, while a delay never collapses to zero. A link that stayed up for ``reset_after``
seconds starts the sequence again.

A refusal that says when to come back (429 or 503 with ``Retry-After``) waits at least that long,
capped by the agent's ``retry_after_max`` and jittered upwards by up to 10 %
(:func:`retry_after_delay`); the backoff sequence goes on growing underneath.
"""

from __future__ import annotations

import datetime
import email.utils
from dataclasses import dataclass

#: WebSocket close codes after which retrying cannot help (docs/protocol.md §8).
FATAL_CLOSE_CODES = frozenset({4401, 4403, 4426})
#: HTTP statuses of a refused upgrade after which retrying cannot help.
FATAL_HTTP_STATUSES = frozenset({401, 403, 404, 426})
#: HTTP statuses of a refused upgrade whose ``Retry-After`` the agent honours.
RETRY_AFTER_STATUSES = frozenset({429, 503})
_MAX_RETRY_DIGITS = 12


def backoff_delay(attempt: int, initial: float, maximum: float, rand: float) -> float:
    """The delay before reconnect number ``attempt`` (0-based); ``rand`` is uniform in [0, 1)."""
    base: float = min(maximum, initial * 2.0 ** min(attempt, 60))
    return base / 2 + rand * base / 2


@dataclass(slots=True)
class Backoff:
    """Per-session reconnect state: how many attempts in a row have failed."""

    initial: float
    maximum: float
    reset_after: float
    attempt: int = 0

    def next_delay(self, rand: float) -> float:
        delay = backoff_delay(self.attempt, self.initial, self.maximum, rand)
        self.attempt += 1
        return delay

    def connected_for(self, seconds: float) -> None:
        """Report how long the last link stayed up; a stable one resets the sequence."""
        if seconds >= self.reset_after:
            self.attempt = 0


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from ``Retry-After: value`` (delta-seconds or an HTTP date, RFC 9110
    §10.2.3), ``now`` being the current Unix time; None when absent or malformed."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(text) if len(text) <= _MAX_RETRY_DIGITS else float("inf")
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": RFC 9110 dates are UTC
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - now)


def retry_after_delay(
    delay: float, retry_after: float | None, maximum: float, rand: float
) -> float:
    """The pause after a refusal that asked for ``retry_after`` seconds, given the backoff's own
    jittered ``delay`` and ``rand`` uniform in [0, 1): at least the wait asked for, capped at
    ``maximum``, plus up to a tenth of it as jitter (agents told the same time must not all
    come back at once), and never shorter than ``delay``."""
    if retry_after is None:
        return delay
    asked = min(retry_after, maximum)
    return max(delay, asked + rand * asked / 10)
