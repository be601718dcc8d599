"""Aliases: normalisation, validation and pattern matching, in one place for every component.

An alias is what a bootloader types: usually e-mail-like (``acme@example.com``), or a bare name
(``acme``). Aliases are case-insensitive; :func:`normalise_alias` is the only way in, and every
lookup uses its result. A *grant* (what a token lists) is an alias or a domain pattern
``*@example.com`` that covers every alias of that domain.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from shared.errors import BadAlias

MAX_ALIAS_LENGTH = 200

_LOCAL = r"[a-z0-9](?:[a-z0-9._+-]{0,62}[a-z0-9])?"
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})+"
_ALIAS_RE = re.compile(rf"(?:{_LOCAL}@{_DOMAIN}|{_LOCAL})")
_PATTERN_RE = re.compile(rf"\*@({_DOMAIN})")


def normalise_alias(raw: str) -> str:
    """Return the canonical form of ``raw`` or raise :class:`BadAlias` saying what is wrong."""
    if not isinstance(raw, str):
        raise BadAlias("the alias must be a string")
    if len(raw) > MAX_ALIAS_LENGTH:
        return _canonical(raw)
    return _remembered(raw)


def _canonical(raw: str) -> str:
    alias = raw.strip().lower()
    if not alias:
        raise BadAlias("the alias is empty")
    if len(alias) > MAX_ALIAS_LENGTH:
        raise BadAlias(f"the alias is longer than {MAX_ALIAS_LENGTH} characters")
    if not alias.isascii():
        raise BadAlias("the alias may contain ASCII letters, digits and . _ + - @ only")
    if _ALIAS_RE.fullmatch(alias) is None:
        raise BadAlias(
            f"{alias!r} is not a valid alias (expected name@domain.tld or a simple name of "
            "letters, digits, '.', '_', '+', '-')"
        )
    return alias


#: Every tunneled request normalises its alias: the forms seen lately skip the regular
#: expression. Only valid ones are kept (a refusal raises, and is not cached), of at most
#: MAX_ALIAS_LENGTH characters, and at most this many (least recently used go first), so a
#: client trying many aliases costs a bounded few hundred KiB.
_remembered = functools.lru_cache(maxsize=1024)(_canonical)


def is_pattern(grant: str) -> bool:
    return grant.startswith("*@")


def normalise_grant(raw: str) -> str:
    """Normalise an alias or a ``*@domain`` pattern (as listed in a token)."""
    grant = raw.strip().lower() if isinstance(raw, str) else raw
    if isinstance(grant, str) and is_pattern(grant):
        if _PATTERN_RE.fullmatch(grant) is None:
            raise BadAlias(f"{raw!r} is not a valid pattern (expected *@domain.tld)")
        return grant
    return normalise_alias(raw)


def grant_covers(grant: str, alias: str) -> bool:
    """Whether one normalised grant covers one normalised alias (or a pattern, exactly)."""
    if grant == alias:
        return True
    if is_pattern(grant) and not is_pattern(alias):
        return alias.endswith(grant[1:])
    return False


def covered(grants: Iterable[str], alias: str) -> bool:
    return any(grant_covers(g, alias) for g in grants)


def domain_of(alias: str) -> str | None:
    _, at, domain = alias.rpartition("@")
    return domain if at else None
