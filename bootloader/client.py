"""HTTP with ``http.client``: resolve an alias at the CSC, ask the portal who it is, log on.

Everything here is synchronous and standard library only (the bootloader ships as a zipapp).

Invariants:

* One connection per request; the socket timeout bounds the connect and every single read.
* Redirects are reported with their target, never followed.
* A JSON answer is read up to :data:`MAX_JSON` bytes and must be an object; anything else is a
  failure of the caller's stage, never a traceback.
* Every failure is a :class:`~bootloader.errors.BootError` of the stage given by the caller,
  carrying the ``X-Request-Id`` of the answer (or of the JSON error body) when there is one, and
  a hint built from the stable error codes of docs/operations.md and docs/provisioning.md.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import http.client
import json
import math
import re
import socket
import ssl
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeGuard

from bootloader.errors import BootError, Stage, printable
from shared import resolve_sig

#: the variable that names the CSC (read by bootloader/cli.py; named in hints here)
ENV_CSC = "CSC_BOOTLOADER_CSC"

MAX_JSON = 1 << 20
API_VERSION = 1
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A base URL: every request path is relative to ``path`` (which ends with ``/``)."""

    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urllib.parse.urlsplit(url)
        default = 443 if parts.scheme == "https" else 80
        path = parts.path if parts.path.endswith("/") else parts.path + "/"
        return cls(parts.scheme, parts.hostname or "", parts.port or default, path)

    def url(self, rel: str = "") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}{rel}"

    def below(self, path: str) -> Endpoint:
        """The endpoint whose base is ``path`` (absolute) under this one's origin."""
        return Endpoint(self.scheme, self.host, self.port, path)


@dataclass(frozen=True, slots=True)
class PortalInfo:
    name: str
    key: bytes
    fingerprint: str
    device_types: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PackageRef:
    id: str
    url: str
    size: int
    sha256: str
    etag: str


@dataclass(frozen=True, slots=True)
class Session:
    token: str
    expires_in: float
    package: PackageRef


def fingerprint_of(key: bytes) -> str:
    """docs/provisioning.md: the first 8 bytes of SHA-256 over the raw key, lowercase hex."""
    return hashlib.sha256(key).hexdigest()[:16]


def retry_hint(seconds: float | None) -> str:
    if seconds is None:
        return "try again later"
    if seconds >= 120:
        return f"try again in {math.ceil(seconds / 60)} min"
    return f"try again in {max(1, math.ceil(seconds))} s"


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now (delta-seconds or an HTTP date), None if absent/bad."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Answer:
    """One response, open for reading; closing it closes its connection."""

    def __init__(
        self, stage: Stage, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse
    ) -> None:
        self.stage = stage
        self._conn = conn
        self._resp = resp
        self.status = resp.status
        self.reason = resp.reason
        self.headers = resp.headers
        self.request_id: str | None = resp.getheader("X-Request-Id")
        self.contact: str | None = None  # whom to ask, from the CSC's "tenant" of an error body

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._resp.close()
        self._conn.close()

    def header(self, name: str) -> str | None:
        return self._resp.getheader(name)

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes of the body (b"" at its end); transport errors propagate."""
        return self._resp.read(size)

    def fail(self, message: str, code: str | None = None) -> BootError:
        return BootError(self.stage, message, request_id=self.request_id, code=code)

    def json(self, what: str) -> dict[str, Any]:
        """The body as a JSON object; ``what`` names the sender in errors ("the portal")."""
        try:
            data = self._resp.read(MAX_JSON + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise self.fail(f"{what} broke off its answer ({_describe(exc)}); try again") from None
        if len(data) > MAX_JSON:
            raise self.fail(f"{what} sent an answer larger than {MAX_JSON // 1024} KiB")
        try:
            value = json.loads(data)
        except (ValueError, RecursionError):  # also too many digits or nested too deep
            raise self.fail(f"{what} answered HTTP {self.status} with something not JSON") from None
        if not isinstance(value, dict):
            raise self.fail(f"{what} answered HTTP {self.status} with JSON that is not an object")
        return value

    def error_body(self) -> tuple[str, str]:
        """``(code, message)`` of a JSON error body, or ``("", "")``; fills in the request id."""
        try:
            body = self._resp.read(MAX_JSON)
            data = json.loads(body)
        except (OSError, http.client.HTTPException, ValueError, RecursionError):
            return "", ""
        if not isinstance(data, dict):
            return "", ""
        if self.request_id is None and isinstance(data.get("request_id"), str):
            self.request_id = data["request_id"]
        tenant = data.get("tenant")
        contact = tenant.get("contact") if isinstance(tenant, dict) else None
        if isinstance(tenant, dict) and isinstance(contact, str) and contact.strip():
            name = tenant.get("name")
            who = f"{printable(name, 80)}: " if isinstance(name, str) and name.strip() else ""
            self.contact = who + printable(contact, 120)
        code, message = data.get("error"), data.get("message")
        return (
            code if isinstance(code, str) else "",
            printable(message) if isinstance(message, str) else "",
        )


class Transport:
    """Opens one connection per request, with a timeout and optional TLS settings."""

    def __init__(
        self,
        *,
        timeout: float,
        ca_file: str | None = None,
        user_agent: str = "csc-bootloader",
        ca_data: str | None = None,
    ) -> None:
        self.timeout = timeout
        self.user_agent = user_agent
        self._ca_file = ca_file
        self._ca_data = ca_data  # the preset's CA (PEM), when no --ca-file is given
        self._ssl: ssl.SSLContext | None = None

    def _context(self, stage: Stage) -> ssl.SSLContext:
        if self._ssl is None:
            try:
                self._ssl = ssl.create_default_context(
                    cafile=self._ca_file, cadata=self._ca_data if self._ca_file is None else None
                )
            except (OSError, ssl.SSLError) as exc:
                where = self._ca_file or "the built-in CA of the CSC"
                raise BootError(stage, f"cannot load the CA file {where}: {exc}") from None
        return self._ssl

    def request(
        self,
        stage: Stage,
        endpoint: Endpoint,
        method: str,
        rel: str,
        *,
        who: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """Send one request; ``who`` names the server in errors ("the CSC at …")."""
        conn: http.client.HTTPConnection
        if endpoint.scheme == "https":
            conn = http.client.HTTPSConnection(
                endpoint.host, endpoint.port, timeout=self.timeout, context=self._context(stage)
            )
        else:
            conn = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=self.timeout)
        head = {"User-Agent": self.user_agent, "Accept": "application/json", **(headers or {})}
        try:
            conn.request(method, endpoint.path + rel, body=body, headers=head)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise BootError(stage, self.describe_failure(exc, who, endpoint)) from None
        return Answer(stage, conn, resp)

    def describe_failure(self, exc: BaseException, who: str, endpoint: Endpoint) -> str:
        if isinstance(exc, socket.gaierror):
            return f"cannot find the host {endpoint.host}; check the address and the network"
        if isinstance(exc, ConnectionRefusedError):
            return f"{who} refused the connection; check the address and that it is running"
        if isinstance(exc, TimeoutError):
            return (
                f"{who} did not answer within {self.timeout:g} s; check the network, or allow "
                "more time with --timeout"
            )
        if isinstance(exc, ssl.SSLCertVerificationError):
            return (
                f"the TLS certificate of {who} is not trusted ({exc.verify_message}); give the "
                "right CA with --ca-file"
            )
        if isinstance(exc, ssl.SSLError):
            return f"TLS with {who} failed ({exc.reason}); does it speak TLS on that port?"
        if isinstance(exc, http.client.HTTPException | ConnectionError):
            return f"{who} closed the connection without a valid answer; try again"
        return f"cannot reach {who} ({_describe(exc)}); check the network"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return printable(str(exc) or type(exc).__name__, 120)


# --- error answers -------------------------------------------------------------------------


def failure(
    answer: Answer, *, who: str, subject: str, known: Mapping[str, str] | None = None
) -> BootError:
    """The error for a non-success ``answer``: ``known`` maps codes to stage-specific texts
    (``{retry}`` and ``{message}`` are filled in); the CSC's codes are understood everywhere.
    ``subject`` names the portal ("acme@example.com", "the proxy h:p")."""
    if 300 <= answer.status < 400:
        location = printable(answer.header("Location") or "?", 200)
        return answer.fail(f"{who} redirects to {location}; use that address instead")
    code, message = answer.error_body()
    retry = retry_hint(parse_retry_after(answer.header("Retry-After")))
    template = (known or {}).get(code) or _COMMON.get(code)
    if template is not None:
        text = template.format(who=who, subject=subject, retry=retry, message=message or code)
        if answer.contact:
            text += f"; for help, contact {answer.contact}"
        return answer.fail(text, code)
    detail = f": {message}" if message else ""
    status = f"HTTP {answer.status} {printable(answer.reason, 80)}"
    return answer.fail(f"{who} answered {status}{detail}", code or None)


_COMMON = {
    "bad_alias": "the CSC refuses the alias {subject}: {message}",
    "unknown_alias": "no portal is registered for the alias {subject}; check the alias",
    "portal_offline": "the portal of {subject} is offline; {retry}",
    "going_away": "the CSC is restarting; {retry}",
    "too_many_streams": "the CSC is busy; {retry}",
    "too_many_connections": "the CSC holds too many connections from this address; {retry}",
    "upstream_refused": "the portal of {subject} cannot be reached ({message}); {retry}",
    "upstream_reset": "the portal of {subject} broke off ({message}); {retry}",
    "upstream_error": "the portal of {subject} sent an invalid answer ({message}); {retry}",
    "agent_lost": "the connection to the portal of {subject} was lost; {retry}",
    "upstream_timeout": "the portal of {subject} did not answer in time; {retry}",
}


# --- the requests ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resolved:
    """Where the portal is, and whom the CSC says it belongs to."""

    base: Endpoint
    #: the tenant's display name and support contact ("" when the CSC did not say)
    tenant: str
    contact: str
    #: the CSC's signature over them checked with the key this bootloader carries
    verified: bool


def resolve(transport: Transport, csc: str, alias: str, csc_key: str | None = None) -> Resolved:
    """``GET {csc}/v1/resolve/{alias}``: the portal's base (``{csc}/t/{alias}/``) and its owner.

    With ``csc_key`` (the CSC's resolve key) the answer must be signed by it
    (shared/resolve_sig.py); anything else stops the run here, before the portal is contacted.
    """
    endpoint = Endpoint.parse(csc + "/")
    who = f"the CSC at {csc}"
    rel = f"v1/resolve/{urllib.parse.quote(alias, safe='@')}"
    hint = f"if {csc} is not your CSC, give it with --csc URL or {ENV_CSC}"
    try:
        answer = transport.request(Stage.RESOLVE, endpoint, "GET", rel, who=who)
    except BootError as exc:  # not reached at all: perhaps not the right CSC
        raise BootError(exc.stage, f"{exc.message}; {hint}") from None
    with answer:
        if answer.status != 200:
            refused = failure(answer, who=who, subject=alias)
            if refused.code is None:  # not a CSC's error answer: perhaps not a CSC at all
                refused.message = f"{refused.message}; {hint}"
            raise refused
        data = answer.json(who)
        tunnel = data.get("tunnel")
        if data.get("online") is False:
            raise answer.fail(f"the portal of {alias} is offline; try again later")
        if not _is_plain_path(tunnel):
            raise answer.fail(f"{who} answered without a usable tunnel path")
        assert isinstance(tunnel, str)
        owner = data.get("tenant")
        name = owner.get("name") if isinstance(owner, dict) else None
        contact = owner.get("contact") if isinstance(owner, dict) else None
        verified = False
        if csc_key is not None:
            key = resolve_sig.parse_public_key(csc_key)
            good = (
                key is not None
                and isinstance(name, str)
                and isinstance(contact, str)
                and resolve_sig.verify(key, data.get("signature"), alias, name, contact, tunnel)
            )
            if not good:
                raise answer.fail(
                    f"the answer for {alias} is not signed by the key of the CSC this bootloader "
                    f"came with: someone may be in the way, or {csc} is another CSC; nothing "
                    "was sent to the portal"
                )
            verified = True
    base = endpoint.path.rstrip("/") + (tunnel if tunnel.endswith("/") else tunnel + "/")
    return Resolved(
        endpoint.below(base),
        printable(name, 120) if isinstance(name, str) else "",
        printable(contact, 120) if isinstance(contact, str) else "",
        verified,
    )


def _is_plain_path(value: object) -> bool:
    if not isinstance(value, str) or not value.startswith("/") or value.startswith("//"):
        return False
    if any(ch in value for ch in "?#\\ ") or not _is_header_text(value) or len(value) > 1024:
        return False
    return ".." not in value.split("/")


def portal_info(transport: Transport, base: Endpoint, subject: str) -> PortalInfo:
    """``GET v1/portal``: the portal's name, key and device types (docs/provisioning.md)."""
    who = f"the portal of {subject}"
    with transport.request(Stage.CONNECT, base, "GET", "v1/portal", who=who) as answer:
        if answer.status != 200:
            raise failure(answer, who=who, subject=subject)
        data = answer.json(who)
        api = data.get("api")
        if api != API_VERSION:
            raise answer.fail(
                f"{who} speaks API {printable(api, 20)}; this bootloader speaks {API_VERSION}: "
                "get the bootloader your portal offers"
            )
        return _portal_info(answer, who, data)


def _portal_info(answer: Answer, who: str, data: dict[str, Any]) -> PortalInfo:
    name, key_text, fp = data.get("name"), data.get("key"), data.get("fingerprint")
    types = data.get("device_types")
    if not isinstance(name, str) or not isinstance(key_text, str) or not isinstance(fp, str):
        raise answer.fail(f"{who} described itself without a name, key or fingerprint")
    try:
        key = base64.b64decode(key_text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise answer.fail(f"{who} sent a key that is not a base64 Ed25519 public key")
    if fp.lower() != fingerprint_of(key):
        raise answer.fail(f"{who} sent a fingerprint that does not belong to its key")
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        raise answer.fail(f"{who} sent no list of device types")
    return PortalInfo(printable(name, 120), key, fingerprint_of(key), tuple(types))


def logon(
    transport: Transport,
    base: Endpoint,
    subject: str,
    *,
    user: str,
    password: str,
    device_type: str,
    device_id: str,
) -> Session:
    """``POST v1/logon``; 401/404/429 and the others become logon errors with hints."""
    who = f"the portal of {subject}"
    body = json.dumps(
        {"user": user, "password": password, "device_type": device_type, "device_id": device_id}
    ).encode()
    headers = {"Content-Type": "application/json"}
    with transport.request(
        Stage.LOGON, base, "POST", "v1/logon", who=who, body=body, headers=headers
    ) as answer:
        if answer.status != 200:
            raise failure(answer, who=who, subject=subject, known=_logon_texts(device_type))
        return _session(answer, who, answer.json(who))


def _logon_texts(device_type: str) -> dict[str, str]:
    shown = printable(device_type, 60).replace("{", "{{").replace("}", "}}")
    return {
        "logon_failed": "wrong user name or password",
        "unknown_device_type": f"the portal has no device type {shown} ({{message}}); "
        "choose one with --device-type",
        "too_many_attempts": "too many failed logons; {retry}",
        "bad_request": "the portal refused the logon request: {message}",
    }


def _session(answer: Answer, who: str, data: dict[str, Any]) -> Session:
    token, expires, package = data.get("session"), data.get("expires_in", 0), data.get("package")
    if not _is_header_text(token) or not isinstance(package, dict):
        raise answer.fail(f"{who} accepted the logon but sent no session or package")
    ident, url, size = package.get("id"), package.get("url"), package.get("size")
    sha, etag = package.get("sha256"), package.get("etag")
    valid = (
        isinstance(ident, str)
        and _SHA256_RE.fullmatch(ident) is not None
        and sha == ident
        and isinstance(url, str)
        and _is_relative_url(url)
        and isinstance(size, int)
        and not isinstance(size, bool)
        and size > 0
        and _is_header_text(etag)
        and isinstance(expires, int | float)
    )
    if not valid:
        raise answer.fail(f"{who} described the package wrongly (id, url, size, sha256, etag)")
    assert isinstance(ident, str) and isinstance(url, str) and isinstance(size, int)
    assert isinstance(etag, str) and isinstance(expires, int | float)
    return Session(token, float(expires), PackageRef(ident, url, size, ident, etag))


def _is_header_text(value: object) -> TypeGuard[str]:
    """Non-empty printable ASCII, so that it can travel in a header unchanged."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= 4096
        and value.isascii()
        and value.isprintable()
    )


def _is_relative_url(url: str) -> bool:
    """A path below the portal's base: no scheme, host, leading slash, ``..``, query."""
    if not _is_header_text(url) or url.startswith("/") or len(url) > 1024:
        return False
    parts = urllib.parse.urlsplit(url)
    if parts.scheme or parts.netloc or parts.query or parts.fragment:
        return False
    return ".." not in url.split("/") and " " not in url
