"""Agent tokens: JWTs signed by the operator, naming a tenant and the aliases it may serve.

Key files live in the CSC's state directory: ``signing-key.pem`` (private, mode 0600, the
directory 0700 when created here) and ``signing-key.pub.pem``. The CSC needs only the public key.

Invariants of :func:`verify_token`:

* The algorithm is pinned: the header's ``alg`` must be in ``algorithms`` (``EdDSA`` by default);
  ``none`` is never accepted, and a key is only ever used with the algorithm family of its type, so
  an asymmetric public key can never serve as an HMAC secret (the "key confusion" attack). HS256
  works only when the caller lists it *and* passes a ``bytes`` secret.
* The signature is checked before any claim is looked at; claims ``exp``, ``aud``, ``iss``,
  ``jti``, ``tenant`` and ``aliases`` are required; the tenant id matches :data:`TENANT_RE` and
  every alias is a valid grant (``shared.aliases.normalise_grant``).
* Every failure raises :class:`shared.errors.AuthFailed` whose message is a short, precise
  reason ("token expired", "wrong audience", "bad signature", "missing claim 'jti'", ...), fit
  for logs; it says nothing a forger could use beyond that.

:class:`VerifiedTokens` remembers successful verifications by the token's SHA-256 (bounded, least
recently used first out) and re-checks only the expiry on a hit; see its docstring.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import (
    EllipticCurvePrivateKey,
    EllipticCurvePublicKey,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from shared.aliases import normalise_grant
from shared.config import parse_duration
from shared.errors import AuthFailed, BadAlias
from shared.files import create_exclusive, ensure_private_dir, write_atomic
from shared.jwtsegment import segment_json

SIGNING_KEY_FILE = "signing-key.pem"
PUBLIC_KEY_FILE = "signing-key.pub.pem"
TENANT_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
MAX_TOKEN_LENGTH = 16 * 1024
DEFAULT_LEEWAY = 30.0
#: Tokens a :class:`VerifiedTokens` remembers (about 300 bytes each).
VERIFIED_TOKENS = 16384

PrivateKey = Ed25519PrivateKey | RSAPrivateKey | EllipticCurvePrivateKey
PublicKey = Ed25519PublicKey | RSAPublicKey | EllipticCurvePublicKey
#: What verification accepts: public keys, or ``bytes`` secrets for explicitly allowed HS*.
VerifyKey = PublicKey | bytes

_KEY_TYPES_BY_ALG: dict[str, tuple[type, ...]] = {
    "EdDSA": (Ed25519PublicKey,),
    **dict.fromkeys(("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"), (RSAPublicKey,)),
    **dict.fromkeys(("ES256", "ES384", "ES512"), (EllipticCurvePublicKey,)),
    **dict.fromkeys(("HS256", "HS384", "HS512"), (bytes,)),
}
_EC_ALGS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


class SigningKeyError(Exception):
    """A key file is missing, unreadable or not a supported key."""


@dataclass(frozen=True, slots=True)
class AgentClaims:
    """What a verified agent token grants."""

    tenant: str
    aliases: tuple[str, ...]
    jti: str
    expires_at: float
    issuer: str


def check_tenant_id(tenant: str) -> str:
    """Return ``tenant`` if it is a valid tenant id, else raise ValueError."""
    if not isinstance(tenant, str) or TENANT_RE.fullmatch(tenant) is None:
        raise ValueError(
            f"{tenant!r} is not a valid tenant id (lower-case letters, digits, '.', '_', '-'; "
            "at most 63 characters, starting with a letter or digit)"
        )
    return tenant


def parse_ttl(text: str) -> float:
    """A token lifetime in seconds from ``"30d"``, ``"12h"``, ``"3600"``; must be positive."""
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"{text!r}: a token lifetime must be positive")
    return seconds


def key_id(key: PublicKey) -> str:
    """A short stable id of a public key (the ``kid`` header): SHA-256 of its SPKI, 16 hex."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]


# --- key files ---------------------------------------------------------------------------------


def _public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def create_ed25519_key_file(path: Path) -> Ed25519PrivateKey:
    """A new Ed25519 private key, written to ``path`` (PKCS#8 PEM, mode 0600) exactly once.

    FileExistsError if ``path`` exists: the file is published with a hard link, which never
    replaces one, so concurrent creators end up sharing the first key.
    """
    ensure_private_dir(path.parent)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    create_exclusive(path, pem, mode=0o600)
    return key


def load_private_key_file(path: Path, what: str) -> object:
    """The PEM private key in ``path`` (any type), or SigningKeyError naming ``what`` it is."""
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise SigningKeyError(f"{path}: cannot read the {what}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path}: not a usable PEM private key: {exc}") from None


def generate_keypair(state_dir: Path) -> Ed25519PrivateKey:
    """Create a new Ed25519 key pair in ``state_dir``; FileExistsError if a key is already there."""
    key = create_ed25519_key_file(state_dir / SIGNING_KEY_FILE)
    write_atomic(state_dir / PUBLIC_KEY_FILE, _public_pem(key), mode=0o644)
    return key


def load_signing_key(path: Path) -> PrivateKey:
    """Load a PEM private key (Ed25519, RSA or EC) or raise SigningKeyError."""
    key = load_private_key_file(path, "signing key")
    if not isinstance(key, PrivateKey):
        raise SigningKeyError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def load_or_create_signing_key(state_dir: Path) -> tuple[PrivateKey, bool]:
    """The signing key of ``state_dir`` and whether it was created now.

    Safe against a concurrent creator: the key file is created with a hard link, which never
    replaces an existing file, so both callers end up with the same key. The public key file is
    (re)written when missing.
    """
    path = state_dir / SIGNING_KEY_FILE
    if not path.exists():
        try:
            return generate_keypair(state_dir), True
        except FileExistsError:
            pass  # somebody else won the race: use theirs
    key = load_signing_key(path)
    if not (state_dir / PUBLIC_KEY_FILE).exists():
        write_atomic(state_dir / PUBLIC_KEY_FILE, _public_pem(key), mode=0o644)
    return key, False


def load_public_key(path: Path) -> PublicKey:
    """Load a PEM public key (Ed25519, RSA or EC) or raise SigningKeyError."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise SigningKeyError(f"{path}: cannot read the public key: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path}: not a usable PEM public key: {exc}") from None
    if not isinstance(key, PublicKey):
        raise SigningKeyError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def load_public_keys(state_dir: Path) -> list[PublicKey]:
    """The public keys tokens are verified with (today: ``state_dir/signing-key.pub.pem``)."""
    path = state_dir / PUBLIC_KEY_FILE
    if not path.exists():
        raise SigningKeyError(
            f"no public key at {path}: issue a token with 'csc token issue' to create the key pair"
        )
    return [load_public_key(path)]


# --- issue -------------------------------------------------------------------------------------


def _algorithm_for(key: PrivateKey) -> str:
    if isinstance(key, Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(key, RSAPrivateKey):
        return "RS256"
    alg = _EC_ALGS.get(key.curve.name)
    if alg is None:
        raise ValueError(f"unsupported elliptic curve {key.curve.name}")
    return alg


def issue_token(
    private_key: PrivateKey,
    *,
    tenant: str,
    aliases: Iterable[str],
    ttl_seconds: float,
    audience: str,
    issuer: str,
    now: float | None = None,
    jti: str | None = None,
) -> str:
    """Sign an agent token. Raises ValueError for a bad tenant or ttl, BadAlias for a bad alias."""
    check_tenant_id(tenant)
    grants = list(dict.fromkeys(normalise_grant(a) for a in aliases))
    if not grants:
        raise ValueError("a token must grant at least one alias")
    if not ttl_seconds > 0:
        raise ValueError("a token lifetime must be positive")
    issued = int(time.time() if now is None else now)
    claims = {
        "iss": issuer,
        "aud": audience,
        "sub": tenant,
        "tenant": tenant,
        "aliases": grants,
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(ttl_seconds),
        "jti": jti or uuid.uuid4().hex,
    }
    headers = {"kid": key_id(private_key.public_key())}
    return jwt.encode(claims, private_key, algorithm=_algorithm_for(private_key), headers=headers)


# --- verify ------------------------------------------------------------------------------------


def _header(token: object) -> dict[str, Any]:
    if not isinstance(token, str) or not token:
        raise AuthFailed("malformed token")
    if len(token) > MAX_TOKEN_LENGTH:
        raise AuthFailed("malformed token: too long")
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthFailed("malformed token: expected three dot-separated parts")
    try:
        header = segment_json(parts[0])
    except (ValueError, UnicodeError, RecursionError):  # RecursionError: deeply nested JSON
        raise AuthFailed("malformed token: bad header") from None
    if not isinstance(header, dict) or not isinstance(header.get("alg"), str):
        raise AuthFailed("malformed token: bad header")
    return header


def _candidate_keys(keys: Sequence[VerifyKey], alg: str, kid: object) -> list[VerifyKey]:
    usable = [k for k in keys if isinstance(k, _KEY_TYPES_BY_ALG[alg])]
    if isinstance(kid, str):
        matching: list[VerifyKey] = [
            k for k in usable if not isinstance(k, bytes) and key_id(k) == kid
        ]
        if matching:
            return matching
    return usable


def _verified_payload(token: str, keys: Sequence[VerifyKey], alg: str) -> bytes:
    jws = jwt.PyJWS()
    for key in keys:
        try:
            result = jws.decode_complete(token, key, algorithms=[alg])
        except (jwt.InvalidSignatureError, jwt.InvalidKeyError, jwt.InvalidAlgorithmError):
            continue  # not this key: try the next one
        except jwt.PyJWTError:  # DecodeError, and header members PyJWT refuses (kid, crit)
            raise AuthFailed("malformed token") from None
        payload: bytes = result["payload"]
        return payload
    raise AuthFailed("bad signature")


def _numeric(payload: Mapping[str, Any], name: str) -> float | None:
    if name not in payload:
        return None
    value = payload[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthFailed(f"invalid claim {name!r}")
    return float(value)


def _require(payload: Mapping[str, Any], name: str) -> Any:
    if name not in payload:
        raise AuthFailed(f"missing claim {name!r}")
    return payload[name]


def _check_times(payload: Mapping[str, Any], now: float, leeway: float) -> float:
    exp = _numeric(payload, "exp")
    if exp is None:
        raise AuthFailed("missing claim 'exp'")
    if exp <= now - leeway:
        raise AuthFailed("token expired")
    for name in ("nbf", "iat"):
        moment = _numeric(payload, name)
        if moment is not None and moment > now + leeway:
            raise AuthFailed("token not yet valid")
    return exp


def _check_audience_issuer(payload: Mapping[str, Any], audience: str, issuer: str) -> None:
    aud = _require(payload, "aud")
    auds = [aud] if isinstance(aud, str) else aud
    if not isinstance(auds, list) or not all(isinstance(a, str) for a in auds):
        raise AuthFailed("invalid claim 'aud'")
    if audience not in auds:
        raise AuthFailed("wrong audience")
    if _require(payload, "iss") != issuer:
        raise AuthFailed("wrong issuer")


def _check_identity(payload: Mapping[str, Any]) -> tuple[str, str]:
    jti = _require(payload, "jti")
    if not isinstance(jti, str) or not jti or len(jti) > 128:
        raise AuthFailed("invalid claim 'jti'")
    tenant = _require(payload, "tenant")
    try:
        check_tenant_id(tenant)
    except ValueError:
        raise AuthFailed("invalid tenant id in claim 'tenant'") from None
    if "sub" in payload and payload["sub"] != tenant:
        raise AuthFailed("claim 'sub' does not match 'tenant'")
    return tenant, jti


def _check_aliases(payload: Mapping[str, Any]) -> tuple[str, ...]:
    raw = _require(payload, "aliases")
    if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
        raise AuthFailed("claim 'aliases' must be a list of strings")
    if not raw:
        raise AuthFailed("claim 'aliases' is empty")
    try:
        return tuple(dict.fromkeys(normalise_grant(a) for a in raw))
    except BadAlias as exc:
        raise AuthFailed(f"invalid alias in claims: {exc.message}") from None


def verify_token(
    token: str,
    public_keys: Sequence[VerifyKey],
    *,
    audience: str,
    issuer: str,
    algorithms: Sequence[str] = ("EdDSA",),
    leeway: float = DEFAULT_LEEWAY,
    now: float | None = None,
) -> AgentClaims:
    """Verify an agent token and return its claims; raise AuthFailed with the reason."""
    header = _header(token)
    alg: str = header["alg"]
    if alg not in algorithms or alg not in _KEY_TYPES_BY_ALG:
        raise AuthFailed(f"algorithm {alg!r} not allowed")
    keys = _candidate_keys(public_keys, alg, header.get("kid"))
    if not keys:
        raise AuthFailed(f"no key for algorithm {alg!r}")
    raw = _verified_payload(token, keys, alg)
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeError, RecursionError):
        raise AuthFailed("malformed token: payload is not JSON") from None
    if not isinstance(payload, dict):
        raise AuthFailed("malformed token: payload is not a JSON object")
    expires_at = _check_times(payload, time.time() if now is None else now, leeway)
    _check_audience_issuer(payload, audience, issuer)
    tenant, jti = _check_identity(payload)
    aliases = _check_aliases(payload)
    return AgentClaims(tenant, aliases, jti, expires_at, payload["iss"])


# --- verified tokens, remembered -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Verified:
    claims: AgentClaims
    keys: tuple[VerifyKey, ...]
    context: tuple[str, str, tuple[str, ...], float]


class VerifiedTokens:
    """:func:`verify_token` that remembers what it verified, by the token's SHA-256, so that a
    token presented again (an agent's second session, every reconnection after a restart of
    the peer) skips the signature check and the claims' parsing.

    Invariants: an entry serves only a call with the very same key objects, audience, issuer,
    algorithms and leeway; a hit re-checks the expiry against ``now`` (an expired entry is
    dropped and the token verified again, which then fails with "token expired"); failures
    are never remembered; at most ``max_entries`` entries, the least recently used leave first;
    the tokens themselves are not kept, only their digests. Revocation and the tenant's state
    are not properties of the token: callers check them on every use, as before.
    """

    def __init__(self, max_entries: int = VERIFIED_TOKENS) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, _Verified] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def verify(
        self,
        token: str,
        public_keys: Sequence[VerifyKey],
        *,
        audience: str,
        issuer: str,
        algorithms: Sequence[str] = ("EdDSA",),
        leeway: float = DEFAULT_LEEWAY,
        now: float | None = None,
    ) -> AgentClaims:
        """The claims of ``token`` as :func:`verify_token` gives them (same errors)."""
        now = time.time() if now is None else now
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:  # refused there
            return verify_token(
                token, public_keys, audience=audience, issuer=issuer,
                algorithms=algorithms, leeway=leeway, now=now,
            )  # fmt: skip
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        keys = tuple(public_keys)
        context = (audience, issuer, tuple(algorithms), leeway)
        entry = self._entries.get(digest)
        if entry is not None:
            if (
                entry.context == context
                and len(entry.keys) == len(keys)
                and all(a is b for a, b in zip(entry.keys, keys, strict=True))
                and entry.claims.expires_at > now - leeway  # the check of verify_token
            ):
                self._entries.move_to_end(digest)
                self.hits += 1
                return entry.claims
            del self._entries[digest]
        self.misses += 1
        claims = verify_token(
            token, keys, audience=audience, issuer=issuer,
            algorithms=algorithms, leeway=leeway, now=now,
        )  # fmt: skip
        self._entries[digest] = _Verified(claims, keys, context)
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return claims
