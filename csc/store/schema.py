"""The store's schema, one list of steps for every backend.

``MIGRATIONS[n]`` upgrades schema version ``n`` to ``n + 1``. Statements use the type tokens
``{text}``, ``{real}`` and ``{serial}`` that each backend's dialect spells
(:class:`csc.store.backend.Dialect`); otherwise they are plain SQL both databases accept. A
step, once released, is never edited: a change is a new step.
"""

from __future__ import annotations

_V1 = (
    """CREATE TABLE tenants (
        id {text} PRIMARY KEY,
        name {text} NOT NULL,
        contact {text} NOT NULL DEFAULT '',
        state {text} NOT NULL CHECK (state IN ('active', 'suspended')),
        max_sessions INTEGER,
        max_streams INTEGER,
        max_request_rate {real},
        created_at {real} NOT NULL,
        updated_at {real} NOT NULL)""",
    """CREATE TABLE aliases (
        alias {text} PRIMARY KEY,
        tenant {text} NOT NULL REFERENCES tenants(id),
        assigned_at {real} NOT NULL)""",
    "CREATE INDEX aliases_by_tenant ON aliases(tenant)",
    """CREATE TABLE tokens (
        jti {text} PRIMARY KEY,
        tenant {text} NOT NULL,
        aliases {text} NOT NULL,
        issued_at {real} NOT NULL,
        expires_at {real} NOT NULL,
        issued_by {text} NOT NULL)""",
    "CREATE INDEX tokens_by_tenant ON tokens(tenant)",
    """CREATE TABLE revoked (
        jti {text} PRIMARY KEY,
        revoked_at {real} NOT NULL,
        revoked_by {text} NOT NULL,
        expires_at {real})""",
    """CREATE TABLE operators (
        name {text} PRIMARY KEY,
        token_sha256 {text} NOT NULL UNIQUE,
        created_at {real} NOT NULL)""",
    """CREATE TABLE audit (
        id {serial},
        at {real} NOT NULL,
        operator {text} NOT NULL,
        remote {text} NOT NULL,
        action {text} NOT NULL,
        target {text} NOT NULL,
        details {text} NOT NULL)""",
)

#: The agent-token signing key shared by the nodes of a cluster (PEM, at most one row); used
#: only when no ``signing_key_file`` is configured (:mod:`csc.signing`).
_V2 = (
    """CREATE TABLE signing_key (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        pem {text} NOT NULL,
        created_at {real} NOT NULL)""",
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1, _V2)
