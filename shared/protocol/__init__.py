"""The agent-link protocol (docs/protocol.md): sans-I/O frame codec and stream multiplexer."""

from shared.protocol.codec import VERSION, Frame, FrameDecoder, FrameType, encode_frame
from shared.protocol.events import (
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
from shared.protocol.mux import Connection, LinkSettings, LinkState, Side, Stream

__all__ = [
    "VERSION",
    "Connection",
    "DataReceived",
    "Event",
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
    "StreamOpened",
    "StreamRejected",
    "StreamReset",
    "WelcomeReceived",
    "encode_frame",
]
