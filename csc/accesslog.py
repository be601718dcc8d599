"""The CSC's access log: one event per bootloader request when it ends (logger ``csc.access``).

Each tunneled HTTP request and each TCP ingress connection, refused or relayed, ends with one
event at ``info``: ``request_id``, ``tenant``, ``alias``, ``kind``, ``method`` and ``path``
(HTTP), ``status`` (the HTTP status the bootloader got; for TCP the ``ERR`` status, or none once
``OK`` was sent), ``outcome`` (``ok`` or the error code), ``bytes_in`` (body bytes from the
bootloader), ``bytes_out`` (body bytes to it), ``duration_ms`` and ``client``.

Invariants: no header other than the request id, no query string (it can hold credentials:
:func:`path_only` cuts it) and no body ever reaches the event; nothing is built when
``access_log`` is off or the ``csc.access`` logger is disabled at ``info`` (``log_level =
warning``). The event goes through :func:`shared.logsetup.log_event`, which writes the same line
as ``log.info`` for well under half the cost, since this runs once per request (the remaining
cost is in docs/operations.md, "Logs").
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from shared.logsetup import log_event

log = logging.getLogger("csc.access")


def path_only(target: str) -> str:
    """``target`` without its query string or fragment."""
    for mark in ("?", "#"):
        cut = target.find(mark)
        if cut >= 0:
            target = target[:cut]
    return target


@dataclass(slots=True)
class RequestRecord:
    """What the access log says of one request, filled in as the request goes."""

    kind: str
    request_id: str
    client: str
    started: float
    alias: str = ""
    method: str = ""
    path: str = ""
    status: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0


def enabled(access_log: bool) -> bool:
    """Whether an event would be written (checked before anything is built): the setting
    ``access_log`` is on and the logger writes ``info``."""
    return access_log and log.isEnabledFor(logging.INFO)


def request_done(record: RequestRecord, tenant: str | None, outcome: str) -> None:
    """Write the event of a request that ended with ``outcome`` (``ok`` or an error code)."""
    duration_ms = round((time.monotonic() - record.started) * 1000, 1)
    if record.kind == "http":
        what = f"{record.method} /t/{record.alias}{record.path}"
    else:
        what = f"CONNECT {record.alias}"
    status = record.status if record.status is not None else "-"
    log_event(
        log,
        logging.INFO,
        f"{what} -> {status} {outcome}",
        {
            "request_id": record.request_id,
            "tenant": tenant or "",
            "alias": record.alias,
            "kind": record.kind,
            "method": record.method,
            "path": record.path,
            "status": record.status,
            "outcome": outcome,
            "bytes_in": record.bytes_in,
            "bytes_out": record.bytes_out,
            "duration_ms": duration_ms,
            "client": record.client,
        },
    )
