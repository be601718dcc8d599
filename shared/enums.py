"""An :class:`~enum.Enum` base whose members hash by identity.

``Enum.__hash__`` is a Python function (it hashes the member's name), so every dictionary or set
lookup keyed by a member runs interpreter code. The stream and exchange state machines look up
their transition tables several times per relayed request, on both sides of the link; members
are singletons compared by identity, so hashing them by identity is equivalent and runs in C.
"""

from __future__ import annotations

from enum import Enum


class FastEnum(Enum):
    """Subclass instead of :class:`~enum.Enum` for enums used as keys on hot paths."""

    __hash__ = object.__hash__
