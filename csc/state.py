"""Per-node state shared by the gateway, the ingresses and the admin API (one object per node)."""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from csc.admin.errorlog import ErrorLog
from csc.config import CSCConfig
from csc.metrics import CSCMetrics
from csc.relay.conncap import ConnectionCounts
from csc.relay.freshread import SharedRefresh
from csc.relay.growth import GrowthPools
from csc.relay.handover import Handovers
from csc.relay.limits import Admissions, TenantLimiter
from csc.relay.registry import Registry
from csc.relay.traffic import LastSeen, TrafficHistory
from csc.store import Store
from shared import resolve_sig
from shared.protocol import LinkSettings
from shared.tokens import VerifiedTokens

if TYPE_CHECKING:
    from csc.cluster.node import Cluster
    from csc.relay.gateway import AgentSession


def default_node_id() -> str:
    """Host name plus a per-boot id: unique even when a host runs the node again."""
    return f"{socket.gethostname()}-{os.urandom(4).hex()}"


@dataclass(eq=False)
class NodeState:
    config: CSCConfig
    registry: Registry[AgentSession]
    public_keys: list[Any]
    node_id: str = field(default_factory=default_node_id)
    sessions: dict[str, AgentSession] = field(default_factory=dict)
    draining: bool = False
    metrics: CSCMetrics = field(default_factory=CSCMetrics)
    #: per-tenant request rate, concurrent streams and agent sessions (csc/relay/limits.py)
    limits: TenantLimiter = field(default_factory=TenantLimiter)
    #: what each request in flight holds of its client's share and cluster slots (csc/relay/routing.py)
    admissions: Admissions = field(default_factory=Admissions)
    active_streams: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    link_settings: LinkSettings = field(init=False)
    #: the managed objects (tenants, aliases, tokens, operators, audit); None: no admin API
    store: Store | None = None
    #: held while the registry is re-read and sessions that lost their rights are ended, and by
    #: an admin change from its store write to its end: the periodic re-read never ends (and
    #: so takes from the change's count) the sessions of a change still being made
    rights: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: set to ask the node to drain and stop (SIGTERM, or the admin API)
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    #: the last error answers of the ingresses (admin API ``/errors``, the console)
    errors: ErrorLog = field(default_factory=ErrorLog)
    #: per-tenant requests, errors and bytes of the last 15 minutes (csc/relay/traffic.py)
    traffic: TrafficHistory = field(default_factory=TrafficHistory)
    #: when each tenant's grants last had a session on this node (offline aliases' "last seen")
    last_seen: LastSeen = field(default_factory=LastSeen)
    #: the node's membership of a cluster (``redis_url`` set; csc/cluster/node.py), else None
    cluster: Cluster | None = None
    #: signs resolve answers (shared/resolve_sig.py): the token-signing key when it is Ed25519
    #: (the same on every node of a cluster), else None and answers go unsigned
    resolve_key: Ed25519PrivateKey | None = None
    #: its public half as it travels (base64 of the raw 32 bytes), or ""
    resolve_key_text: str = field(init=False, default="")
    #: agent tokens already verified (the handshake re-checks only expiry, revocation, tenant)
    verified_tokens: VerifiedTokens = field(default_factory=VerifiedTokens)
    #: the registry's re-read before an admission, shared by concurrent handshakes
    fresh_catalog: SharedRefresh = field(init=False)
    #: open connections per client address on the public and TCP listeners (csc/relay/conncap.py)
    connections: ConnectionCounts = field(init=False)
    #: bounds on the stream-window growth of the agent sessions, per tenant and in all
    #: (csc/relay/growth.py)
    growth: GrowthPools = field(init=False)
    #: sessions that may give, or gave, their place to the session renewing them
    #: (csc/relay/handover.py)
    handovers: Handovers = field(init=False)

    def __post_init__(self) -> None:
        self.link_settings = LinkSettings.from_config(
            self.config, max_streams=self.config.max_streams_per_session
        )
        self.idle.set()
        self.handovers = Handovers(self.config.drain_timeout, self.metrics.session_handover)
        self.growth = GrowthPools(self.config.tenant_window_growth, self.config.node_window_growth)
        self.fresh_catalog = SharedRefresh(self.registry.refresh)
        self.connections = ConnectionCounts.from_config(
            self.config, self.metrics.connection_refused, self.metrics.connection_stalled
        )
        self.metrics.connections = lambda: (self.connections.total, self.connections.node_cap)
        node_pool = self.growth.node
        self.metrics.window_growth = lambda: (node_pool.held, node_pool.budget)
        watches = self.connections.watches
        self.metrics.client_buffers = lambda: (watches.held, watches.limit)
        if self.resolve_key is not None:
            self.resolve_key_text = resolve_sig.public_key_text(self.resolve_key.public_key())
        self.metrics.track_sessions(lambda: self.sessions.values())
        self.metrics.track_cluster(lambda: self.cluster)
        self.metrics.draining = lambda: self.draining

    @property
    def auth_failures(self) -> int:
        """Agent tokens refused so far (all reasons; by reason in the metrics)."""
        return self.metrics.auth_failures_total()

    def stream_started(self) -> None:
        self.active_streams += 1
        self.idle.clear()

    def stream_finished(self) -> None:
        self.active_streams -= 1
        if not self.active_streams:
            self.idle.set()
