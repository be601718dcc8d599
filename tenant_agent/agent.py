"""``csc-agent``: N dial-out sessions to the CSC, each serving the streams the CSC opens.

Each session slot connects (token in the ``Authorization`` header only), says HELLO, serves
streams until the link ends, then reconnects after a capped, jittered backoff that resets once
a link has been stable; a 429/503 refusal of the upgrade with ``Retry-After`` (a session limit,
a draining node) waits at least that long, up to ``retry_after_max`` (tenant_agent/backoff.py),
and the log line says so. On GOAWAY from the CSC the slot connects a new session first and lets
the old one finish its streams (make-before-break). On SIGTERM the agent sends GOAWAY on every
session, lets in-flight streams finish within ``drain_timeout`` and exits.

With ``sessions = auto`` the agent starts two slots and adds one for each node of the cluster
beyond them (up to 16; the size as tenant_agent/spread.py's ``ClusterView`` reads the WELCOMEs'
``cluster_nodes`` and the CLUSTER frames of nodes of 1.2 or later), so every node of the cluster
holds a session and requests reach the agent without a hop between nodes; a slot added that way
which the tenant's session limit refuses (HTTP 429 ``tenant_limit``) ends, and the agent adds no
more until :data:`LIMIT_RETRY` has passed (then it tries once more: an operator may have raised
the limit). Once the cluster has been smaller than the slots for ``shrink_after`` (the spread
policy's), the slots beyond it leave: their sessions get GOAWAY, finish their streams and close.

In a CSC cluster the slots spread their sessions over distinct nodes (tenant_agent/spread.py
holds the policy and explains it): a session that lands on a node another live session holds
is sent GOAWAY and closed before it carries a stream, and the slot dials again after a short
pause; after ``max_redials`` in a row it keeps the duplicate and later moves it,
make-before-break. The check of a new session against the live ones and its entry into
:attr:`Agent.sessions` happen in one step (no ``await`` between), so two slots never both
keep, or both drop, sessions that came up on the same node at once.

A new token put in ``token_file`` is taken up without a restart (tenant_agent/token.py): the
file is looked at every few seconds and on SIGHUP; the first session the CSC welcomes with the
new token makes it the token in use, and the slots then replace their sessions one at a time,
make-before-break, so that revoking the old token afterwards cuts nothing (break-before-make,
one session at a time, when the tenant's session limit leaves no room for one more).

Errors that retrying cannot fix (token refused, alias not covered, protocol version) stop the
agent with a clear message and exit status 3, unless ``token_file`` holds a token not tried yet
(a renewal that came late): the agent then dials with that one first.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

from shared import compiled, runtime
from shared.aio import cancel_quietly
from shared.allocator import return_free_memory
from shared.config import AUTO, Secret
from shared.errors import CSCError, GoingAway, ProtocolError
from shared.link import Link, max_message_size
from shared.oserrors import describe_connect_error, describe_os_error
from shared.protocol import ClusterChanged, Connection, Event, LinkSettings, Side, WelcomeReceived
from shared.protocol.codec import CLUSTER_MINOR
from tenant_agent import __version__
from tenant_agent.backoff import (
    FATAL_CLOSE_CODES,
    FATAL_HTTP_STATUSES,
    RETRY_AFTER_STATUSES,
    Backoff,
    parse_retry_after,
    retry_after_delay,
)
from tenant_agent.config import AUTO_SESSIONS, MAX_SESSIONS, AgentConfig
from tenant_agent.metrics import (
    AgentMetrics,
    MetricsServer,
    reconnect_reason,
    session_end_reason,
)
from tenant_agent.spread import (
    ClusterView,
    SlotSpread,
    SpreadPolicy,
    Verdict,
    auto_sessions,
    is_duplicate,
    replacement_is_better,
    welcome_cluster_nodes,
    welcome_node,
)
from tenant_agent.token import CHECK_INTERVAL, AgentToken, describe_expiry
from tenant_agent.upstream import Upstreams
from tenant_agent.websocket import (
    AgentWebSocket,
    HandshakeError,
    HandshakeRefused,
    close_for,
    connect,
    run_link,
)

log = logging.getLogger("csc_agent")

#: ``sessions = auto`` tries again this long after the tenant's session limit stopped it.
LIMIT_RETRY = 600.0
#: The GOAWAY messages of the agent's own session moves and of a slot let go.
MOVING = "the agent moves this session to another node"
RENEWING = "the agent renews this session with its new token"
#: The upgrade request's header naming the session a renewal replaces (csc/relay/handover.py)
REPLACES_HEADER = "CSC-Replaces"
#: Seconds before a renewal at the session limit dials once more for the old session's place
#: (the CSC's node may not have seen its GOAWAY yet), before closing the old session first.
HANDOVER_RETRY = 0.5
LEAVING = "the agent needs fewer sessions (sessions = auto)"

EXIT_FATAL = 3


class FatalError(Exception):
    """Retrying cannot help: the agent stops with this message."""


@dataclass(eq=False)
class CSCSession:
    slot: int
    ws: AgentWebSocket
    link: Link
    welcome: dict[str, Any]
    #: the token the session was made with (tenant_agent/token.py)
    token: Secret = field(default_factory=lambda: Secret(""))
    goaway: asyncio.Event = field(default_factory=asyncio.Event)
    #: the node's count of live nodes that take agents, as it last told this session
    cluster_nodes: int = 1

    @property
    def id(self) -> str:
        return str(self.welcome.get("session_id", "?"))

    @property
    def node(self) -> str | None:
        return welcome_node(self.welcome)

    @property
    def live(self) -> bool:
        """Serving new streams: not draining after a GOAWAY from either side, not closed."""
        link = self.link
        return not (self.goaway.is_set() or link.is_closed or link.conn.local_going_away)

    @property
    def announces(self) -> bool:
        """Whether its node tells each change of its count (CLUSTER, protocol 1.2)."""
        return self.link.conn.minor >= CLUSTER_MINOR


@dataclass(eq=False)
class Slot:
    """One session slot: its task, and the event that lets it go (``sessions = auto``)."""

    task: asyncio.Task[None]
    leave: asyncio.Event


def connect_url(csc: str) -> str:
    """The agent endpoint of a CSC base URL (``http(s)``/``ws(s)``, any path prefix)."""
    url = csc.rstrip("/")
    if url.startswith("http://"):
        url = "ws://" + url[len("http://") :]
    elif url.startswith("https://"):
        url = "wss://" + url[len("https://") :]
    return url + "/v1/agent/connect"


def csc_tls(config: AgentConfig) -> ssl.SSLContext | None:
    """The TLS context of every session to the CSC and of their reconnects (None for ws://):
    made once, as loading the CA store costs tens of ms and most of a MiB per context, which
    each TLS connection holds for as long as it lives."""
    if config.ca_file is not None:
        return ssl.create_default_context(cafile=str(config.ca_file))
    if connect_url(config.csc).startswith("wss://"):
        return ssl.create_default_context()  # the system's CAs
    return None


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        metrics: AgentMetrics | None = None,
        spread: SpreadPolicy | None = None,
    ) -> None:
        self.config = config
        self.spread = spread if spread is not None else SpreadPolicy()
        self.cluster = ClusterView()
        self.settings = LinkSettings.from_config(config)
        self.metrics = metrics if metrics is not None else AgentMetrics()
        self.metrics_server = MetricsServer(self.metrics)
        self.upstreams = Upstreams(config, metrics=self.metrics)
        self.sessions: set[CSCSession] = set()
        self.stopping = asyncio.Event()
        self.token = AgentToken(config.token, config.token_file)
        #: one slot at a time replaces its session with one of a new token
        self._renewing = asyncio.Lock()
        self.fatal: str | None = None
        self._draining: set[asyncio.Task[None]] = set()
        self._retiring: dict[int, int] = {}  # slot -> sessions draining after a GOAWAY
        self._ssl: ssl.SSLContext | None = None
        self._announced: tuple[str, ...] = ()  # the aliases whose URLs were logged last
        self.auto = config.sessions == AUTO
        self._ceiling = MAX_SESSIONS  # sessions = auto: lowered by a session-limit refusal
        self._slots: list[Slot] = []
        self._gone: set[asyncio.Task[None]] = set()  # tasks of slots let go, until they end
        self._ceiling_retry: asyncio.TimerHandle | None = None
        self._shrink_timer: asyncio.TimerHandle | None = None
        self._size = 1  # the cluster's size (ClusterView) when last looked at
        #: set (and replaced) when serving slots should look for a move at once
        self._recheck = asyncio.Event()
        self.metrics.track_draining(lambda: sum(self._retiring.values()))
        self.metrics.track_spread(lambda: (self._size, len(set(self._other_nodes()))))
        self.metrics.track_token_expiry(lambda: self.token.expires)

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        self._ssl = csc_tls(self.config)
        if not await self._start_metrics():
            return EXIT_FATAL
        log.info("%s", compiled.describe())
        log.info("agent token: %s", describe_expiry(self.token.expires, time.time()))
        await self.upstreams.start()
        for _ in range(AUTO_SESSIONS if self.auto else self.config.sessions):
            self._add_slot()
        # free heap pages go back to the OS after a burst (a download), as in the CSC
        trim = asyncio.create_task(return_free_memory(), name="return-free-memory")
        watch = asyncio.create_task(self._watch_token(), name="token-file")
        try:
            await self.stopping.wait()
            await self._drain()
        finally:
            await cancel_quietly(watch)
            await cancel_quietly(trim)
            for timer in (self._ceiling_retry, self._shrink_timer):
                if timer is not None:
                    timer.cancel()
            for task in [s.task for s in self._slots] + list(self._gone):
                await cancel_quietly(task)
            for task in list(self._draining):
                await cancel_quietly(task)
            await self.upstreams.close()
            await self.metrics_server.close()
        if self.fatal is not None:
            log.error("stopping: %s", self.fatal)
            return EXIT_FATAL
        return 0

    def stop(self) -> None:
        self.stopping.set()

    def check_token(self) -> None:
        """Look at ``token_file`` now (SIGHUP, and every :data:`CHECK_INTERVAL`): a new token
        there is dialled with, and once the CSC took it the sessions are renewed."""
        if self.token.check_file():
            self._wake_moves()
        self.token.warn_if_expiring(time.time())

    async def _watch_token(self) -> None:
        while True:
            self.check_token()
            await asyncio.sleep(CHECK_INTERVAL)

    def _stale(self, session: CSCSession) -> bool:
        """Whether a serving session is to be renewed: made with a token other than the one
        in use, or a new token waits to be tried."""
        return session.token != self.token.current or self.token.candidate is not None

    @property
    def slots(self) -> int:
        """The session slots started (``sessions``, or with ``auto`` as many as grown)."""
        return len(self._slots)

    def _add_slot(self) -> None:
        self._slots.append(self._new_slot(len(self._slots)))

    def _new_slot(self, slot: int) -> Slot:
        leave = asyncio.Event()
        return Slot(asyncio.create_task(self._slot(slot, leave), name=f"slot-{slot}"), leave)

    def _wanted(self, ceiling: int | None = None) -> int:
        """``sessions = auto``: the slots the cluster's size asks for, within the tenant's
        session limit as met so far (``ceiling``: another bound)."""
        bound = self._ceiling if ceiling is None else ceiling
        return auto_sessions(self._size, bound, AUTO_SESSIONS)

    def _cluster_size(self) -> int:
        told = (s.cluster_nodes for s in self.sessions if s.live and s.announces)
        return self.cluster.update(told)

    def _cluster_changed(self) -> None:
        """A WELCOME or a CLUSTER frame came: with ``sessions = auto`` grow at once, or plan
        to shrink; when the cluster grew, serving slots holding a duplicate try to move now
        (a node joined, or one is back after a restart)."""
        size = self._cluster_size()
        old, self._size = self._size, size
        if size != old:
            log.info("the CSC cluster has %d nodes that take agents", size)
        self._grow()
        if size > old:
            self._wake_moves()
        self._plan_shrink()

    def _wake_moves(self) -> None:
        self._recheck.set()
        self._recheck = asyncio.Event()

    def _grow(self) -> None:
        """``sessions = auto``: a slot more for each node of the cluster beyond the slots (a
        slot that ended at the tenant's session limit starts again when wanted)."""
        if not self.auto or self.stopping.is_set():
            return
        wanted = self._wanted()
        ended = [i for i, s in enumerate(self._slots[:wanted]) if s.task.done()]
        if wanted > len(self._slots) or ended:
            log.info(
                "the CSC cluster has %d nodes: %d sessions (sessions = auto)", self._size, wanted
            )
            for slot in ended:
                self._slots[slot] = self._new_slot(slot)
            while len(self._slots) < wanted:
                self._add_slot()

    def _plan_shrink(self) -> None:
        """``sessions = auto`` with more slots than the cluster asks for: let the extra ones
        go if that still holds after ``shrink_after`` (a rolling restart takes each node out
        for a while and costs no session)."""
        if not self.auto or self.stopping.is_set():
            return
        if self._wanted(MAX_SESSIONS) < len(self._slots):  # fewer nodes, not the tenant's limit
            if self._shrink_timer is None:
                loop = asyncio.get_running_loop()
                self._shrink_timer = loop.call_later(self.spread.shrink_after, self._shrink)
        elif self._shrink_timer is not None:
            self._shrink_timer.cancel()
            self._shrink_timer = None

    def _shrink(self) -> None:
        """Let the slots beyond the cluster's size go: each sends GOAWAY on its session,
        which finishes its streams and closes; the slot does not reconnect."""
        self._shrink_timer = None
        self._size = self._cluster_size()
        wanted = self._wanted(MAX_SESSIONS)
        if self.stopping.is_set() or wanted >= len(self._slots):
            return
        log.info(
            "the CSC cluster has had fewer nodes for %g s (now %d): %d sessions (sessions = auto)",
            self.spread.shrink_after,
            self._size,
            wanted,
        )
        while len(self._slots) > wanted:
            gone = self._slots.pop()
            gone.leave.set()
            self.metrics.slot_ended(len(self._slots))
            if not gone.task.done():
                self._gone.add(gone.task)
                gone.task.add_done_callback(self._gone.discard)
        self._wake_moves()  # a kept duplicate may take a node that a leaving session held

    def _retry_ceiling_later(self) -> None:
        """``sessions = auto`` met the tenant's session limit: try to grow again after
        :data:`LIMIT_RETRY` (the operator may have raised ``max_sessions``; one refused
        upgrade per try if not)."""
        if self._ceiling_retry is None and not self.stopping.is_set():
            loop = asyncio.get_running_loop()
            self._ceiling_retry = loop.call_later(LIMIT_RETRY, self._retry_ceiling)

    def _retry_ceiling(self) -> None:
        self._ceiling_retry = None
        self._ceiling = MAX_SESSIONS
        self._grow()

    async def handshake_once(self, context: ssl.SSLContext | None) -> CSCSession:
        """One session, connected and welcomed but not served (``csc-agent check``): the
        caller closes it. Raises what a slot's connection attempt raises."""
        self._ssl = context
        return await self._connect(0)

    async def _start_metrics(self) -> bool:
        """Serve ``/metrics`` on ``metrics_listen`` when set; False if it cannot be bound."""
        address = self.config.metrics_listen_address
        if address is None:
            return True
        try:
            bound = await self.metrics_server.start(*address)
        except OSError as exc:
            reason = describe_os_error(exc, self.config.metrics_listen)
            log.error("stopping: cannot serve metrics: %s", reason)
            return False
        log.info("metrics on http://%s/metrics", bound)
        return True

    async def _drain(self) -> None:
        """GOAWAY on every session, wait for in-flight streams, then close the links."""
        sessions = list(self.sessions)
        for session in sessions:
            session.link.go_away("going_away", "the agent is shutting down")
        if sessions and self.fatal is None:
            log.info(
                "draining %d sessions (up to %.0f s)", len(sessions), self.config.drain_timeout
            )
            await asyncio.gather(*(s.link.wait_idle(self.config.drain_timeout) for s in sessions))
        for session in sessions:
            await session.link.flush()
            await close_for(session.ws, GoingAway("the agent is shutting down"))

    def _announce(self, session: CSCSession) -> None:
        """Say where the portal is reachable, once per set of aliases the CSC bound."""
        aliases = [str(a) for a in session.welcome.get("aliases", [])]
        if not aliases or tuple(aliases) == self._announced:
            return
        self._announced = tuple(aliases)
        for url in portal_urls(self.config.csc, aliases):
            log.info("the portal is reachable at %s", url)

    # -- one session slot --------------------------------------------------------------------

    async def _slot(self, slot: int, leave: asyncio.Event) -> None:
        """Hold one session, reconnecting, until the agent stops or ``leave`` is set (the slot
        then touches no metric of its number, which a new slot may take)."""
        cfg = self.config
        backoff = Backoff(cfg.backoff_initial, cfg.backoff_max, cfg.backoff_reset_after)
        spread = SlotSpread(self.spread)
        loop = asyncio.get_running_loop()
        successor: CSCSession | None = None  # a replacement already up (a move)
        outage = Outage()
        while not self.stopping.is_set():
            started = loop.time()
            session, successor = successor, None
            asked: float | None = None  # the Retry-After of a 429/503 refusal
            if leave.is_set():
                if session is not None:
                    self._dismiss(session, None, LEAVING)
                return
            if session is None:
                self.metrics.slot_state(slot, "connecting")
                try:
                    session = await self._connect(slot)
                except FatalError as exc:
                    self.fatal = str(exc)
                    self.stop()
                    return
                except (CSCError, HandshakeError, OSError, TimeoutError) as exc:
                    if self.auto and slot >= AUTO_SESSIONS and session_limit(exc):
                        self._ceiling = min(self._ceiling, slot)
                        log.info(
                            "session %d: the tenant's session limit leaves no room for it; "
                            "the agent adds no more sessions for %g s (sessions = auto)",
                            slot,
                            LIMIT_RETRY,
                        )
                        self.metrics.slot_ended(slot)
                        self._retry_ceiling_later()
                        return
                    cause = f"cannot connect to {cfg.csc}: {describe_failure(exc)}"
                    reason = reconnect_reason(exc)
                    asked = asked_wait(exc)
                    if leave.is_set():
                        return
                else:
                    if leave.is_set():
                        self._dismiss(session, None, LEAVING)
                        return
                    if outage.failures:
                        log.info("session %d: reconnected; %s", slot, outage.summary(loop.time()))
                    outage = Outage()
                    self._announce(session)
                    if self._place(session, spread) is Verdict.REDIAL:
                        await self._redial(session, spread.redials)
                        continue
            if session is not None:
                self.metrics.slot_state(slot, "up")
                outcome = await self._serve(session, leave)
                if isinstance(outcome, CSCSession):
                    successor = outcome
                    continue
                if outcome == "left":
                    return
                if outcome == "drained":
                    backoff.attempt = 0
                    self.metrics.reconnect("goaway")
                    continue  # make-before-break: connect the successor right away
                backoff.connected_for(loop.time() - started)
                closed = session.link.closed
                reason = session_end_reason(
                    closed.result() if closed.done() else None, session.ws.close_reason
                )
                cause = _down_cause(session)
            if self.fatal is not None or self.stopping.is_set() or leave.is_set():
                if session is not None:
                    log.info("session %d: %s", slot, cause)
                return
            self.metrics.reconnect(reason)
            self.metrics.slot_state(slot, "backoff")
            if self._retiring.get(slot):
                backoff.attempt = 0  # the drained session still serves: retry at the start pace
            delay = backoff.next_delay(random.random())
            if asked is not None:
                delay = retry_after_delay(delay, asked, cfg.retry_after_max, random.random())
                capped = f", at most {cfg.retry_after_max:g}" if asked > cfg.retry_after_max else ""
                cause += f" (Retry-After: {asked:g} s{capped})"
            outage.failed(cause, loop.time())
            log.warning("session %d: %s; retrying in %.1f s", slot, cause, delay)
            await self._pause(delay, leave)

    async def _pause(self, delay: float, leave: asyncio.Event | None = None) -> None:
        """Wait ``delay`` seconds or until the agent stops (or ``leave`` is set)."""
        waits = [asyncio.create_task(e.wait()) for e in (self.stopping, leave) if e is not None]
        try:
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                await cancel_quietly(task)

    def _other_nodes(self, *exclude: CSCSession) -> list[str | None]:
        """The nodes of the live sessions other than ``exclude``."""
        return [s.node for s in self.sessions if s.live and s not in exclude]

    def _place(self, session: CSCSession, spread: SlotSpread) -> Verdict:
        """Judge a new session against the live ones and enter it, in one step (no await)."""
        count = self.cluster.saw(session.welcome, announces=session.announces)
        verdict = spread.on_session_up(session.node, self._other_nodes(session), count)
        self.sessions.add(session)
        self._cluster_changed()
        if verdict is Verdict.KEEP_DUPLICATE:
            log.info(
                "session %d: keeping a second session on node %s after %d re-dials; "
                "will try to move it every ~%g s",
                session.slot,
                session.node,
                self.spread.max_redials,
                self.spread.move_interval,
            )
        return verdict

    async def _redial(self, session: CSCSession, tries: int) -> None:
        """Close a duplicate (GOAWAY first: it gets no stream) and pause briefly."""
        delay = self.spread.redial_delay(random.random())
        log.info(
            "session %d: node %s already holds a session of this agent (%d nodes in the "
            "cluster); re-dialling in %.2f s (try %d of %d)",
            session.slot,
            session.node,
            welcome_cluster_nodes(session.welcome),
            delay,
            tries,
            self.spread.max_redials,
        )
        self.metrics.reconnect("duplicate_node")
        self._dismiss(session, None)
        await self._pause(delay)

    def _dismiss(
        self, session: CSCSession, run: asyncio.Task[None] | None, why: str = MOVING
    ) -> None:
        """Send GOAWAY on a session of ours and let it drain and close in the background."""
        session.link.go_away("going_away", why)
        task = asyncio.create_task(self._retire(session, run))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def _serve(self, session: CSCSession, leave: asyncio.Event) -> CSCSession | str:
        """Serve until the link ends (``"ended"``), the CSC asks to drain (``"drained"``: the
        slot connects a successor), the slot is let go (``"left"``: the session drains) or a
        replacement on a node of its own took over (returned: the slot serves it; this one
        drains). A duplicate looks for a move every ``move_interval`` and when the cluster
        grows."""
        self.sessions.add(session)
        run = asyncio.create_task(run_link(session.ws, session.link))
        ends: set[asyncio.Task[Any]] = {run}
        ends |= {asyncio.create_task(session.goaway.wait()), asyncio.create_task(leave.wait())}
        moved: CSCSession | None = None
        why = MOVING
        try:
            while moved is None:
                recheck = asyncio.create_task(self._recheck.wait())
                try:
                    done, _ = await asyncio.wait(
                        ends | {recheck},
                        timeout=self.spread.move_delay(random.random()),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    await cancel_quietly(recheck)
                if done & ends:
                    break
                if self._stale(session) and not self._renewing.locked():
                    async with self._renewing:
                        moved = await self._try_renew(session, run)
                    why = RENEWING
                elif is_duplicate(session.node, self._other_nodes(session), self._size):
                    moved = await self._try_move(session)
                    why = MOVING
        finally:
            for task in ends - {run}:
                await cancel_quietly(task)
        if moved is None and leave.is_set() and not run.done():
            log.info("session %d: the agent needs fewer sessions; draining this one", session.slot)
            self._dismiss(session, run, LEAVING)
            return "left"
        if moved is not None:
            if run.done():
                self.sessions.discard(session)
            else:
                self._dismiss(session, run, why)
            return moved
        if run.done():
            self.sessions.discard(session)
            code = session.ws.close_code
            if code in FATAL_CLOSE_CODES and not self._new_token_to_try(session.token):
                self.fatal = f"the CSC closed the session ({code}): {session.ws.close_reason}"
                self.stop()
            return "ended"
        log.info("session %d: the CSC is draining; connecting a successor", session.slot)
        task = asyncio.create_task(self._retire(session, run))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)
        return "drained"

    def _new_token_to_try(self, refused: Secret) -> bool:
        """After the CSC refused ``refused`` for good: whether another token is there to try
        (``token_file`` renewed late), rather than stopping."""
        self.token.check_file()
        candidate = self.token.candidate
        return candidate is not None and candidate != refused

    async def _replacement(
        self, slot: int, failed: str, replaces: CSCSession | None = None
    ) -> CSCSession | Exception:
        """Dial a session to take over from one of ``slot``'s (a move or a renewal), entered
        in :attr:`sessions`; else why it could not be made now (logged with ``failed``).
        ``replaces``: the session it renews, named to the CSC (``CSC-Replaces``), which at
        the tenant's session limit gives the new one its place."""
        try:
            new = await self._connect(slot, replaces.id if replaces is not None else None)
        except FatalError as exc:
            self.fatal = str(exc)
            self.stop()
            return exc
        except (CSCError, HandshakeError, OSError, TimeoutError) as exc:
            log.warning("session %d: %s: %s", slot, failed, describe_failure(exc))
            return exc
        self.cluster.saw(new.welcome, announces=new.announces)
        self.sessions.add(new)
        self._cluster_changed()
        return new

    async def _try_renew(self, session: CSCSession, run: asyncio.Task[None]) -> CSCSession | None:
        """Dial a session with the token to use now in place of ``session`` (made with an
        older one); the new session, or None when it could not be made now (tried again at
        the next wake or move interval).

        The dial names ``session`` (``CSC-Replaces``): at the tenant's session limit the CSC
        gives the new session its place (csc/relay/handover.py), the old one serving until
        the caller sends it GOAWAY. If the CSC still refuses for the limit (429
        ``tenant_limit``: an earlier version, or another hand-over of the tenant running),
        the old one is sent GOAWAY (it takes no new streams; its streams finish) and the new
        one dialled again, for the place of a session that went away; failing that (after one
        more try), the old session is closed first, its streams finished, and the new one
        dialled then (the agent's other sessions carry the streams meanwhile). Else the
        renewal could never happen, and the old token's expiry would cut every session at
        once, streams in flight included."""
        slot = session.slot
        log.info("session %d: renewing it with the new agent token", slot)
        self.metrics.reconnect("token_renewed")
        new = await self._replacement(slot, "not renewed now", replaces=session)
        if isinstance(new, Exception) and session_limit(new) and not self.stopping.is_set():
            log.info(
                "session %d: the tenant's session limit leaves no room for a new session "
                "beside this one; it takes no new streams now, and the new one its place",
                slot,
            )
            session.link.go_away("going_away", RENEWING)
            await session.link.flush()
            for pause in (0.0, HANDOVER_RETRY):
                await asyncio.sleep(pause)
                if self.stopping.is_set():
                    return None
                new = await self._replacement(slot, "not renewed now")
                if not (isinstance(new, Exception) and session_limit(new)):
                    break
            if not isinstance(new, CSCSession):  # it takes no new streams: close it first
                log.info(
                    "session %d: the new session got no place; closing the old one first "
                    "(%s), then renewing it",
                    slot,
                    "the agent's other sessions carry the streams meanwhile"
                    if self._other_nodes(session)
                    else "the agent's only session: none for the moment of its reconnect",
                )
                await self._retire(session, run)
                if self.stopping.is_set():  # the agent is stopping: no new session now
                    return None
                new = await self._replacement(slot, "not renewed now")
        if not isinstance(new, CSCSession):
            return None
        if new.token != self.token.current:  # that token was refused meanwhile
            self._dismiss(new, None, RENEWING)
            return None
        log.info("session %d: renewed on node %s (was on %s)", slot, new.node, session.node)
        self._wake_moves()  # the next slot renews at once
        return new

    async def _try_move(self, session: CSCSession) -> CSCSession | None:
        """Dial a replacement for a duplicate; the replacement if it is on a node of its own
        (entered in :attr:`sessions`), else None (it is dismissed; the duplicate serves on)."""
        slot = session.slot
        log.info(
            "session %d: node %s holds another session of this agent; dialling a replacement",
            slot,
            session.node,
        )
        self.metrics.reconnect("duplicate_node")
        new = await self._replacement(slot, "no replacement")
        if not isinstance(new, CSCSession):
            return None
        if replacement_is_better(new.node, session.node, self._other_nodes(session, new)):
            log.info("session %d: moved from node %s to node %s", slot, session.node, new.node)
            return new
        log.info("session %d: the replacement landed on node %s too; keeping", slot, new.node)
        self._dismiss(new, None)
        return None

    async def _connect(self, slot: int, replaces: str | None = None) -> CSCSession:
        """Upgrade, then HELLO/WELCOME, each within ``connect_timeout``."""
        cfg = self.config
        token = self.token.dial
        headers = {
            "Authorization": f"Bearer {token.reveal()}",
            "User-Agent": f"csc-agent/{__version__}",
        }
        if replaces is not None:
            headers[REPLACES_HEADER] = replaces
        url = connect_url(cfg.csc)
        max_size = max_message_size(cfg.max_frame)
        try:
            ws = await asyncio.wait_for(
                connect(url, headers, max_size=max_size, ssl_context=self._ssl),
                cfg.connect_timeout,
            )
        except HandshakeRefused as exc:
            if exc.status in FATAL_HTTP_STATUSES:
                why = f"HTTP {exc.status}: {exc.reason}"
                if self.token.refused(token, why) or self._new_token_to_try(token):
                    raise  # another token to dial with: retried like any refusal
                message = f"the CSC refused the agent (HTTP {exc.status}): {exc.reason}"
                raise FatalError(message) from None
            raise
        try:
            session = await asyncio.wait_for(self._handshake(slot, ws, token), cfg.connect_timeout)
        except BaseException:
            await ws.close()
            raise
        if self.token.proven(token):
            log.info(
                "session %d: the CSC took the new agent token (%s); renewing the other sessions",
                slot,
                describe_expiry(self.token.expires, time.time()),
            )
            self._wake_moves()
        return session

    async def _handshake(self, slot: int, ws: AgentWebSocket, token: Secret) -> CSCSession:
        loop = asyncio.get_running_loop()
        conn = Connection(Side.CLIENT, self.settings, accept_streams=True, now=loop.time())
        conn.send_hello({"agent": f"csc-agent/{__version__}", "aliases": self.config.aliases})
        await ws.send_chunks(conn.data_to_send())
        welcome: dict[str, Any] | None = None
        pending: list[Event] = []
        while welcome is None:
            data = await ws.receive()
            if data is None:
                code, reason = ws.close_code, ws.close_reason
                if code in FATAL_CLOSE_CODES:
                    why = f"close {code}: {reason}"
                    if not (self.token.refused(token, why) or self._new_token_to_try(token)):
                        raise FatalError(f"the CSC refused the session ({code}): {reason}")
                raise ProtocolError(f"the CSC closed the link in the handshake ({code}): {reason}")
            conn.receive_data(data, loop.time())
            events = conn.events()
            for i, event in enumerate(events):
                if isinstance(event, WelcomeReceived):
                    welcome, pending = event.info, events[i + 1 :]
        session: CSCSession
        link = Link(
            conn,
            ws.send_now,
            on_stream=self.upstreams.handle,
            on_stream_now=self.upstreams.handle_now,
            counters=self.metrics.links,
            on_goaway=lambda _ev: session.goaway.set(),
            on_cluster=lambda ev: self._told(session, ev),
            name=f"session {slot}",
            pending=pending,
        )
        session = CSCSession(
            slot, ws, link, welcome, token=token, cluster_nodes=welcome_cluster_nodes(welcome)
        )
        log.info(
            "session %d up: %s on node %s, aliases %s",
            slot,
            session.id,
            welcome.get("node", "?"),
            ",".join(map(str, welcome.get("aliases", []))),
        )
        return session

    def _told(self, session: CSCSession, event: ClusterChanged) -> None:
        """A CLUSTER frame: the session's node counts another number of nodes."""
        log.debug(
            "session %d: node %s counts %d nodes", session.slot, session.node, event.cluster_nodes
        )
        session.cluster_nodes = event.cluster_nodes
        if session in self.sessions:
            self._cluster_changed()

    async def _retire(self, session: CSCSession, run: asyncio.Task[None] | None) -> None:
        """Let a draining session finish its streams, then close it (the CSC closes it first
        when it drains)."""
        if run is None:
            run = asyncio.create_task(run_link(session.ws, session.link))
        self._retiring[session.slot] = self._retiring.get(session.slot, 0) + 1
        try:
            await session.link.wait_idle(self.config.drain_timeout)
            await session.link.flush()
            await close_for(session.ws, GoingAway("drained"))
            await run
        except (CSCError, OSError) as exc:  # the CSC closed it first, or the link broke
            log.debug("session %d: drained session ended: %r", session.slot, exc)
        finally:
            self._retiring[session.slot] -= 1
            self.sessions.discard(session)
            await cancel_quietly(run)


def asked_wait(exc: BaseException) -> float | None:
    """The ``Retry-After`` (seconds) of a 429/503 refusal of the upgrade, else None."""
    if isinstance(exc, HandshakeRefused) and exc.status in RETRY_AFTER_STATUSES:
        return parse_retry_after(exc.retry_after, time.time())
    return None


def session_limit(exc: BaseException) -> bool:
    """Whether the CSC refused the upgrade for the tenant's session limit."""
    return isinstance(exc, HandshakeRefused) and exc.status == 429 and exc.code == "tenant_limit"


def describe_failure(exc: BaseException) -> str:
    if isinstance(exc, CSCError):
        return exc.message
    if isinstance(exc, HandshakeRefused):
        return f"it answered HTTP {exc.status} {exc.reason}"
    if isinstance(exc, OSError | TimeoutError):
        return describe_connect_error(exc)
    return str(exc) or exc.__class__.__name__


def _down_cause(session: CSCSession) -> str:
    """``session s-1 on node n-1 went down (close code 1006): <reason>``."""
    closed = session.link.closed
    reason = closed.result().message if closed.done() else "closed"
    code = session.ws.close_code
    where = f" on node {session.node}" if session.node else ""
    return f"session {session.id}{where} went down (close code {code}): {reason}"


@dataclass
class Outage:
    """A slot's failed attempts since its last session came up, for the summary line."""

    failures: int = 0
    since: float = 0.0
    last: str = ""

    def failed(self, cause: str, now: float) -> None:
        if not self.failures:
            self.since = now
        self.failures += 1
        self.last = cause

    def summary(self, now: float) -> str:
        attempts = "1 failed attempt" if self.failures == 1 else f"{self.failures} failed attempts"
        return f"down for {now - self.since:.1f} s, {attempts} (last: {self.last})"


def portal_urls(csc: str, aliases: list[str]) -> list[str]:
    """Where bootloaders reach the portal through the CSC: ``{csc}/t/{alias}/`` per alias (a
    ``*@domain`` pattern is shown as it is: any alias of that domain)."""
    base = csc.rstrip("/")
    if base.startswith("ws://"):
        base = "http://" + base[len("ws://") :]
    elif base.startswith("wss://"):
        base = "https://" + base[len("wss://") :]
    return [f"{base}/t/{alias}/" for alias in aliases]


async def run_async(config: AgentConfig) -> int:
    agent = Agent(config)
    runtime.on_stop_signals(agent.stop)
    # SIGHUP: look at token_file now (a renewal without waiting for the next look)
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, agent.check_token)
    return await agent.run()


def run(config: AgentConfig) -> int:
    runtime.raise_open_file_limit()  # a descriptor per portal connection
    return runtime.run(run_async(config))
