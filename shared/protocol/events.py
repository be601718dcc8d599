"""Events the multiplexer reports to its adapter (docs/protocol.md §3): frozen, one per fact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class HelloReceived:
    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class WelcomeReceived:
    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StreamOpened:
    stream_id: int
    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    stream_id: int
    info: dict[str, Any]
    #: the OPEN_OK payload ``info`` was decoded from, when it was a binary head (a relay may
    #: pass it on as it came: csc/cluster/peer.py)
    binary: bytes | None = None


@dataclass(frozen=True, slots=True)
class StreamRejected:
    stream_id: int
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class DataReceived:
    stream_id: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed: no more DATA will arrive on this stream."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    stream_id: int
    code: str
    message: str
    remote: bool


@dataclass(frozen=True, slots=True)
class SendCreditAvailable:
    stream_id: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    last_stream_id: int
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class PongReceived:
    rtt: float


Event = (
    HelloReceived
    | WelcomeReceived
    | StreamOpened
    | StreamAccepted
    | StreamRejected
    | DataReceived
    | StreamEnded
    | StreamReset
    | SendCreditAvailable
    | GoAwayReceived
    | PongReceived
)
