"""A man in the middle between a bootloader and the CSC (or a local/DMZ proxy), for fault tests.

:class:`Mitm` is an HTTP/1.1 forwarding proxy on 127.0.0.1, port 0, running its own asyncio loop
in a daemon thread; the bootloader is pointed at it (``--csc {mitm.url}``) and every request goes
on to the real upstream. It records each exchange (method, path, request headers, status and how
many body bytes it passed on), and can, one download at a time:

* ``cut_after = N``: pass N bytes of the next package body, then close the connection (FIN, after
  every byte passed is flushed, so the client has exactly N bytes);
* ``hold_after = N``: pass N bytes of the next package body, then stop reading from upstream
  until :meth:`Mitm.release`; whatever upstream does meanwhile (say, its agent is killed) decides
  what the client gets next.

It can also play an attacker who controls the network:

* ``forge = f``: on a successful logon it fetches the real package with the session, computes
  ``f(package)``, rewrites the logon answer (id, url, size, sha256, etag) to announce the forgery
  and serves the forgery itself, so only the package's signature and manifest hashes stand in
  the way; :func:`alter_file` and :func:`forge_manifest` are two such ``f``;
* ``impostor = key``: answers ``v1/portal`` with that Ed25519 key instead of the portal's;
* ``rename_tenant = name``: answers ``v1/resolve/…`` with that tenant name (the CSC's signature
  left as it was).

Invariants: one request per connection (``Connection: close`` both ways); request bodies are
passed whole (the bootloader's are small JSON); response bodies stream in chunks, never held
whole, except the logon and portal answers an attack rewrites and the package a forgery replaces.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.support.packages import fingerprint, public_raw, zip_entries
from tests.support.procs import scaled, wait_until
from tests.support.readyfile import parse_hostport

CHUNK = 256 * 1024
MAX_HEAD = 64 * 1024
Headers = list[tuple[str, str]]


@dataclass
class Exchange:
    """One request through the proxy and what became of its answer."""

    method: str
    path: str
    headers: dict[str, str]  # request headers, names in lower case
    status: int = 0
    length: int | None = None  # the response's Content-Length
    body_bytes: int = 0  # response body bytes passed to the client
    outcome: str = "pending"  # passed, cut, held, forged, rewritten, upstream-failed


@dataclass
class _Request:
    method: str
    path: str
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        return _header(self.headers, name)


@dataclass
class _Response:
    status: int
    reason: str
    headers: Headers = field(default_factory=list)

    @property
    def length(self) -> int | None:
        value = _header(self.headers, "content-length")
        return int(value) if value is not None else None


def _header(headers: Headers, name: str) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _parse_head(head: bytes) -> tuple[str, Headers]:
    lines = head.decode("latin-1").split("\r\n")
    headers: Headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    return lines[0], headers


def _render(first: str, headers: Headers) -> bytes:
    lines = [first, *(f"{k}: {v}" for k, v in headers), "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _without(headers: Headers, *names: str) -> Headers:
    return [(k, v) for k, v in headers if k.lower() not in names]


class Mitm:
    """See the module docstring. Use as a context manager; ``url`` is where clients connect."""

    def __init__(self, upstream: str) -> None:
        self.upstream = parse_hostport(upstream.split("://", 1)[-1].rstrip("/"))
        self.cut_after: int | None = None
        self.hold_after: int | None = None
        self.forge: Callable[[bytes], bytes] | None = None
        self.impostor: Ed25519PrivateKey | None = None
        self.rename_tenant: str | None = None
        self.held = False
        self._forged: dict[str, bytes] = {}
        self._exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self._started = threading.Event()
        self._port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._release: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="mitm", daemon=True)

    # --- lifecycle (called from the test's thread) ------------------------------------------

    def __enter__(self) -> Self:
        self._thread.start()
        if not self._started.wait(scaled(10)) or not self._port:
            raise RuntimeError("the man in the middle did not start")
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(scaled(10))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def exchanges(self) -> list[Exchange]:
        with self._lock:
            return list(self._exchanges)

    def downloads(self) -> list[Exchange]:
        """The package downloads (``GET …/v1/package/…``) so far."""
        return [x for x in self.exchanges() if x.method == "GET" and "/v1/package/" in x.path]

    def paths(self) -> list[str]:
        return [f"{x.method} {x.path}" for x in self.exchanges()]

    def wait_held(self, timeout: float = 60) -> None:
        wait_until(lambda: self.held, timeout, 0.01, message="a download held by the proxy")

    def release(self) -> None:
        """Let a held download go on."""
        assert self._loop is not None and self._release is not None
        self._loop.call_soon_threadsafe(self._release.set)

    # --- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop, self._release = asyncio.Event(), asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=MAX_HEAD)
        self._port = server.sockets[0].getsockname()[1]
        self._started.set()
        async with server:
            await self._stop.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.set_write_buffer_limits(high=CHUNK)
        try:
            request = await _read_request(reader)
            exchange = Exchange(
                request.method, request.path, {k.lower(): v for k, v in request.headers}
            )
            with self._lock:
                self._exchanges.append(exchange)
            if not self._serve_forgery(request, exchange, writer):
                await self._forward(request, exchange, writer)
            await _flushed(writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    async def _forward(
        self, request: _Request, exchange: Exchange, writer: asyncio.StreamWriter
    ) -> None:
        host, port = self.upstream
        up_reader, up_writer = await asyncio.open_connection(host, port, limit=MAX_HEAD)
        try:
            headers = [*_without(request.headers, "connection"), ("Connection", "close")]
            up_writer.write(_render(f"{request.method} {request.path} HTTP/1.1", headers))
            up_writer.write(request.body)
            await up_writer.drain()
            response = await _read_response(up_reader)
            exchange.status, exchange.length = response.status, response.length
            await self._answer(request, response, exchange, up_reader, writer)
        finally:
            up_writer.transport.abort()

    async def _answer(
        self,
        request: _Request,
        response: _Response,
        exchange: Exchange,
        up_reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        ok_json = response.status == 200 and response.length is not None
        if ok_json and request.path.endswith("/v1/logon") and self.forge is not None:
            data = json.loads(await up_reader.readexactly(response.length or 0))
            await self._forge_logon(request, data)
            _send_json(writer, response, data, exchange, "forged")
            return
        if ok_json and request.path.endswith("/v1/portal") and self.impostor is not None:
            data = json.loads(await up_reader.readexactly(response.length or 0))
            data["key"] = base64.b64encode(public_raw(self.impostor)).decode()
            data["fingerprint"] = fingerprint(self.impostor)
            _send_json(writer, response, data, exchange, "rewritten")
            return
        if ok_json and "/v1/resolve/" in request.path and self.rename_tenant is not None:
            data = json.loads(await up_reader.readexactly(response.length or 0))
            data["tenant"]["name"] = self.rename_tenant
            _send_json(writer, response, data, exchange, "rewritten")
            return
        fault = None
        if request.method == "GET" and "/v1/package/" in request.path:
            fault = self._take_fault()
        first = f"HTTP/1.1 {response.status} {response.reason}"
        writer.write(_render(first, [*_without(response.headers, "connection"), _CLOSE]))
        await self._pipe(up_reader, writer, response.length, exchange, fault)

    def _take_fault(self) -> tuple[str, int] | None:
        """The one-shot fault for this download (cut wins over hold), cleared for the next."""
        fault: tuple[str, int] | None = None
        if self.cut_after is not None:
            fault = ("cut", self.cut_after)
        elif self.hold_after is not None:
            fault = ("hold", self.hold_after)
        self.cut_after = self.hold_after = None
        return fault

    async def _pipe(
        self,
        up_reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        length: int | None,
        exchange: Exchange,
        fault: tuple[str, int] | None,
    ) -> None:
        """Pass the body on (``length`` bytes, or until EOF), applying ``fault``."""
        remaining = length
        exchange.outcome = "passed"
        while remaining is None or remaining > 0:
            limit = CHUNK if remaining is None else min(CHUNK, remaining)
            if fault is not None:
                kind, at = fault
                if exchange.body_bytes >= at:
                    await _flushed(writer)
                    if kind == "cut":
                        exchange.outcome = "cut"
                        return
                    exchange.outcome = "held"
                    await self._hold()
                    fault = None
                    continue
                limit = min(limit, at - exchange.body_bytes)
            try:
                chunk = await up_reader.read(limit)
            except OSError:
                chunk = b""
            if not chunk:
                exchange.outcome += ", upstream-failed" if remaining else ""
                return
            writer.write(chunk)
            await writer.drain()
            exchange.body_bytes += len(chunk)
            if remaining is not None:
                remaining -= len(chunk)

    async def _hold(self) -> None:
        assert self._release is not None
        self._release.clear()
        self.held = True
        try:
            await self._release.wait()
        finally:
            self.held = False

    # --- the attacker -------------------------------------------------------------------------

    async def _forge_logon(self, request: _Request, data: dict[str, Any]) -> None:
        """Replace the announced package by ``forge(real package)``; see the module doc."""
        assert self.forge is not None
        package = data["package"]
        base = request.path[: -len("v1/logon")]
        real = await self._fetch(base + package["url"], data["session"], request)
        forged = self.forge(real)
        ident = hashlib.sha256(forged).hexdigest()
        self._forged[ident] = forged
        package.update(
            url=package["url"].replace(package["id"], ident),
            id=ident,
            sha256=ident,
            size=len(forged),
            etag=f'"{ident}"',
        )

    async def _fetch(self, path: str, session: str, request: _Request) -> bytes:
        host, port = self.upstream
        reader, writer = await asyncio.open_connection(host, port, limit=MAX_HEAD)
        try:
            headers = [
                ("Host", request.header("host") or f"{host}:{port}"),
                ("Authorization", f"Bearer {session}"),
                ("Connection", "close"),
            ]
            writer.write(_render(f"GET {path} HTTP/1.1", headers))
            response = await _read_response(reader)
            if response.status != 200 or response.length is None:
                raise ValueError(f"fetching the real package answered {response.status}")
            return await reader.readexactly(response.length)
        finally:
            writer.transport.abort()

    def _serve_forgery(
        self, request: _Request, exchange: Exchange, writer: asyncio.StreamWriter
    ) -> bool:
        ident = request.path.rsplit("/", 1)[-1]
        forged = self._forged.get(ident)
        if request.method != "GET" or "/v1/package/" not in request.path or forged is None:
            return False
        headers = [
            ("Content-Type", "application/zip"),
            ("Content-Length", str(len(forged))),
            ("ETag", f'"{ident}"'),
            ("X-Request-Id", "forged-by-the-man-in-the-middle"),
            _CLOSE,
        ]
        writer.write(_render("HTTP/1.1 200 OK", headers) + forged)
        exchange.status, exchange.body_bytes, exchange.outcome = 200, len(forged), "forged"
        return True


_CLOSE = ("Connection", "close")


async def _flushed(writer: asyncio.StreamWriter) -> None:
    """Wait until everything written has left for the kernel."""
    transport = writer.transport
    transport.set_write_buffer_limits(high=0)
    await writer.drain()


async def _read_request(reader: asyncio.StreamReader) -> _Request:
    head = await reader.readuntil(b"\r\n\r\n")
    first, headers = _parse_head(head)
    method, path, _ = first.split(" ", 2)
    length = int(_header(headers, "content-length") or 0)
    body = await reader.readexactly(length) if length else b""
    return _Request(method, path, headers, body)


async def _read_response(reader: asyncio.StreamReader) -> _Response:
    head = await reader.readuntil(b"\r\n\r\n")
    first, headers = _parse_head(head)
    _, status, reason = [*first.split(" ", 2), ""][:3]
    return _Response(int(status), reason, headers)


def _send_json(
    writer: asyncio.StreamWriter,
    response: _Response,
    data: dict[str, Any],
    exchange: Exchange,
    outcome: str,
) -> None:
    body = json.dumps(data).encode()
    headers = _without(response.headers, "content-length", "connection", "transfer-encoding")
    headers += [("Content-Length", str(len(body))), _CLOSE]
    writer.write(_render(f"HTTP/1.1 {response.status} {response.reason}", headers) + body)
    exchange.body_bytes, exchange.outcome = len(body), outcome


# --- forgeries -----------------------------------------------------------------------------


def _entries(package: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(package)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _first_file(entries: dict[str, bytes]) -> str:
    return min(name for name in entries if name.startswith("files/"))


def alter_file(package: bytes) -> bytes:
    """The package with one byte of its first file changed; manifest and signature untouched."""
    entries = _entries(package)
    name = _first_file(entries)
    data = bytearray(entries[name])
    data[0] ^= 0x20
    entries[name] = bytes(data)
    return zip_entries(entries)


def forge_manifest(package: bytes) -> bytes:
    """The package with its first file replaced and the manifest's SHA-256 and size updated to
    match (a consistent forgery), keeping the portal's signature of the original manifest."""
    entries = _entries(package)
    name = _first_file(entries)
    evil = b"#!/bin/sh\necho installed by an attacker\n"
    entries[name] = evil
    manifest = json.loads(entries["manifest.json"])
    for app in manifest["apps"]:
        for item in app["files"]:
            if f"files/{item['path']}" == name:
                item.update(sha256=hashlib.sha256(evil).hexdigest(), size=len(evil))
    entries["manifest.json"] = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return zip_entries(entries)
