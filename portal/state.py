"""The running portal's shared state (:class:`PortalState`), its ``AppKey``, and API errors.

One :class:`PortalState` per application: the configuration, the database, the signing key, the
password hasher and its executor, the package builder, live sessions and the logon throttles.
Blocking helpers here (``plan``, ``record_device``, ``device_type_names``) are meant to run on a
worker thread; each opens its own database connection. ``clock`` is monotonic seconds and can be
replaced by tests.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from aiohttp import web

from portal import store
from portal.catalog import PackagePlan, plan_package
from portal.config import PortalConfig
from portal.db import Database
from portal.keys import PortalKey, load_or_create_key
from portal.packages import PackageBuilder
from portal.passwords import Passwords
from portal.sessions import Sessions
from portal.throttle import HashGate, Throttle
from shared.peers import TrustedPeers

#: Per-request values the middleware sets.
REQUEST_ID = web.RequestKey("portal_request_id", str)
CLIENT = web.RequestKey("portal_client", str)
PREPARED = web.RequestKey("portal_prepared", bool)


class ApiError(Exception):
    """An error answer: status, stable code and one-sentence message (JSON body)."""

    def __init__(
        self, status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        body = json.dumps({"error": self.code, "message": self.message})
        return web.Response(
            status=self.status, text=body, content_type="application/json", headers=self.headers
        )


@dataclass
class PortalState:
    config: PortalConfig
    db: Database
    key: PortalKey
    passwords: Passwords
    builder: PackageBuilder
    sessions: Sessions
    #: keyed by :func:`user_address_key` (a user at one client address)
    user_throttle: Throttle
    address_throttle: Throttle
    trusted: TrustedPeers
    #: logons verifying or waiting for a verification (at most workers + queue)
    hash_gate: HashGate
    executor: ThreadPoolExecutor | None = None
    pyz: bytes | None = None
    #: the zipapp's files, to build the variants preset for the CSC a request came through
    pyz_entries: dict[str, bytes] | None = None
    #: those variants, by their preset (a few: one per CSC URL and key)
    pyz_presets: dict[str, bytes] = field(default_factory=dict)
    #: the PEM text of ``csc_ca_file``, built into the presets
    csc_ca: str | None = None
    pyz_error: str = "the bootloader has not been built yet"
    clock: Callable[[], float] = field(default=time.monotonic)

    def password_epoch(self, user_id: int) -> int | None:
        with self.db.connect() as conn:
            return store.password_epoch(conn, user_id)

    def device_type_names(self) -> list[str]:
        with self.db.connect() as conn:
            return [d.name for d in store.list_device_types(conn)]

    def device_types(self) -> list[store.DeviceTypeInfo]:
        with self.db.connect() as conn:
            return store.list_device_types(conn)

    def plan(self, user_id: int, device_type_id: int) -> PackagePlan:
        with self.db.connect() as conn:
            return plan_package(conn, user_id, device_type_id)

    def record_device(
        self, user_id: int, device_type_id: int, device_id: str, package_id: str, address: str
    ) -> None:
        with self.db.connect() as conn:
            store.record_device(
                conn,
                uid=user_id,
                dtid=device_type_id,
                device_id=device_id,
                package_id=package_id,
                address=address,
            )


STATE = web.AppKey("portal_state", PortalState)


def user_address_key(user: str, client: str) -> str:
    """The failure-throttle key of ``user`` (normalised name) logging on from ``client`` (an IP
    address or ``unknown``, never containing a space, so the key is unambiguous)."""
    return f"{client} {user}"


def _throttle(config: PortalConfig, failures: int) -> Throttle:
    return Throttle(
        failures=failures,
        window=config.throttle_window,
        lockout=config.throttle_lockout,
        max_lockout=config.throttle_max_lockout,
    )


def build_state(config: PortalConfig) -> tuple[PortalState, bool]:
    """Open (creating and migrating) the database and the key; returns (state, key created).

    Raises :class:`portal.db.DatabaseError` or :class:`portal.keys.PortalKeyError`."""
    db = Database(config.state_dir)
    db.open()
    key, created = load_or_create_key(config.state_dir)
    state = PortalState(
        config=config,
        db=db,
        key=key,
        passwords=Passwords(config.password_hash_cost),
        builder=PackageBuilder(db, config.state_dir, key, config.name),
        sessions=Sessions(config.session_ttl),
        user_throttle=_throttle(config, config.throttle_failures),
        address_throttle=_throttle(config, config.throttle_address_failures),
        trusted=TrustedPeers(config.trusted_proxies),
        hash_gate=HashGate(config.hash_workers + config.hash_queue_limit),
    )
    return state, created
