"""The signed part of a resolve answer (``GET /v1/resolve/{alias}``): one definition for the CSC,
which signs, and the bootloader, which verifies (docs/provisioning.md, "Whom the device trusts").

The signed bytes are ``b"csc-resolve-v1\\n"`` followed by the JSON object
``{"alias", "contact", "name", "tunnel"}`` (the normalised alias, the tenant's display name and
support contact, the tunnel path) serialised with sorted keys, no whitespace and every non-ASCII
character as a ``\\uXXXX`` escape, in ASCII. The signature is Ed25519 over those bytes, by the
CSC's token-signing key (the same on every node of a cluster), base64 in the answer's
``signature``; the key travels as the base64 of its 32 raw bytes.

Invariants: pure (no I/O); needs only the standard library and ``cryptography``, because the
bootloader's zipapp ships this file.
"""

from __future__ import annotations

import base64
import binascii
import json

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

DOMAIN = b"csc-resolve-v1\n"


def signed_bytes(alias: str, name: str, contact: str, tunnel: str) -> bytes:
    """The bytes a resolve answer's signature covers (see the module doc)."""
    body = {"alias": alias, "contact": contact, "name": name, "tunnel": tunnel}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return DOMAIN + text.encode("ascii")


def sign(key: Ed25519PrivateKey, alias: str, name: str, contact: str, tunnel: str) -> str:
    """The base64 signature of an answer."""
    return base64.b64encode(key.sign(signed_bytes(alias, name, contact, tunnel))).decode()


def public_key_text(key: Ed25519PublicKey) -> str:
    """How the key travels (header, preset): base64 of the 32 raw bytes."""
    return base64.b64encode(key.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def parse_public_key(text: str) -> Ed25519PublicKey | None:
    """The key from :func:`public_key_text`'s form, or None when it is not one."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 32:
        return None
    return Ed25519PublicKey.from_public_bytes(raw)


def verify(
    key: Ed25519PublicKey, signature: object, alias: str, name: str, contact: str, tunnel: str
) -> bool:
    """Whether ``signature`` (the answer's field, any JSON value) signs these values."""
    if not isinstance(signature, str):
        return False
    try:
        raw = base64.b64decode(signature, validate=True)
        key.verify(raw, signed_bytes(alias, name, contact, tunnel))
    except (binascii.Error, ValueError, InvalidSignature):
        return False
    return True
