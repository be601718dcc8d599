"""What every ingress does around one stream: the tenant's stream slot, metrics, access log.

:class:`StreamUse` is what the HTTP ingress (csc/relay/http_ingress.py) and the TCP ingress
(csc/relay/tcp_ingress.py) hold once a stream is open: :meth:`StreamUse.start` counts the stream as
active (node drain waits for it, ``csc_streams_active``); :meth:`StreamUse.end` finishes the stream,
gives the tenant's slot back (csc/relay/routing.py ``release_stream``), records the request's
outcome, traffic and access-log event, exactly once, whatever way the request ended. The TCP
ingress uses it as an async context manager; the compiled HTTP ingress calls the two itself, since
an ``async with`` whose exit awaits is one of the constructs compiled code avoids
(shared/compiled.py). :func:`refused` is the same bookkeeping for a request that never got a
stream.

Invariants: ``stream`` may be replaced inside the block (an unprocessed request reopened on
another session holds its own slot); the outcome is ``cancelled`` when the block is cancelled,
``outcome`` when the ingress set one, else that of the stream's error (``ok`` without one).
"""

from __future__ import annotations

import time
from types import TracebackType

from csc.metrics import outcome_of
from csc.relay import accesslog
from csc.relay.routing import release_stream
from csc.state import NodeState
from shared.errors import Cancelled, CSCError
from shared.linkstream import TunnelStream


def _log(
    state: NodeState, record: accesslog.RequestRecord, tenant: str | None, outcome: str
) -> None:
    if accesslog.enabled(state.config.access_log):
        accesslog.request_done(record, tenant, outcome)


def refused(
    state: NodeState, record: accesslog.RequestRecord, tenant: str | None, err: CSCError
) -> None:
    """Count, record and log a request refused before a stream was opened for it."""
    state.metrics.request_done(record.kind, tenant, err.code, time.monotonic() - record.started)
    state.traffic.record(tenant, error=True, nbytes=0)
    if record.status is None:
        record.status = err.spec.http_status
    _log(state, record, tenant, err.code)


class StreamUse:
    """``async with StreamUse(state, record, tenant, stream) as use:`` around a relayed stream,
    or :meth:`start`, then :meth:`end` with the exception that ended the request, if any.

    The ingress keeps ``record`` (status, bytes in and out) up to date in between.
    """

    __slots__ = ("outcome", "record", "state", "stream", "tenant")

    def __init__(
        self,
        state: NodeState,
        record: accesslog.RequestRecord,
        tenant: str | None,
        stream: TunnelStream,
    ) -> None:
        self.state = state
        self.record = record
        self.tenant = tenant
        self.stream = stream
        #: Set by the ingress to override the outcome taken from the stream's error.
        self.outcome: str | None = None

    def start(self) -> None:
        self.state.stream_started()
        self.state.metrics.stream_started(self.tenant, self.record.kind)

    async def __aenter__(self) -> StreamUse:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.end(exc)

    async def end(self, exc: BaseException | None) -> None:
        """The request ended, by ``exc`` (None: it ran to its end)."""
        state, record, stream = self.state, self.record, self.stream
        if exc is not None and not isinstance(exc, Exception):
            outcome = Cancelled.code  # CancelledError (or an interpreter exit)
        elif exc is not None and not isinstance(exc, CSCError):
            outcome = self.outcome or "internal"
        else:
            outcome = self.outcome or outcome_of(stream.error)
        stream.finish()
        await release_stream(state, self.tenant or "", stream)
        state.stream_finished()
        state.metrics.stream_finished(record.kind)
        state.metrics.request_done(
            record.kind, self.tenant, outcome, time.monotonic() - record.started
        )
        failed = outcome != "ok" or (record.status or 0) >= 500
        state.traffic.record(self.tenant, error=failed, nbytes=record.bytes_in + record.bytes_out)
        _log(state, record, self.tenant, outcome)
