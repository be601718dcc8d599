"""The flow-control and heartbeat settings of agent links, declared once for every program.

``csc serve`` (:class:`csc.config.CSCConfig`) and ``csc-agent`` (:class:`tenant_agent.config.
AgentConfig`) each carry ``heartbeat_interval``, ``heartbeat_timeout``, ``initial_window``,
``max_window``, ``session_budget`` and ``max_frame``. :func:`link_field` gives a config class
such a field: its default is the protocol's own (:class:`shared.protocol.LinkSettings`), its
help text and bounds are declared here; :func:`link_problems` is their cross-field check;
``LinkSettings.from_config`` turns a loaded config into what a link grants its peer.

Invariants of a config that passed :func:`link_problems`: ``initial_window <= max_window <=
session_budget``, ``max_frame <= session_budget`` (and within the protocol's 16 KiB..16 MiB,
checked by the loader), ``heartbeat_timeout > heartbeat_interval``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from shared.config import duration_field, size_field
from shared.protocol.codec import HARD_MAX_PAYLOAD
from shared.protocol.settings import MIN_FRAME, LinkLimits, LinkSettings

#: The defaults: what a link grants when nothing is configured.
DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(LinkSettings)}

#: Help texts (a program may word one for its side of the link: see :func:`link_field`).
HELP = {
    "heartbeat_interval": "heartbeat period on the link",
    "heartbeat_timeout": "a link silent this long is closed",
    "initial_window": "initial per-stream flow-control window",
    "max_window": "largest auto-tuned per-stream window",
    "session_budget": "buffered bytes allowed per session",
    "max_frame": "largest frame payload (16KiB..16MiB)",
}


def link_field(name: str, *, help: str | None = None) -> Any:
    """The config field of link setting ``name`` (a key of :data:`HELP`); ``help`` replaces
    its help text where a program words it for its own side."""
    default, text = DEFAULTS[name], help or HELP[name]
    if name.startswith("heartbeat_"):
        return duration_field(default, text)
    if name == "max_frame":
        return size_field(default, text, minimum=MIN_FRAME, maximum=HARD_MAX_PAYLOAD)
    return size_field(default, text, minimum=1)


def link_problems(config: LinkLimits) -> list[str]:
    """Cross-field checks of a config's link settings (for its ``validate``)."""
    problems: list[str] = []
    initial, window, budget = config.initial_window, config.max_window, config.session_budget
    if not initial <= window <= budget:
        problems.append(
            f"initial_window ({initial}) <= max_window ({window}) <= "
            f"session_budget ({budget}) must hold"
        )
    if config.max_frame > budget:
        problems.append(f"max_frame ({config.max_frame}) must not exceed session_budget ({budget})")
    interval, timeout = config.heartbeat_interval, config.heartbeat_timeout
    if timeout <= interval:  # a timeout must leave room for at least one heartbeat
        problems.append(
            f"heartbeat_timeout ({timeout:g}s) must be greater than "
            f"heartbeat_interval ({interval:g}s)"
        )
    return problems
