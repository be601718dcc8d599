"""Tenants, alias assignments and agent-token records: the CSC's managed objects, without I/O.

A *tenant* has an id (``acme``), a display name, a support contact, a state (``active`` or
``suspended``) and limits (agent sessions, concurrent streams, request rate; ``None`` means
unlimited). An *assignment* gives an alias or a ``*@domain`` pattern to exactly one tenant. A
:class:`Catalog` is an immutable snapshot of them (plus the revoked token ids and the operators'
token hashes) that the node answers lookups from; :mod:`csc.store` persists them.

Input from outside (the admin API's JSON bodies) is checked here, and every problem of one
input is reported at once (:class:`InvalidInput`). Invariants of a :class:`Catalog`: every assignment
names a tenant of the catalog; no pattern of one tenant covers an alias of another, so an alias
resolves to at most one tenant (:meth:`Catalog.owner`).
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from shared.aliases import domain_of, grant_covers, is_pattern, normalise_grant
from shared.errors import BadAlias
from shared.timefmt import iso
from shared.tokens import check_tenant_id, parse_ttl

ACTIVE, SUSPENDED = "active", "suspended"
TENANT_STATES = (ACTIVE, SUSPENDED)
MAX_NAME = 100
MAX_CONTACT = 100
LIMIT_NAMES = ("max_sessions", "max_streams", "max_request_rate")
LEGACY_TENANTS_FILE = "tenants.json"


class InvalidInput(ValueError):
    """An input with one or more problems (each a short sentence naming the field)."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class NotFound(LookupError):
    """The named tenant, alias, token or session does not exist."""


class Conflict(ValueError):
    """The change contradicts the current state (alias taken, tenant exists, ...).

    ``code`` is the admin API's error code for it.
    """

    def __init__(self, problems: Iterable[str], code: str = "conflict") -> None:
        self.problems = list(problems)
        self.code = code
        super().__init__("; ".join(self.problems))


class TenantsFileError(ValueError):
    """A legacy ``tenants.json`` exists but is not a valid ``{grant: tenant}`` object."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-tenant limits; ``None`` is unlimited. Stored and shown; enforced by the relay."""

    max_sessions: int | None = None
    max_streams: int | None = None
    max_request_rate: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in LIMIT_NAMES}


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    name: str
    contact: str = ""
    state: str = ACTIVE
    limits: Limits = field(default_factory=Limits)
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def suspended(self) -> bool:
        return self.state == SUSPENDED

    def public(self) -> dict[str, str]:
        """What a bootloader may be told: whom to call when the portal is unreachable."""
        return {"name": self.name, "contact": self.contact}

    def who(self) -> str:
        """``tenant Acme Corp, contact support@acme.example``, for messages to bootloaders."""
        return (
            f"tenant {self.name}, contact {self.contact}" if self.contact else f"tenant {self.name}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "contact": self.contact,
            "state": self.state,
            "limits": self.limits.to_json(),
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }


@dataclass(frozen=True, slots=True)
class Assignment:
    alias: str
    tenant: str
    assigned_at: float

    def to_json(self) -> dict[str, Any]:
        return {"alias": self.alias, "tenant": self.tenant, "assigned_at": iso(self.assigned_at)}


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """What is kept of an issued agent token: its metadata, never the token itself."""

    jti: str
    tenant: str
    aliases: tuple[str, ...]
    issued_at: float
    expires_at: float
    issued_by: str
    revoked_at: float | None = None
    revoked_by: str | None = None

    def status(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.expires_at <= now else "active"

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "jti": self.jti,
            "tenant": self.tenant,
            "aliases": list(self.aliases),
            "status": self.status(now),
            "issued_at": iso(self.issued_at),
            "expires_at": iso(self.expires_at),
            "issued_by": self.issued_by,
            "revoked_at": iso(self.revoked_at),
            "revoked_by": self.revoked_by,
        }


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes a change, for the audit log: an operator name and where the request came from."""

    operator: str
    remote: str


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: float
    operator: str
    remote: str
    action: str
    target: str
    details: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": iso(self.at),
            "operator": self.operator,
            "remote": self.remote,
            "action": self.action,
            "target": self.target,
            "details": dict(self.details),
        }


# --- the catalog -------------------------------------------------------------------------------


def conflicts(assigned: Mapping[str, str], tenant: str, grants: Iterable[str]) -> list[str]:
    """Every way ``grants`` would collide with another tenant's assignments."""
    problems: list[str] = []
    for grant in grants:
        for held, owner in assigned.items():
            if owner == tenant:
                continue
            if held == grant:
                problems.append(f"{grant!r} belongs to tenant {owner!r}")
            elif grant_covers(held, grant):
                problems.append(f"{grant!r} is covered by {held!r} of tenant {owner!r}")
            elif grant_covers(grant, held):
                problems.append(f"{grant!r} would cover {held!r} of tenant {owner!r}")
    return problems


@dataclass(frozen=True, slots=True)
class Catalog:
    """A snapshot of the managed objects a node needs on its hot path."""

    tenants: Mapping[str, Tenant] = field(default_factory=dict)
    assigned: Mapping[str, str] = field(default_factory=dict)  # grant -> tenant id
    revoked: frozenset[str] = frozenset()
    operators: Mapping[str, str] = field(default_factory=dict)  # token sha256 -> name

    def owner(self, grant: str) -> str | None:
        """The tenant a normalised alias (or, exactly, a pattern) is assigned to, or None."""
        tenant = self.assigned.get(grant)
        if tenant is not None or is_pattern(grant):
            return tenant
        domain = domain_of(grant)
        return None if domain is None else self.assigned.get(f"*@{domain}")

    def aliases_of(self, tenant: str) -> list[str]:
        return sorted(g for g, t in self.assigned.items() if t == tenant)

    def not_assigned(self, tenant: str, grants: Iterable[str]) -> list[str]:
        """One sentence for each grant that is not the tenant's (naming the owner if any)."""
        problems: list[str] = []
        for grant in grants:
            owner = self.owner(grant)
            if owner is None:
                problems.append(f"{grant!r} is not assigned to tenant {tenant!r}")
            elif owner != tenant:
                problems.append(f"{grant!r} belongs to tenant {owner!r}, not {tenant!r}")
        return problems


# --- input checks ------------------------------------------------------------------------------


def _text(data: Mapping[str, Any], name: str, limit: int, problems: list[str]) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        problems.append(f"{name}: expected a string")
        return None
    value = value.strip()
    if len(value) > limit:
        problems.append(f"{name}: longer than {limit} characters")
    elif any(unicodedata.category(ch) in ("Cc", "Cf") for ch in value):
        problems.append(f"{name}: control characters are not allowed")
    return value


def _limit(name: str, value: object, problems: list[str]) -> int | float | None:
    if value is None:
        return None
    if name == "max_request_rate":
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            problems.append(f"limits.{name}: expected a positive number or null")
            return None
        return float(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        problems.append(f"limits.{name}: expected a whole number >= 1 or null")
        return None
    return value


def _limits_patch(value: object, problems: list[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append("limits: expected an object")
        return {}
    patch: dict[str, Any] = {}
    for name, item in value.items():
        if name not in LIMIT_NAMES:
            problems.append(f"limits.{name}: unknown limit (known: {', '.join(LIMIT_NAMES)})")
            continue
        patch[name] = _limit(name, item, problems)
    return patch


def _object(data: object, known: Iterable[str], problems: list[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise InvalidInput(["the body must be a JSON object"])
    allowed = set(known)
    problems.extend(f"{key}: unknown field" for key in data if key not in allowed)
    return data


def _state(data: Mapping[str, Any], problems: list[str]) -> str | None:
    state = data.get("state")
    if state is not None and state not in TENANT_STATES:
        problems.append(f"state: expected one of {', '.join(TENANT_STATES)}")
        return None
    return state if isinstance(state, str) else None


_TENANT_FIELDS = ("id", "name", "contact", "state", "limits")


def parse_new_tenant(data: object, now: float) -> Tenant:
    """A tenant from a create request ``{"id", "name"?, "contact"?, "state"?, "limits"?}``."""
    problems: list[str] = []
    body = _object(data, _TENANT_FIELDS, problems)
    tenant_id = body.get("id")
    if not isinstance(tenant_id, str):
        problems.append("id: required (a string)")
    else:
        try:
            check_tenant_id(tenant_id)
        except ValueError as exc:
            problems.append(f"id: {exc}")
    name = _text(body, "name", MAX_NAME, problems)
    contact = _text(body, "contact", MAX_CONTACT, problems)
    state = _state(body, problems)
    limits = Limits(**_limits_patch(body.get("limits"), problems))
    if problems:
        raise InvalidInput(problems)
    assert isinstance(tenant_id, str)
    return Tenant(
        id=tenant_id,
        name=name or tenant_id,
        contact=contact or "",
        state=state or ACTIVE,
        limits=limits,
        created_at=now,
        updated_at=now,
    )


@dataclass(frozen=True, slots=True)
class TenantUpdate:
    """A partial change of a tenant; ``None`` fields stay as they are."""

    name: str | None = None
    contact: str | None = None
    state: str | None = None
    limits: Mapping[str, Any] = field(default_factory=dict)

    def apply(self, tenant: Tenant, now: float) -> Tenant:
        limits = replace(tenant.limits, **self.limits) if self.limits else tenant.limits
        return replace(
            tenant,
            name=tenant.name if self.name is None else (self.name or tenant.id),
            contact=tenant.contact if self.contact is None else self.contact,
            state=self.state or tenant.state,
            limits=limits,
            updated_at=now,
        )


def parse_tenant_update(data: object) -> TenantUpdate:
    """A change from ``{"name"?, "contact"?, "state"?, "limits"?: {name: value|null}}``."""
    problems: list[str] = []
    body = _object(data, _TENANT_FIELDS[1:], problems)
    update = TenantUpdate(
        name=_text(body, "name", MAX_NAME, problems),
        contact=_text(body, "contact", MAX_CONTACT, problems),
        state=_state(body, problems),
        limits=_limits_patch(body.get("limits"), problems),
    )
    if problems:
        raise InvalidInput(problems)
    return update


def parse_grants(value: object, name: str, problems: list[str]) -> list[str]:
    """A non-empty list of aliases or patterns, normalised and de-duplicated."""
    if not isinstance(value, list) or not value:
        problems.append(f"{name}: expected a non-empty list of aliases")
        return []
    grants: list[str] = []
    for i, raw in enumerate(value):
        try:
            grant = normalise_grant(raw)
        except BadAlias as exc:
            problems.append(f"{name}[{i}]: {exc.message}")
            continue
        if grant not in grants:
            grants.append(grant)
    return grants


def parse_ttl_value(value: object, problems: list[str]) -> float | None:
    """A token lifetime from ``"30d"``-style text or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        problems.append("ttl: expected a duration such as '30d' or a number of seconds")
        return None
    try:
        return parse_ttl(value)
    except ValueError as exc:
        problems.append(f"ttl: {exc}")
        return None


# --- the legacy tenants.json -------------------------------------------------------------------


def read_legacy_tenants(path: Path) -> dict[str, str]:
    """The ``{grant: tenant}`` map of a ``tenants.json`` written by earlier versions."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise TenantsFileError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise TenantsFileError(f"{path}: expected a JSON object of grant -> tenant")
    result: dict[str, str] = {}
    for grant, tenant in data.items():
        try:
            result[normalise_grant(grant)] = check_tenant_id(tenant)
        except (BadAlias, ValueError) as exc:
            message = exc.message if isinstance(exc, BadAlias) else str(exc)
            raise TenantsFileError(f"{path}: entry {grant!r}: {message}") from None
    return result
