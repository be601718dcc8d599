"""One request of the local/DMZ proxy, seen by the portal client as a stream.

:class:`InboundExchange` implements :class:`~tenant_agent.http_upstream.RelayedStream` over a
:class:`~tenant_agent.proxy.http.ClientConnection`: ``read`` yields the request body as the
client sends it, ``consumed`` lets the client send more, ``accept``/``write``/``write_eof``
send the response, ``reject`` answers with a JSON error and ``reset`` aborts the connection.

Invariants: the response head goes out with the first body bytes (one write); a body is framed
by its Content-Length, chunked, or (HTTP/1.0 client, unknown length) by closing the connection;
``reject`` after the head has been sent becomes ``reset``, never a second head; ``opened`` only
ever fails, when the client goes away or the exchange is reset, which stops the portal side.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from shared.errors import (
    BadRequest,
    Cancelled,
    CSCError,
    HeadersTooLarge,
    PayloadTooLarge,
    ProtocolError,
)
from tenant_agent.proxy.messages import (
    CHUNKED,
    CLOSE,
    LENGTH,
    NONE,
    InboundRequest,
    body_mode,
    encode_head,
    error_response,
)

if TYPE_CHECKING:
    from tenant_agent.proxy.http import ClientConnection

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class InboundExchange:
    """One request as the :class:`RelayedStream` that :class:`HttpUpstream` relays."""

    def __init__(
        self, conn: ClientConnection, request: InboundRequest, request_id: str, info: dict[str, Any]
    ) -> None:
        self.info = info
        self.request_id = request_id
        self.opened: asyncio.Future[dict[str, Any]] = conn.loop.create_future()
        self._conn = conn
        self._req = request
        self._error: CSCError | None = None
        self._head: bytes | None = None
        self._mode = LENGTH
        self._continued = False
        self.status = 0
        self.sent = 0
        self.accepted = False
        self.finished = False
        self.keep_alive = request.keep_alive

    @property
    def error(self) -> CSCError | None:
        return self._error

    @property
    def done(self) -> bool:
        return self.finished or self._error is not None

    # -- the request body --------------------------------------------------------------------

    async def read(self) -> bytes | memoryview:
        req, conn = self._req, self._conn
        if req.expect_continue and not self._continued:
            self._continued = True
            if not req.received and not self.accepted:
                conn.send((_CONTINUE,))
        while not req.chunks:
            if req.body_done:
                return b""
            if self._error is not None:
                raise self._error
            if conn.fatal is not None:
                raise conn.fatal
            await conn.wait_for_body()
        return req.chunks.popleft()

    def read_complete(self) -> bytes | None:
        req = self._req
        if not req.body_done:
            return None
        data = b"".join(req.chunks)
        req.chunks.clear()
        return data

    def consumed(self, nbytes: int) -> None:
        self._conn.body_consumed(self._req, nbytes)

    # -- the response ------------------------------------------------------------------------

    def accept(self, info: dict[str, Any]) -> None:
        req = self._req
        status = int(info["status"])
        headers: list[tuple[str, str]] = info["headers"]
        self._mode = body_mode(req.method, status, headers, req.http11)
        if self._mode == CLOSE or not self._conn.may_keep_alive(req):
            self.keep_alive = False
        self._head = encode_head(
            status,
            str(info.get("reason") or ""),
            headers,
            request_id=self.request_id,
            mode=self._mode,
            keep_alive=self.keep_alive,
            http11=req.http11,
        )
        self.status = status
        self.accepted = True

    async def write(self, data: bytes | memoryview) -> None:
        if self._error is not None:
            raise self._error
        parts = self._take_head()
        if data and self._mode != NONE:
            if self._mode == CHUNKED:
                parts += [b"%x\r\n" % len(data), data, b"\r\n"]
            else:
                parts.append(data)
            self.sent += len(data)
        conn = self._conn
        conn.send(parts)
        try:
            await conn.drain()
        except ConnectionError:
            raise self._error or Cancelled("the client went away") from None
        conn.progress()

    def write_eof(self) -> None:
        if self._error is not None:
            raise self._error
        parts = self._take_head()
        if self._mode == CHUNKED:
            parts.append(b"0\r\n\r\n")
        self._conn.send(parts)
        self.finished = True
        if self._mode == CLOSE:
            self.keep_alive = False

    def reject(self, err: CSCError) -> None:
        """Answer with the JSON error of ``err`` (the response has not started)."""
        if self.done:
            return
        if self.accepted:
            self.reset(err)
            return
        if isinstance(err, ProtocolError):  # our request did not make a valid upstream request
            err = BadRequest(f"the request is malformed ({err.message})")
        req = self._req
        if isinstance(err, BadRequest | HeadersTooLarge | PayloadTooLarge):
            self.keep_alive = False
        if not self._conn.may_keep_alive(req):
            self.keep_alive = False
        self.status = err.spec.http_status
        self._conn.send(
            (error_response(err, self.request_id, keep_alive=self.keep_alive, http11=req.http11),)
        )
        self.finished = True

    def reset(self, err: CSCError) -> None:
        """Abort the client connection (after the head: a truncated response must not look
        complete)."""
        if self._error is None:
            self._error = err
        self.finished = True
        self.keep_alive = False
        self._conn.abort()
        self._fail_opened(err)

    # -- called by the connection ------------------------------------------------------------

    def client_lost(self) -> None:
        if self._error is None:
            self._error = Cancelled("the client went away")
        self.keep_alive = False
        self._fail_opened(self._error)

    def _fail_opened(self, err: CSCError) -> None:
        if not self.opened.done():
            self.opened.set_exception(err)
            self.opened.exception()  # retrieved: HttpUpstream only watches for the failure

    def _take_head(self) -> list[bytes | memoryview]:
        head, self._head = self._head, None
        return [head] if head is not None else []
