"""The agent's side of a stream: a request to the configured upstream, answered on the stream.

Only the upstreams in the agent's own configuration are ever contacted: an ``http`` stream's
target is a path appended to ``upstream``, a ``tcp`` stream always goes to ``tcp_upstream``;
nothing the CSC sends can name another host. HTTP goes through one pooled keep-alive client;
bodies stream both ways and received bytes are credited back only once written upstream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from shared.errors import (
    CSCError,
    HeadersTooLarge,
    ProtocolError,
    UpstreamError,
    UpstreamRefused,
    UpstreamReset,
    UpstreamTimeout,
)
from shared.headers import decode_raw, header_pairs, strip_hop_by_hop
from shared.link import LinkStream, splice
from tenant_agent.config import AgentConfig

log = logging.getLogger("csc_agent.upstream")

READ_LIMIT = 256 * 1024
#: Responses up to this size are read whole and sent with their head.
SMALL_BODY = 64 * 1024
_SKIP_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
_METHOD_CHARS = frozenset(
    "!#$%&'*+-.^_`|~ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
)


def _request_parts(info: dict[str, Any]) -> tuple[str, str, list[tuple[str, str]]]:
    method, target = info.get("method"), info.get("target")
    headers = header_pairs(info.get("headers"))
    if not isinstance(method, str) or not method or not set(method) <= _METHOD_CHARS:
        raise ProtocolError("OPEN has an invalid method")
    if (
        not isinstance(target, str)
        or not target.startswith("/")
        or any(c in target for c in " \r\n")
    ):
        raise ProtocolError("OPEN has an invalid target")
    if headers is None:
        raise ProtocolError("OPEN has invalid headers")
    return method, target, strip_hop_by_hop(headers)


async def _body(stream: LinkStream) -> AsyncIterator[bytes]:
    """The request body from the stream; each chunk is credited once aiohttp asks for more."""
    while data := await stream.read():
        yield bytes(data)
        stream.consumed(len(data))  # resumed: aiohttp has written the chunk


class Upstreams:
    """The configured upstreams and the client pool used to reach them."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.base = config.upstream.rstrip("/")
        self.tcp = config.tcp_upstream_address
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO,
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.config.upstream_connect_timeout,
                sock_read=self.config.upstream_timeout,
            ),
            read_bufsize=READ_LIMIT,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def handle(self, stream: LinkStream) -> None:
        kind = stream.info.get("kind")
        if kind == "http":
            await self._http(stream)
        elif kind == "tcp":
            await self._tcp(stream)
        else:
            stream.reject(ProtocolError(f"unknown stream kind {kind!r}"))

    async def _http(self, stream: LinkStream) -> None:
        assert self._session is not None
        try:
            method, target, headers = _request_parts(stream.info)
        except ProtocolError as err:
            stream.reject(err)
            return
        url = URL(self.base + target, encoded=True)
        body = _body(stream) if stream.info.get("body") else None
        request_id = stream.info.get("request_id", "")
        try:
            resp = await self._session.request(
                method,
                url,
                headers=CIMultiDict(headers),
                data=body,
                allow_redirects=False,
            )
        except CSCError:
            return  # the stream was reset by the CSC while the body was being sent
        except Exception as exc:
            failure = _upstream_error(exc, self.base)
            log.info("request %s: %s", request_id, failure.message)
            stream.reject(failure)
            return
        async with resp:
            head = {
                "status": resp.status,
                "reason": resp.reason or "",
                "headers": decode_raw(resp.raw_headers),
            }
            try:
                await self._relay_response(stream, resp, head)
            except CSCError:
                resp.close()
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                log.info("request %s: the portal's response broke off: %r", request_id, exc)
                stream.reset(UpstreamReset("the portal's response broke off"))

    @staticmethod
    async def _relay_response(
        stream: LinkStream, resp: aiohttp.ClientResponse, head: dict[str, Any]
    ) -> None:
        small = resp.content_length is not None and resp.content_length <= SMALL_BODY
        # a small body goes out with the head: one message, one write at the CSC
        whole = await resp.content.read() if small else b""
        try:
            stream.accept(head)
        except HeadersTooLarge:
            stream.reject(UpstreamError("the portal's response head is too large"))
            return
        if whole:
            await stream.write(whole)
        if not small:
            while data := await resp.content.readany():
                await stream.write(data)
        stream.write_eof()

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
            stream.reject(UpstreamTimeout(f"connecting to {host}:{port} timed out"))
            return
        except OSError as exc:
            stream.reject(UpstreamRefused(f"connecting to {host}:{port} failed: {exc.strerror}"))
            return
        stream.accept({})
        try:
            await splice(stream, reader, writer, reset_code=UpstreamReset.code)
        finally:
            writer.close()


def _upstream_error(exc: BaseException, base: str) -> CSCError:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamRefused(f"the portal at {base} refused the connection")
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("the portal did not answer in time")
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return UpstreamReset("the portal closed the connection")
    if isinstance(exc, aiohttp.ClientResponseError):
        return UpstreamError(f"the portal sent an invalid response ({exc.message})")
    return UpstreamError(f"request to the portal failed: {exc.__class__.__name__}")
