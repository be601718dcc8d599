"""The link settings each side grants the other in HELLO/WELCOME (docs/protocol.md §4), and
the link's roles (:class:`Side`) and states (:class:`LinkState`).

:class:`LinkSettings` is what this side grants (from the program's configuration),
:class:`PeerSettings` what the peer granted, validated by :func:`peer_settings`;
:func:`check_version` refuses a peer of another major version and :func:`peer_minor` reads
the minor one of the same major. Pure functions, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from shared.enums import FastEnum
from shared.errors import ProtocolError, VersionUnsupported
from shared.protocol.codec import (
    HARD_MAX_PAYLOAD,
    MAX_WINDOW_INCREMENT,
    VERSION,
    VERSION_MAJOR,
    VERSION_MINOR,
)

MIN_FRAME = 16 * 1024
DEFAULT_MAX_STREAMS = 1024


class Side(FastEnum):
    CLIENT = "client"  # dials the link (the agent); opens odd stream ids
    SERVER = "server"  # accepts the link (the CSC); opens even stream ids


class LinkState(FastEnum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


class LinkLimits(Protocol):
    """The flow-control and heartbeat settings a program's configuration carries."""

    @property
    def initial_window(self) -> int: ...
    @property
    def max_window(self) -> int: ...
    @property
    def session_budget(self) -> int: ...
    @property
    def max_frame(self) -> int: ...
    @property
    def heartbeat_interval(self) -> float: ...
    @property
    def heartbeat_timeout(self) -> float: ...


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """What this side grants its peer; sent in HELLO/WELCOME (docs/protocol.md §4)."""

    initial_window: int = 256 * 1024
    max_window: int = 64 * 1024 * 1024
    session_budget: int = 128 * 1024 * 1024
    max_frame: int = 256 * 1024
    max_streams: int = DEFAULT_MAX_STREAMS
    heartbeat_interval: float = 10.0
    heartbeat_timeout: float = 30.0
    #: The minor protocol version this side announces (``VERSION_MINOR``; tests speak 0 to
    #: play a 1.0 peer, which sends and accepts JSON heads only, §6.1).
    protocol_minor: int = VERSION_MINOR

    @property
    def version(self) -> str:
        """The version string of HELLO/WELCOME."""
        return f"{VERSION_MAJOR}.{self.protocol_minor}"

    @classmethod
    def from_config(cls, config: LinkLimits, *, max_streams: int | None = None) -> LinkSettings:
        """What a program's configuration grants (``max_streams`` defaults to 1024)."""
        return cls(
            initial_window=config.initial_window,
            max_window=config.max_window,
            session_budget=config.session_budget,
            max_frame=config.max_frame,
            max_streams=DEFAULT_MAX_STREAMS if max_streams is None else max_streams,
            heartbeat_interval=config.heartbeat_interval,
            heartbeat_timeout=config.heartbeat_timeout,
        )

    def to_wire(self) -> dict[str, int]:
        """The ``settings`` object of HELLO/WELCOME."""
        return {
            "initial_window": self.initial_window,
            "max_frame": self.max_frame,
            "max_streams": self.max_streams,
        }


@dataclass(frozen=True, slots=True)
class PeerSettings:
    initial_window: int
    max_frame: int
    max_streams: int


def peer_settings(info: dict[str, Any]) -> PeerSettings:
    """The settings the peer granted in its HELLO/WELCOME; ProtocolError if out of bounds."""
    raw = info.get("settings")
    if not isinstance(raw, dict):
        raise ProtocolError("handshake lacks a 'settings' object")
    values: dict[str, int] = {}
    bounds = {
        "initial_window": (1024, MAX_WINDOW_INCREMENT),
        "max_frame": (MIN_FRAME, HARD_MAX_PAYLOAD),
        "max_streams": (1, 2**20),
    }
    for key, (low, high) in bounds.items():
        value = raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ProtocolError(f"handshake setting {key!r} must be an integer in [{low}, {high}]")
        values[key] = value
    return PeerSettings(**values)


def check_version(info: dict[str, Any]) -> None:
    """Refuse a peer of another major version (VersionUnsupported) or none (ProtocolError)."""
    version = info.get("version")
    if not isinstance(version, str):
        raise ProtocolError("handshake lacks a 'version' string")
    major, _, _ = version.partition(".")
    if major != str(VERSION_MAJOR):
        raise VersionUnsupported(
            f"peer speaks protocol {version}, this side speaks {VERSION}: "
            "please update the older side"
        )


def peer_minor(info: dict[str, Any]) -> int:
    """The minor version of a HELLO/WELCOME that :func:`check_version` accepted; 0 when it
    has none or not a plain number ("1", "1.x"): such a peer gets what 1.0 defines."""
    minor = str(info["version"]).partition(".")[2]
    if not minor.isascii() or not minor.isdigit() or len(minor) > 6:
        return 0
    return int(minor)
