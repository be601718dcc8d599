"""Tracking the processes of one test: :class:`ProcFactory` starts them through
:mod:`harness.procs`, remembers them and stops them all by PID at the end (dumping their logs
when the test failed); :class:`RelayProcs` is a CSC, an agent and the upstream behind it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from harness.procs import (
    STOP_TIMEOUT,
    CscProc,
    DelayProxyProc,
    P,
    Proc,
    ProcError,
    UpstreamProc,
    issue_token,
    start_agent,
    start_csc,
    start_delay_proxy,
    start_upstream,
)
from harness.waiting import resolve_url, tunnel_url, wait_alias_online


class ProcFactory:
    """Starts processes for one test, remembers them, and stops them all at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.log_dir = tmp_path / "logs"
        self.procs: list[Proc] = []

    def track(self, proc: P) -> P:
        self.procs.append(proc)
        return proc

    def csc(self, **kwargs: Any) -> CscProc:
        return self.track(start_csc(self.tmp_path, **kwargs))

    def agent(self, csc_url: str, token: str, upstream: str, **kwargs: Any) -> Proc:
        kwargs.setdefault("log_dir", self.log_dir)
        return self.track(start_agent(csc_url, token, upstream, **kwargs))

    def upstream(self, **kwargs: Any) -> UpstreamProc:
        return self.track(start_upstream(self.tmp_path, **kwargs))

    def delay_proxy(self, target: str, delay: float, **kwargs: Any) -> DelayProxyProc:
        return self.track(start_delay_proxy(self.tmp_path, target, delay, **kwargs))

    def spawn(self, name: str, argv: Sequence[str], **kwargs: Any) -> Proc:
        kwargs.setdefault("log_dir", self.log_dir)
        return self.track(Proc.spawn(name, argv, **kwargs))

    def relay(
        self,
        upstream: UpstreamProc,
        *,
        alias: str = "acme@example.com",
        tenant: str = "acme",
        sessions: int = 2,
        csc_env: Mapping[str, str] | None = None,
        agent_env: Mapping[str, str] | None = None,
        agent_args: Sequence[str] = (),
        start_agent: bool = True,
    ) -> RelayProcs:
        """A CSC process, a token for ``tenant``/``alias`` and (unless ``start_agent`` is
        false) an agent serving ``upstream``, returned once the alias resolves."""
        csc = self.csc(env=csc_env)
        token = issue_token(csc.state_dir, tenant, alias)
        relay = RelayProcs(csc, upstream, token, alias, self)
        if start_agent:
            relay.start_agent(sessions=sessions, env=agent_env, extra_args=agent_args)
        return relay

    def dump_logs(self, stream: IO[str] | None = None) -> None:
        for proc in self.procs:
            proc.dump_logs(stream)

    def tracebacks(self) -> list[str]:
        """Every Python traceback the processes wrote (see :meth:`Proc.tracebacks`)."""
        return [found for proc in self.procs for found in proc.tracebacks()]

    def stop_all(self, timeout: float = 5.0) -> None:
        """SIGTERM every tracked process (newest first), then SIGKILL what is left."""
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout)
            except TimeoutError:
                proc.kill()
                proc.wait(STOP_TIMEOUT)


class RelayProcs:
    """A relay of real processes (see :meth:`ProcFactory.relay`): CSC, upstream, agent."""

    def __init__(
        self, csc: CscProc, upstream: UpstreamProc, token: str, alias: str, factory: ProcFactory
    ) -> None:
        self.csc = csc
        self.upstream = upstream
        self.token = token
        self.alias = alias
        self.factory = factory
        self.agent: Proc | None = None

    def url(self, path: str = "/") -> str:
        """A URL through the tunnel: ``{csc}/t/{alias}/{path}``."""
        return tunnel_url(self.csc.http_url, self.alias, path)

    @property
    def resolve_url(self) -> str:
        return resolve_url(self.csc.http_url, self.alias)

    def start_agent(
        self,
        *,
        csc_url: str | None = None,
        sessions: int = 2,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        wait_online: bool = True,
    ) -> Proc:
        """Start an agent (dialing ``csc_url``, default the CSC itself) and by default wait
        until the alias resolves."""
        self.agent = self.factory.agent(
            csc_url or self.csc.http_url,
            self.token,
            self.upstream.http_url,
            sessions=sessions,
            env=env,
            extra_args=extra_args,
        )
        if wait_online:
            try:
                wait_alias_online(self.csc.http_url, self.alias)
            except TimeoutError as exc:
                raise ProcError(f"{exc}\n{self.agent.describe()}") from None
        return self.agent
