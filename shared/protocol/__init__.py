"""The agent-link protocol (docs/protocol.md): sans-I/O frame codec and stream multiplexer."""

from shared.protocol.codec import VERSION, Frame, FrameDecoder, FrameType, encode_frame
from shared.protocol.events import (
    ClusterChanged,
    DataReceived,
    Event,
    GoAwayReceived,
    HelloReceived,
    PongReceived,
    SendCreditAvailable,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamRejected,
    StreamReset,
    WelcomeReceived,
)
from shared.protocol.mux import Connection
from shared.protocol.settings import LinkSettings, LinkState, Side
from shared.protocol.stream_state import TRANSITIONS, Fault, Stream, StreamInput, StreamState

__all__ = [
    "TRANSITIONS",
    "VERSION",
    "ClusterChanged",
    "Connection",
    "DataReceived",
    "Event",
    "Fault",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "GoAwayReceived",
    "HelloReceived",
    "LinkSettings",
    "LinkState",
    "PongReceived",
    "SendCreditAvailable",
    "Side",
    "Stream",
    "StreamAccepted",
    "StreamEnded",
    "StreamInput",
    "StreamOpened",
    "StreamRejected",
    "StreamReset",
    "StreamState",
    "WelcomeReceived",
    "encode_frame",
]
