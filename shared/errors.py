"""Typed errors of the relay and the one table that translates them.

Every error that can reach a peer (a bootloader over HTTP or the TCP ingress, an agent over the
WebSocket link, a stream over the multiplexer) is a subclass of :class:`CSCError` with a stable
``code``. :data:`ERRORS` maps each code to its HTTP status, WebSocket close code, TCP ``ERR``
number and log level, so translation happens in exactly one place. Internal details never reach
the peer: only ``code`` and ``message`` do.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    code: str
    http_status: int
    close_code: int
    log_level: int
    default_message: str


_INFO, _WARN, _ERR = logging.INFO, logging.WARNING, logging.ERROR

#: code -> how it is presented on every surface (docs/protocol.md §8 lists the close codes).
ERRORS: dict[str, ErrorSpec] = {
    s.code: s
    for s in (
        ErrorSpec("bad_request", 400, 4400, _INFO, "the request is malformed"),
        ErrorSpec("bad_alias", 400, 4400, _INFO, "the alias is malformed"),
        ErrorSpec("auth_failed", 401, 4401, _WARN, "authentication failed"),
        ErrorSpec("alias_forbidden", 403, 4403, _WARN, "the token does not cover this alias"),
        ErrorSpec("unknown_alias", 404, 4404, _INFO, "no tenant serves this alias"),
        ErrorSpec("alias_taken", 409, 4409, _WARN, "the alias is held by another tenant"),
        ErrorSpec("not_found", 404, 4404, _INFO, "nothing is served at this path"),
        ErrorSpec("method_not_allowed", 405, 4405, _INFO, "the method is not allowed here"),
        ErrorSpec("request_timeout", 408, 4408, _INFO, "the request was not received in time"),
        ErrorSpec("payload_too_large", 413, 4413, _INFO, "the request body is too large"),
        ErrorSpec("headers_too_large", 431, 4431, _INFO, "the request head is too large"),
        ErrorSpec("version_unsupported", 426, 4426, _WARN, "unsupported protocol version"),
        ErrorSpec("too_many_streams", 429, 4429, _WARN, "too many concurrent streams"),
        ErrorSpec("tenant_limit", 429, 4429, _INFO, "a limit of the tenant was reached"),
        ErrorSpec("rate_limited", 429, 4429, _INFO, "too many requests for this tenant"),
        ErrorSpec(
            "too_many_connections", 429, 4429, _INFO, "too many connections from your address"
        ),
        ErrorSpec("internal", 500, 1011, _ERR, "internal error"),
        ErrorSpec("upstream_refused", 502, 4502, _WARN, "the portal refused the connection"),
        ErrorSpec("upstream_reset", 502, 4502, _WARN, "the portal reset the connection"),
        ErrorSpec(
            "upstream_error", 502, 4502, _WARN, "the portal answered with an invalid response"
        ),
        ErrorSpec("agent_lost", 502, 4502, _WARN, "the tenant agent's link was lost"),
        ErrorSpec("portal_offline", 503, 4503, _INFO, "the portal for this alias is offline"),
        ErrorSpec("going_away", 503, 1001, _INFO, "the server is shutting down"),
        ErrorSpec("tenant_suspended", 503, 4423, _INFO, "the tenant is suspended"),
        ErrorSpec(
            "cluster_unavailable", 503, 1013, _WARN, "the cluster's routing state is unavailable"
        ),
        ErrorSpec("node_full", 503, 1013, _WARN, "the node holds all the connections it may"),
        ErrorSpec("upstream_timeout", 504, 4504, _WARN, "the portal did not answer in time"),
        ErrorSpec("protocol_error", 400, 4400, _WARN, "protocol violation"),
        ErrorSpec("flow_control", 400, 4400, _WARN, "flow-control violation"),
        ErrorSpec("frame_too_large", 400, 4400, _WARN, "frame too large"),
        ErrorSpec("heartbeat_timeout", 504, 4408, _WARN, "the peer stopped answering heartbeats"),
        ErrorSpec("link_stalled", 502, 1008, _WARN, "the peer stopped reading the link"),
        ErrorSpec("cancelled", 499, 4499, _INFO, "the client went away"),
    )
}


class CSCError(Exception):
    """Base of every typed error; ``code`` is a key of :data:`ERRORS`.

    ``details`` are extra JSON members of the HTTP error body (e.g. the ``tenant`` of a 503),
    never internal information.
    """

    code: ClassVar[str] = "internal"

    def __init__(
        self, message: str | None = None, *, details: Mapping[str, Any] | None = None
    ) -> None:
        self.message = message or ERRORS[self.code].default_message
        self.details: dict[str, Any] = dict(details or {})
        super().__init__(self.message)

    @property
    def spec(self) -> ErrorSpec:
        return ERRORS[self.code]

    def to_json(self, **extra: Any) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.details, **extra}

    def public(self) -> CSCError:
        """This error as a device may see it: its code, the default message and ``details``.

        The agent words upstream failures for its own log ("the portal at 127.0.0.1:8000
        refused the connection"); what it sends on (OPEN_FAIL, RST) is this, so the tenant's
        internal addresses never reach a device. Other errors are returned unchanged.
        """
        if self.code not in UPSTREAM_CODES:
            return self
        plain = error_for_code(self.code)
        plain.details.update(self.details)
        return plain


#: failures of the tenant's side of a stream: their messages are worded for the agent's log
UPSTREAM_CODES = frozenset(
    {"upstream_refused", "upstream_reset", "upstream_error", "upstream_timeout", "agent_lost"}
)


def error_for_code(code: str, message: str | None = None) -> CSCError:
    """Rebuild a typed error from a code received from a peer (unknown codes become internal)."""
    cls = _BY_CODE.get(code, InternalError)
    return cls(message)


def http_body(code: str, message: str, **extra: Any) -> bytes:
    return json.dumps({"error": code, "message": message, **extra}).encode()


def tcp_err_line(code: str, message: str) -> bytes:
    """The TCP ingress answer for an error: ``ERR <status> <code>: <message>\\r\\n``."""
    status = ERRORS.get(code, ERRORS["internal"]).http_status
    clean = " ".join(message.split())[:200]
    return f"ERR {status} {code}: {clean}\r\n".encode()


class BadRequest(CSCError):
    code = "bad_request"


class BadAlias(CSCError):
    code = "bad_alias"


class AuthFailed(CSCError):
    """A refused credential. ``reason`` is a short, stable word for the metrics (``revoked``,
    ``unknown_tenant``, ...); None leaves it to be derived from the message."""

    code = "auth_failed"

    def __init__(
        self,
        message: str | None = None,
        *,
        reason: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message, details=details)
        self.reason = reason


class AliasForbidden(CSCError):
    code = "alias_forbidden"


class NotFound(CSCError):
    code = "not_found"


class MethodNotAllowed(CSCError):
    code = "method_not_allowed"


class RequestTimeout(CSCError):
    code = "request_timeout"


class UnknownAlias(CSCError):
    code = "unknown_alias"


class AliasTaken(CSCError):
    code = "alias_taken"


class PayloadTooLarge(CSCError):
    code = "payload_too_large"


class HeadersTooLarge(CSCError):
    code = "headers_too_large"


class VersionUnsupported(CSCError):
    code = "version_unsupported"


class TooManyStreams(CSCError):
    code = "too_many_streams"


class TenantLimit(CSCError):
    """A limit of the tenant refused a request or an agent session (429, ``Retry-After``).

    ``retry_after`` is in whole seconds; ``limit`` names the limit (``streams``, ``sessions``,
    ``rate``: the ``limit`` label of the metrics).
    """

    code = "tenant_limit"
    default_limit: ClassVar[str] = "streams"

    def __init__(
        self,
        message: str | None = None,
        *,
        retry_after: int = 1,
        limit: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after
        self.limit = limit or self.default_limit


class RateLimited(TenantLimit):
    code = "rate_limited"
    default_limit = "rate"


class TooManyConnections(CSCError):
    """A client address holds ``client_max_connections`` connections to the node already
    (answered at once, ``Retry-After: 1``; csc/relay/conncap.py)."""

    code = "too_many_connections"


class NodeFull(CSCError):
    """The node holds ``max_connections`` connections on its public and TCP listeners
    (answered at once, ``Retry-After``; csc/relay/conncap.py)."""

    code = "node_full"


class InternalError(CSCError):
    code = "internal"


class UpstreamRefused(CSCError):
    code = "upstream_refused"


class UpstreamReset(CSCError):
    code = "upstream_reset"


class UpstreamError(CSCError):
    code = "upstream_error"


class AgentLost(CSCError):
    code = "agent_lost"


class PortalOffline(CSCError):
    code = "portal_offline"


class GoingAway(CSCError):
    code = "going_away"


class ClusterUnavailable(CSCError):
    """The node cannot reach the cluster's routing state (Redis): no new agent sessions."""

    code = "cluster_unavailable"


class TenantSuspended(CSCError):
    code = "tenant_suspended"


class UpstreamTimeout(CSCError):
    code = "upstream_timeout"


class Cancelled(CSCError):
    code = "cancelled"


class HeartbeatTimeout(CSCError):
    code = "heartbeat_timeout"


class LinkStalled(CSCError):
    """The peer stopped reading: the link's writes made no progress for its ``stuck_timeout``,
    or more answers to its frames were queued than the link holds."""

    code = "link_stalled"


class ProtocolError(CSCError):
    """A violation of docs/protocol.md by the peer. Link-level unless raised for one stream."""

    code = "protocol_error"


class FlowControlError(ProtocolError):
    code = "flow_control"


class FrameTooLarge(ProtocolError):
    code = "frame_too_large"


_BY_CODE: dict[str, type[CSCError]] = {}


def _register(cls: type[CSCError]) -> None:
    _BY_CODE.setdefault(cls.code, cls)
    for sub in cls.__subclasses__():
        _register(sub)


_register(CSCError)
if set(_BY_CODE) != set(ERRORS):  # not an assert: ``python -O`` would skip it
    raise RuntimeError(f"error classes and ERRORS disagree: {sorted(set(ERRORS) ^ set(_BY_CODE))}")


class InvalidState(Exception):
    """A command called in a state that does not allow it: a bug of this side, never the
    peer's fault (that is :class:`ProtocolError`). Deliberately not a :class:`CSCError`, so no
    error table maps it to a status or close code; the caller's bug surfaces as one."""
