"""TLS on cluster peer links (docs/protocol.md §9, docs/security.md "Cluster peer links").

Every node of a cluster derives, from the cluster secret alone, the same Ed25519 key (HKDF-SHA256)
and the same self-signed certificate (fixed subject, validity and extensions, a serial taken
from the key; Ed25519 signatures are deterministic, so every node builds identical bytes). Both
ends of a peer link present that certificate and accept only it: it is the one trust anchor of
both contexts, so a node holding another secret (or no secret) fails the handshake. Operators
with their own PKI give ``peer_tls_cert``/``peer_tls_key``/``peer_tls_ca`` instead; any
certificate that CA issued is then accepted (the HELLO token still needs the secret).

Invariants: TLS 1.3 only; a certificate is required and verified on both sides; no host name
check (nodes dial pod IPs) but the chain must end at the configured anchor; the private key
never lands in a file others can read (it is handed to OpenSSL through an anonymous memory
file, or where there is none a 0600 temporary file removed at once). The handshakes themselves
are asyncio's (``ssl=`` on the listener and the dialler, with a bound); :func:`describe` turns a
failed one into a line that says what to check, logged by the dialler and, through the
listener context's ``sslobject_class``, by the listener.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import ssl
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("csc.peer")

#: HKDF salt and info: a new derivation (another key or certificate) needs a new version here
_SALT = b"csc cluster peer tls"
_INFO = b"csc peer-tls ed25519 key v1"
#: the derived certificate's subject (and issuer: it signs itself)
SUBJECT = "csc cluster peer"
_NOT_BEFORE = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)
#: what a plain node sees when a TLS node talks to it: a handshake or alert record of TLS 1.x
_TLS_RECORD_TYPES = (0x15, 0x16)

MISMATCH_HINT = "is peer_tls the same on every node?"


@dataclass(eq=False)
class PeerFiles:
    """The operator's certificate, key and CA, and what they held when last read (so that
    renewed files are noticed: :func:`reload`)."""

    cert: Path
    key: Path
    ca: Path
    seen: tuple[bytes, bytes, bytes] | None = None

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(certificate, key, CA); ValueError naming the file that cannot be read."""
        return (
            _read("peer_tls_cert", self.cert),
            _read("peer_tls_key", self.key),
            _read("peer_tls_ca", self.ca),
        )


def _read(name: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{name} {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True, eq=False)
class PeerTLS:
    """The two contexts of a node's peer links: ``server`` for the listener, ``client`` for
    the dialler; ``files`` when they come from the operator's files (else the identity derived
    from the cluster secret)."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    files: PeerFiles | None = None


# -- the identity derived from the cluster secret ----------------------------------------------


def derived_key(secret: bytes) -> Ed25519PrivateKey:
    """The cluster's peer-link key: the same on every node holding ``secret``."""
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=_INFO).derive(secret)
    return Ed25519PrivateKey.from_private_bytes(seed)


def derived_certificate(key: Ed25519PrivateKey) -> x509.Certificate:
    """The self-signed certificate of ``key``: identical bytes wherever it is built."""
    public = key.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SUBJECT)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(int.from_bytes(hashlib.sha256(raw).digest()[:16], "big") >> 1 | 1)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    return builder.sign(key, algorithm=None)


def derived_identity(secret: bytes) -> tuple[bytes, bytes]:
    """The PEM certificate and PEM (PKCS#8, unencrypted) key derived from ``secret``."""
    key = derived_key(secret)
    cert = derived_certificate(key).public_bytes(serialization.Encoding.PEM)
    pem_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert, pem_key


# -- contexts ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _private_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can read ``data`` from, gone when the block ends: an anonymous memory
    file (Linux), else a 0600 temporary file."""
    memfd_create: Callable[[str, int], int] | None = getattr(os, "memfd_create", None)
    if memfd_create is not None and os.path.isdir("/proc/self/fd"):
        fd = memfd_create("csc-peer-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="csc-peer-tls-")  # created 0600
    try:
        os.write(fd, data)
        os.close(fd)
        fd = -1
        yield path
    finally:
        if fd >= 0:
            os.close(fd)
        os.unlink(path)


def _context(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # nodes dial pod IPs; the anchor alone decides
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _ListenerTLS(ssl.SSLObject):
    """The listener's side of a handshake, which says why it refused one: asyncio's server
    closes such a connection without a word (only its debug mode logs it)."""

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            log.warning("peer link refused: %s", describe(exc))
            raise


def contexts_from_pem(
    cert: bytes, key: bytes, anchors: bytes, files: PeerFiles | None = None
) -> PeerTLS:
    """Contexts presenting ``cert`` (with ``key``) and accepting only chains to ``anchors``."""
    pair = PeerTLS(_context(ssl.PROTOCOL_TLS_SERVER), _context(ssl.PROTOCOL_TLS_CLIENT), files)
    pair.server.sslobject_class = _ListenerTLS
    pair.server.num_tickets = 0  # links are persistent: no session to resume
    _load(pair, cert, key, anchors)
    return pair


def _load(pair: PeerTLS, cert: bytes, key: bytes, anchors: bytes) -> None:
    with _private_file(cert + b"\n" + key) as path:
        for ctx in (pair.server, pair.client):
            ctx.load_cert_chain(path)
    for ctx in (pair.server, pair.client):
        ctx.load_verify_locations(cadata=anchors.decode("ascii"))


def derived_contexts(secret: bytes) -> PeerTLS:
    """Contexts for the identity derived from the cluster secret (its own and only anchor)."""
    cert, key = derived_identity(secret)
    return contexts_from_pem(cert, key, cert)


def peer_contexts(
    secret: bytes, cert: Path | None = None, key: Path | None = None, ca: Path | None = None
) -> PeerTLS:
    """A node's peer-link contexts: the operator's files when given (all three), else the
    identity derived from ``secret``. Raises ValueError naming the file that cannot be used."""
    if cert is None or key is None or ca is None:
        return derived_contexts(secret)
    files = PeerFiles(cert, key, ca)
    files.seen = files.read()
    try:
        return contexts_from_pem(*files.seen, files)
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(f"peer_tls_cert/peer_tls_key/peer_tls_ca cannot be used: {exc}") from None


def reload(pair: PeerTLS) -> bool:
    """Present a renewed certificate from now on: when the operator's files changed since they
    were last read and make a usable set, load them into both live contexts (new handshakes
    use them; links already up keep theirs). A CA added to ``peer_tls_ca`` is trusted from
    then on; one removed stays trusted until the node restarts (so a CA can be rolled over).
    A set that cannot be used (a certificate renewed before its key, say) is logged and left
    alone until the files change again. True when the new files were loaded."""
    files = pair.files
    if files is None:
        return False
    try:
        data = files.read()  # a few KiB; compared whole, so no rewrite within a tick is missed
    except ValueError:
        return False  # a file missing for a moment (being replaced): looked at again next time
    if data == files.seen:
        return False
    files.seen = data
    cert, key, anchors = data
    try:
        contexts_from_pem(cert, key, anchors)  # a trial: refuses a key of another certificate
    except (ssl.SSLError, ValueError) as exc:
        log.warning(
            "peer_tls_cert/peer_tls_key/peer_tls_ca changed but cannot be used (%s); "
            "the peer links keep the certificate loaded before",
            exc,
        )
        return False
    _load(pair, cert, key, anchors)
    log.info("peer-link certificate reloaded from %s", files.cert)
    return True


# -- handshakes --------------------------------------------------------------------------------


def looks_like_tls(data: bytes | bytearray) -> bool:
    """Whether the first bytes a plain peer link received are a TLS record (a handshake or
    an alert): the other node has peer_tls on and this one has not."""
    return len(data) >= 2 and data[0] in _TLS_RECORD_TYPES and data[1] == 0x03


def describe(exc: BaseException) -> str:
    """A failed handshake in one line, with what to check."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"the other node's certificate was refused ({exc.verify_message}): "
            "another cluster secret, or a certificate not issued by peer_tls_ca?"
        )
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNEXPECTED_EOF_WHILE_READING"):
            return f"TLS handshake failed ({reason}): {MISMATCH_HINT}"
        return f"TLS handshake failed ({reason}): another cluster secret or peer_tls_ca?"
    if isinstance(exc, TimeoutError):
        return f"no TLS handshake in time: {MISMATCH_HINT}"
    return f"TLS handshake failed ({exc!r}): {MISMATCH_HINT}"
