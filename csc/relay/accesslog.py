"""The CSC's access log: one event per bootloader request when it ends (logger ``csc.access``).

Each tunneled HTTP request and each TCP ingress connection, refused or relayed, ends with one
event at ``info``: ``request_id``, ``tenant``, ``alias``, ``kind``, ``method`` and ``path``
(HTTP), ``status`` (the HTTP status the bootloader got; for TCP the ``ERR`` status, or none once
``OK`` was sent), ``outcome`` (``ok`` or the error code), ``bytes_in`` (body bytes from the
bootloader), ``bytes_out`` (body bytes to it), ``duration_ms`` and ``client``.

Invariants: no header other than the request id, no query string (it can hold credentials:
:func:`path_only` cuts it) and no body ever reaches the event; nothing is built when
``access_log`` is off or the ``csc.access`` logger is disabled at ``info`` (``log_level =
warning``).

Cost: this runs once per request, so :func:`request_done` only stamps the time and appends a
tuple of the fields to a buffer (about 1 µs). Inside a running event loop the buffer is written
``FLUSH_SECONDS`` later (``loop.call_later``), or at once when it holds ``MAX_BATCH`` events: all
lines are rendered by a preformatted template (the same line :mod:`shared.logsetup` writes,
checked by the unit tests) and go to the stream in one write, instead of one rendered line and
one ``write``+``flush`` per request (30 to 40 µs a request when stderr is a pipe). Outside a loop
(tools, unit tests) the event is written at once. Nothing is lost: :func:`flush` writes what is
buffered, and runs at interpreter exit (``atexit``); a line is late by at most
``FLUSH_SECONDS``. Lines carry the time the request ended, not the time of the write. When
anything other than the handler of :func:`shared.logsetup.configure_logging` would see the
event (another handler, a filter, a test's capture handler), the buffered events go through
:mod:`logging` with their own times. Called from the event loop's thread (or with no loop).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import time
from dataclasses import dataclass
from json.encoder import encode_basestring
from typing import Any

from shared import logsetup

log = logging.getLogger("csc.access")

#: how long an event may wait in the buffer, and how many events make a write at once
FLUSH_SECONDS = 0.05
MAX_BATCH = 512

# (ended at (wall clock), duration_ms, kind, request_id, client, alias, method, path, status,
#  bytes_in, bytes_out, tenant, outcome)
_Entry = tuple[float, float, str, str, str, str, str, str, int | None, int, int, str, str]
_pending: list[_Entry] = []
_timer_loop: list[asyncio.AbstractEventLoop | None] = [None]  # the loop a flush is due on


def path_only(target: str) -> str:
    """``target`` without its query string or fragment."""
    for mark in ("?", "#"):
        cut = target.find(mark)
        if cut >= 0:
            target = target[:cut]
    return target


@dataclass(slots=True, init=False)
class RequestRecord:
    """What the access log says of one request, filled in as the request goes."""

    kind: str
    request_id: str
    client: str
    started: float
    alias: str
    method: str
    path: str
    status: int | None
    bytes_in: int
    bytes_out: int

    # written out: mypyc compiles it (see shared/protocol/events.py)
    def __init__(
        self, kind: str, request_id: str, client: str, started: float, alias: str = ""
    ) -> None:
        self.kind = kind
        self.request_id = request_id
        self.client = client
        self.started = started
        self.alias = alias
        self.method = self.path = ""
        self.status = None
        self.bytes_in = self.bytes_out = 0


def enabled(access_log: bool) -> bool:
    """Whether an event would be written (checked before anything is built): the setting
    ``access_log`` is on and the logger writes ``info``."""
    return access_log and log.isEnabledFor(logging.INFO)


def request_done(record: RequestRecord, tenant: str | None, outcome: str) -> None:
    """Log the event of a request that ended with ``outcome`` (``ok`` or an error code):
    buffered inside a running event loop, written at once outside one."""
    _pending.append(
        (
            time.time(),
            round((time.monotonic() - record.started) * 1000, 1),
            record.kind,
            record.request_id,
            record.client,
            record.alias,
            record.method,
            record.path,
            record.status,
            record.bytes_in,
            record.bytes_out,
            tenant or "",
            outcome,
        )
    )
    due = _timer_loop[0]
    if due is not None and due.is_running():  # a flush is due on the loop that runs this
        if len(_pending) >= MAX_BATCH:
            flush()
        return
    try:
        loop = asyncio.get_running_loop()  # a system call (getpid): only when none is due
    except RuntimeError:
        flush()
        return
    if len(_pending) >= MAX_BATCH:
        flush()
    elif _timer_loop[0] is not loop:  # no flush due on this loop yet
        _timer_loop[0] = loop
        loop.call_later(FLUSH_SECONDS, _timer_flush)


def _timer_flush() -> None:
    _timer_loop[0] = None
    flush()


def flush() -> None:
    """Write every buffered event (in order), in one write when the stream is ours."""
    if not _pending:
        return
    batch = _pending[:]
    del _pending[: len(batch)]
    output = logsetup.direct_output(log, logging.INFO)
    if output is None:
        for entry in batch:
            _through_logging(entry)
        return
    handler, fmt, component = output
    render = _render_json if fmt == "json" else _render_text
    head = _json_head(component) if fmt == "json" else f"INFO {component} {log.name}: "
    end = handler.terminator
    text = "".join([render(head, entry) + end for entry in batch])
    handler.acquire()
    try:
        handler.stream.write(text)
        handler.flush()
    finally:
        handler.release()


atexit.register(flush)


def _message(entry: _Entry) -> str:
    what = f"{entry[6]} /t/{entry[5]}{entry[7]}" if entry[2] == "http" else f"CONNECT {entry[5]}"
    return f"{what} -> {'-' if entry[8] is None else entry[8]} {entry[12]}"


def _fields(entry: _Entry) -> dict[str, Any]:
    """The event's fields, in the order the log line has them."""
    return {
        "request_id": entry[3],
        "tenant": entry[11],
        "alias": entry[5],
        "kind": entry[2],
        "method": entry[6],
        "path": entry[7],
        "status": entry[8],
        "outcome": entry[12],
        "bytes_in": entry[9],
        "bytes_out": entry[10],
        "duration_ms": entry[1],
        "client": entry[4],
    }


def _json_head(component: str) -> str:
    return f'"level": "info", "component": {encode_basestring(component)}, "logger": "csc.access"'


def _render_json(head: str, entry: _Entry) -> str:
    """The line :func:`shared.logsetup.render_event` writes for the event, without its
    generic per-field work (the fields and their types are known)."""
    enc = encode_basestring
    status = "null" if entry[8] is None else str(entry[8])
    line = (
        f'{{"ts": "{logsetup.fast_stamp(entry[0])}", {head}, "msg": {enc(_message(entry))}, '
        f'"request_id": {enc(entry[3])}, "tenant": {enc(entry[11])}, "alias": {enc(entry[5])}, '
        f'"kind": {enc(entry[2])}, "method": {enc(entry[6])}, "path": {enc(entry[7])}, '
        f'"status": {status}, "outcome": {enc(entry[12])}, "bytes_in": {entry[9]}, '
        f'"bytes_out": {entry[10]}, "duration_ms": {entry[1]!r}, "client": {enc(entry[4])}}}'
    )
    return logsetup.redact(line)


def _render_text(head: str, entry: _Entry) -> str:
    extras = " ".join(f"{key}={value}" for key, value in _fields(entry).items())
    line = f"{logsetup.fast_stamp(entry[0])} {head}{_message(entry)} {extras}"
    return logsetup.redact(line.replace("\n", "\n    "))


def _through_logging(entry: _Entry) -> None:
    """The event as a :class:`logging.LogRecord` with the time the request ended."""
    record = log.makeRecord(
        log.name, logging.INFO, __file__, 0, "%s", (_message(entry),), None, extra=_fields(entry)
    )
    record.created, record.msecs = entry[0], int((entry[0] - int(entry[0])) * 1000)
    log.handle(record)
