"""Test support for the bootloader: signed packages (good and tampered), a fake portal, tree hashes.

* :func:`build_package` makes a package exactly as docs/provisioning.md describes (sorted
  ``ZIP_STORED`` entries, fixed timestamps, ``manifest.json`` signed with Ed25519);
  ``edit_manifest`` changes the manifest before it is signed, ``edit_entries`` changes the zip's
  entries after, ``sign_with`` signs with another key: that is how tests tamper.
* :class:`FakePortal` is a threaded stdlib HTTP server on 127.0.0.1, port 0, implementing the
  portal side of the contract (``v1/portal``, ``v1/logon``, ``v1/package/{id}`` with ranges) and
  the CSC's bootloader surface (``/v1/resolve/{alias}``, ``/t/{alias}/…``) with switches for
  failures: error answers, a cut-off download, another key, a redirect, a stalled answer. It
  records every request. The same class serves as the upstream of a real agent.
* :func:`tree_hash` (from :mod:`harness.catalog`) fingerprints a directory (names, modes, contents, symlink targets) so a test
  can prove that a failed installation changed nothing.
* :func:`run_bootloader` drives ``bootloader.cli.main`` in process with its own streams.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import ssl
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from harness.catalog import tree_hash  # noqa: F401  (moved there; tests import it from here)

ZIP_TIME = (1980, 1, 1, 0, 0, 0)
ALIAS = "acme@example.com"
USER, PASSWORD = "alice", "correct horse"
DEVICE_TYPE = "linux-x64"


# --- keys and packages -----------------------------------------------------------------------


def public_raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def fingerprint(key: Ed25519PrivateKey) -> str:
    return hashlib.sha256(public_raw(key)).hexdigest()[:16]


def payload(size: int, seed: int = 1) -> bytes:
    """``size`` deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


@dataclass
class AppFiles:
    name: str
    version: str
    files: dict[str, bytes]
    modes: dict[str, int] = field(default_factory=dict)


def default_apps() -> list[AppFiles]:
    return [
        AppFiles(
            "client",
            "5.1.0",
            {"client/bin/run": b"#!/bin/sh\necho client\n", "client/etc/app.json": b"{}\n"},
            {"client/bin/run": 0o755},
        ),
        AppFiles("tools", "1.2", {"tools/readme.txt": b"tools\n"}),
    ]


def build_manifest(
    key: Ed25519PrivateKey,
    apps: Sequence[AppFiles],
    *,
    portal_name: str = "Acme Ltd",
    user: str = USER,
    device_type: str = DEVICE_TYPE,
    policies: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "format": 1,
        "portal": {"name": portal_name, "fingerprint": fingerprint(key)},
        "user": user,
        "device_type": device_type,
        "apps": [
            {
                "name": app.name,
                "version": app.version,
                "files": [
                    {
                        "path": path,
                        "sha256": hashlib.sha256(data).hexdigest(),
                        "size": len(data),
                        "mode": app.modes.get(path, 0o644),
                    }
                    for path, data in sorted(app.files.items())
                ],
            }
            for app in apps
        ],
        "policies": dict(policies if policies is not None else {"sync-interval": "15m"}),
    }


def build_package(
    key: Ed25519PrivateKey,
    apps: Sequence[AppFiles] | None = None,
    *,
    edit_manifest: Callable[[dict[str, Any]], None] | None = None,
    edit_entries: Callable[[dict[str, bytes]], None] | None = None,
    sign_with: Ed25519PrivateKey | None = None,
    **manifest_fields: Any,
) -> bytes:
    """A package zip; see the module docstring for the tampering hooks."""
    chosen = list(apps) if apps is not None else default_apps()
    manifest = build_manifest(key, chosen, **manifest_fields)
    if edit_manifest is not None:
        edit_manifest(manifest)
    raw = json.dumps(manifest, sort_keys=True, indent=1).encode()
    entries = {"manifest.json": raw, "manifest.sig": (sign_with or key).sign(raw)}
    for app in chosen:
        for path, data in app.files.items():
            entries[f"files/{path}"] = data
    if edit_entries is not None:
        edit_entries(entries)
    return zip_entries(entries)


def zip_entries(entries: Mapping[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, ZIP_TIME)
            info.external_attr = 0o644 << 16
            archive.writestr(info, entries[name])
    return buffer.getvalue()


def package_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the fake portal -------------------------------------------------------------------------

Failure = tuple[int, str, int | None]  # status, error code, Retry-After seconds (or None)


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class _QuietServer(ThreadingHTTPServer):
    """A test server that does not print a traceback when a client left before its answer
    (a bootloader that timed out on a stalled portal, by design)."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class FakePortal:
    """A portal (and CSC front) on 127.0.0.1:0 in a thread; switches are plain attributes."""

    def __init__(
        self,
        key: Ed25519PrivateKey,
        package: bytes | None = None,
        *,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.key = key
        self.package = package if package is not None else build_package(key)
        self.alias = ALIAS
        self.name = "Acme Ltd"
        self.users = {USER: PASSWORD}
        self.device_types = [DEVICE_TYPE, "android-arm64"]
        self.advertised_key: bytes | None = None  # another key in v1/portal
        self.resolve_failure: Failure | None = None
        self.tunnel_failure: Failure | None = None
        self.logon_failure: Failure | None = None
        self.redirect_portal: str | None = None
        self.edit_logon: Callable[[dict[str, Any]], None] | None = None  # changes the 200 body
        self.cut_after: int | None = None  # cut the next download off after this many bytes
        self.cuts = 0  # how many downloads to cut off
        self.honour_ranges = True  # False: answer every range request with the whole package
        self.stall = threading.Event()  # set: v1/portal waits until `release` is set
        self.release = threading.Event()
        self.requests: list[Recorded] = []
        self.sessions: dict[str, str] = {}
        self._lock = threading.Lock()
        self._counter = 0
        self._server = _QuietServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.scheme = "http"
        if tls is not None:  # handshakes happen in accept(): fine for a test server
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    # lifecycle
    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def package_id(self) -> str:
        return package_id(self.package)

    def next_request_id(self) -> str:
        with self._lock:
            self._counter += 1
            return f"req-{self._counter:04d}"

    def record(self, item: Recorded) -> None:
        with self._lock:
            self.requests.append(item)

    def paths(self) -> list[str]:
        with self._lock:
            return [f"{r.method} {r.path}" for r in self.requests]

    def downloads(self) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if "/v1/package/" in r.path]

    def logons(self) -> list[dict[str, Any]]:
        with self._lock:
            found = [r for r in self.requests if r.path.endswith("v1/logon")]
        return [json.loads(r.body) for r in found]

    def portal_document(self) -> dict[str, Any]:
        key = self.advertised_key if self.advertised_key is not None else public_raw(self.key)
        return {
            "api": 1,
            "name": self.name,
            "key": base64.b64encode(key).decode(),
            "fingerprint": hashlib.sha256(key).hexdigest()[:16],
            "device_types": list(self.device_types),
        }


def _handler_for(portal: FakePortal) -> type[BaseHTTPRequestHandler]:
    class Handler(_PortalHandler):
        fake = portal

    return Handler


class _PortalHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakePortal

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # plumbing
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        *,
        length: int | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("X-Request-Id", self._request_id)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, data: object, headers: Mapping[str, str] | None = None) -> None:
        self._send(
            status,
            json.dumps(data).encode(),
            {"Content-Type": "application/json", **(headers or {})},
        )

    def _error(self, failure: Failure, message: str = "simulated failure") -> None:
        status, code, retry = failure
        headers = {"Retry-After": str(retry)} if retry is not None else {}
        self._json(
            status, {"error": code, "message": message, "request_id": self._request_id}, headers
        )

    # dispatch
    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        fake = self.fake
        self._request_id = self.headers.get("X-Request-Id") or fake.next_request_id()
        body = self._body()
        fake.record(Recorded(self.command, self.path, dict(self.headers.items()), body))
        path = self.path
        if path.startswith("/v1/resolve/"):
            return self._resolve(path[len("/v1/resolve/") :])
        prefix = f"/t/{fake.alias}/"
        if path.startswith("/t/"):
            if not path.startswith(prefix):
                return self._error((404, "unknown_alias", None), "no tenant serves this alias")
            if fake.tunnel_failure is not None:
                return self._error(fake.tunnel_failure)
            path = "/" + path[len(prefix) :]
        self._portal(path, body)

    def _resolve(self, alias: str) -> None:
        fake = self.fake
        if fake.resolve_failure is not None:
            return self._error(fake.resolve_failure)
        if alias.lower() != fake.alias:
            return self._error((404, "unknown_alias", None), "no tenant serves this alias")
        self._json(200, {"alias": fake.alias, "online": True, "tunnel": f"/t/{fake.alias}/"})

    def _portal(self, path: str, body: bytes) -> None:
        if path == "/v1/portal" and self.command == "GET":
            return self._portal_document()
        if path == "/v1/logon" and self.command == "POST":
            return self._logon(body)
        if path.startswith("/v1/package/") and self.command in ("GET", "HEAD"):
            return self._package(path[len("/v1/package/") :])
        self._error((404, "not_found", None), "no such resource")

    def _portal_document(self) -> None:
        fake = self.fake
        if fake.redirect_portal is not None:
            return self._send(302, b"", {"Location": fake.redirect_portal})
        if fake.stall.is_set():
            fake.release.wait(30)
        self._json(200, fake.portal_document())

    def _logon(self, body: bytes) -> None:
        fake = self.fake
        try:
            request = json.loads(body)
            user, password = request["user"], request["password"]
            device_type, device_id = request["device_type"], request["device_id"]
        except (ValueError, KeyError, TypeError):
            return self._error((400, "bad_request", None), "the logon request is malformed")
        if not isinstance(device_id, str) or not 0 < len(device_id) <= 128:
            return self._error((400, "bad_request", None), "device_id is missing or too long")
        if fake.logon_failure is not None:
            return self._error(fake.logon_failure, "too many attempts")
        if fake.users.get(user) != password:
            return self._error((401, "logon_failed", None), "logon failed")
        if device_type not in fake.device_types:
            known = ", ".join(fake.device_types)
            return self._error((404, "unknown_device_type", None), f"known device types: {known}")
        session = f"s-{fake.next_request_id()}"
        ident = fake.package_id
        fake.sessions[session] = ident
        package = {
            "id": ident,
            "url": f"v1/package/{ident}",
            "size": len(fake.package),
            "sha256": ident,
            "etag": f'"{ident}"',
        }
        answer = {"session": session, "expires_in": 900, "package": package}
        if fake.edit_logon is not None:
            fake.edit_logon(answer)
        self._json(200, answer)

    def _package(self, ident: str) -> None:
        fake = self.fake
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
        if token not in fake.sessions:
            return self._error((401, "session_invalid", None), "the session is not valid")
        if fake.sessions[token] != ident or ident != fake.package_id:
            return self._error((404, "not_found", None), "no such package")
        data, etag = fake.package, f'"{ident}"'
        start, status = self._range(len(data), etag)
        if start is None:
            return
        headers = {"ETag": etag, "Accept-Ranges": "bytes", "Content-Type": "application/zip"}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._send_body(status, data[start:], headers)

    def _range(self, size: int, etag: str) -> tuple[int | None, int]:
        wanted = self.headers.get("Range")
        if (
            not self.fake.honour_ranges
            or not wanted
            or not wanted.startswith("bytes=")
            or not wanted.endswith("-")
        ):
            return 0, 200
        if_range = self.headers.get("If-Range")
        if if_range is not None and if_range != etag:
            return 0, 200
        start = int(wanted[len("bytes=") : -1])
        if start >= size:
            self._send(416, b"", {"Content-Range": f"bytes */{size}"})
            return None, 416
        return start, 206

    def _send_body(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        fake = self.fake
        if fake.cuts > 0 and fake.cut_after is not None and self.command == "GET":
            fake.cuts -= 1
            self._send(status, b"", headers, length=len(body))
            self.wfile.write(body[: fake.cut_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self._send(status, body, headers)


# --- running the CLI in process --------------------------------------------------------------


class TtyInput(io.StringIO):
    """A stdin that says it is a terminal, with the given answers."""

    def isatty(self) -> bool:
        return True


@dataclass
class CliRun:
    code: int
    out: str
    err: str


def run_bootloader(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdin: io.StringIO | None = None,
) -> CliRun:
    from bootloader.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = main(
        list(argv),
        env=dict(env or {}),
        stdin=stdin if stdin is not None else io.StringIO(""),
        stdout=out,
        stderr=err,
    )
    return CliRun(code, out.getvalue(), err.getvalue())


def iter_files(root: Path) -> Iterator[str]:
    """Relative paths of the regular files below ``root``, sorted."""
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            yield path.relative_to(root).as_posix()
