"""Reconnect policy as pure functions: tests drive them without sleeping.

Delays grow exponentially from ``initial`` and are capped at ``maximum``; "equal jitter" keeps
each delay in ``[base/2, base]`` so a fleet of agents that lost the same CSC does not reconnect
in lock step, while a delay never collapses to zero. A link that stayed up for ``reset_after``
seconds starts the sequence again.
"""

from __future__ import annotations

from dataclasses import dataclass

#: WebSocket close codes after which retrying cannot help (docs/protocol.md §8).
FATAL_CLOSE_CODES = frozenset({4401, 4403, 4426})
#: HTTP statuses of a refused upgrade after which retrying cannot help.
FATAL_HTTP_STATUSES = frozenset({401, 403, 404, 426})


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
