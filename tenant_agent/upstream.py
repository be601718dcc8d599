"""The agent's side of a stream: a request to the configured upstream, answered on the stream.

Only the upstreams in the agent's own configuration are ever contacted: an ``http`` stream's
target is a path appended to ``upstream``, a ``tcp`` stream always goes to ``tcp_upstream``;
nothing the CSC sends can name another host. HTTP goes through one pooled keep-alive client
(:mod:`tenant_agent.http_upstream`); bodies stream both ways and received bytes are credited
back only once written upstream.

Logs carry the stream's request id (from its OPEN, also sent to the portal as ``X-Request-Id``):
every upstream failure at ``info``, and at ``debug`` one line per stream when it ends (kind,
alias, method, path without its query string, outcome, duration). Never a header value, a
query string or a body.
"""

from __future__ import annotations

import asyncio
import logging
import time

from shared.aio import splice
from shared.errors import (
    CSCError,
    ProtocolError,
    UpstreamRefused,
    UpstreamReset,
    UpstreamTimeout,
)
from shared.linkstream import LinkStream
from tenant_agent.config import AgentConfig
from tenant_agent.http_upstream import SMALL_BODY, HttpUpstream
from tenant_agent.metrics import AgentMetrics

__all__ = ["READ_LIMIT", "SMALL_BODY", "Upstreams"]

log = logging.getLogger("csc_agent.upstream")

READ_LIMIT = 256 * 1024


class Upstreams:
    """The configured upstreams and the client pool used to reach them."""

    def __init__(self, config: AgentConfig, *, metrics: AgentMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else AgentMetrics()
        self.base = config.upstream.rstrip("/")
        self.tcp = config.tcp_upstream_address
        self.http = HttpUpstream(
            config.upstream,
            connect_timeout=config.upstream_connect_timeout,
            read_timeout=config.upstream_timeout,
        )

    async def start(self) -> None:
        """Nothing to prepare: connections are opened on demand."""

    async def close(self) -> None:
        await self.http.close()

    async def handle(self, stream: LinkStream) -> None:
        kind = stream.info.get("kind")
        if kind not in ("http", "tcp"):
            stream.reject(ProtocolError(f"unknown stream kind {kind!r}"))
            return
        self.metrics.stream_started(kind)
        started = time.monotonic()
        try:
            await (self._http(stream) if kind == "http" else self._tcp(stream))
        finally:
            self._ended(stream, kind, started)

    def handle_now(self, stream: LinkStream) -> bool:
        """The link's short way (``on_stream_now``): an ``http`` stream without a body, whose
        FIN came with its OPEN, is served by callbacks when a pooled connection is idle
        (tenant_agent/http_quick.py); False leaves the stream to :meth:`handle`."""
        if stream.info.get("kind") != "http":
            return False
        started = time.monotonic()

        def ended() -> None:
            self._ended(stream, "http", started)
            stream.finish()  # what the link's handler task does when it returns

        quick = self.http.quick(stream, ended)
        if quick is None:
            return False
        self.metrics.stream_started("http")
        quick.start()
        return True

    def _ended(self, stream: LinkStream, kind: str, started: float) -> None:
        self.metrics.stream_finished(kind, stream.error)
        if log.isEnabledFor(logging.DEBUG):
            _log_stream(stream, kind, started)

    async def _http(self, stream: LinkStream) -> None:
        await self.http.handle(stream)

    async def _tcp(self, stream: LinkStream) -> None:
        if self.tcp is None:
            stream.reject(UpstreamRefused("this agent has no TCP upstream configured"))
            return
        host, port = self.tcp
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=READ_LIMIT),
                self.config.upstream_connect_timeout,
            )
        except TimeoutError:
            _refuse(stream, UpstreamTimeout(f"connecting to {host}:{port} timed out"))
            return
        except OSError as exc:
            reason = exc.strerror or exc.__class__.__name__
            _refuse(stream, UpstreamRefused(f"connecting to {host}:{port} failed: {reason}"))
            return
        stream.accept({})
        try:
            await splice(stream, reader, writer, reset_code=UpstreamReset.code)
        finally:
            writer.close()


def _refuse(stream: LinkStream, err: CSCError) -> None:
    request_id = stream.info.get("request_id", "")
    log.info(
        "request %s: %s",
        request_id,
        err.message,
        extra={"request_id": request_id, "code": err.code},
    )
    stream.reject(err.public())  # the address stays in this log


def _log_stream(stream: LinkStream, kind: str, started: float) -> None:
    """The debug line of a stream that ended (no header, query string or body)."""
    info = stream.info
    target = str(info.get("target", ""))
    error = stream.error
    log.debug(
        "stream %s %s ended: %s",
        kind,
        info.get("alias", ""),
        "ok" if error is None else error.code,
        extra={
            "request_id": info.get("request_id", ""),
            "kind": kind,
            "alias": info.get("alias", ""),
            "method": info.get("method", ""),
            "path": target.partition("?")[0].partition("#")[0],
            "outcome": "ok" if error is None else error.code,
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
        },
    )
