"""The portal's Ed25519 signing key: ``<state-dir>/portal-key.pem`` and its fingerprint.

Invariants: the key file is created once, mode 0600, never replaced (a hard link publishes it,
so two processes creating it at once end up with the same key); the fingerprint is the first
8 bytes of SHA-256 over the raw 32-byte public key as 16 lower-case hex digits
(docs/provisioning.md).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.tokens import SigningKeyError, create_ed25519_key_file, load_private_key_file

KEY_FILE = "portal-key.pem"


class PortalKeyError(Exception):
    """The key file cannot be read or is not an Ed25519 private key."""


def fingerprint(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).digest()[:8].hex()


@dataclass(frozen=True)
class PortalKey:
    """The signing key with its public forms."""

    private: Ed25519PrivateKey

    @property
    def raw_public(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def public_b64(self) -> str:
        return base64.b64encode(self.raw_public).decode("ascii")

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.raw_public)

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)


def _load(path: Path) -> PortalKey:
    try:
        key = load_private_key_file(path, "portal key")
    except SigningKeyError as exc:
        raise PortalKeyError(str(exc)) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PortalKeyError(f"{path}: the portal key must be Ed25519, not {type(key).__name__}")
    return PortalKey(key)


def load_or_create_key(state_dir: Path) -> tuple[PortalKey, bool]:
    """The portal key of ``state_dir`` and whether it was created now."""
    path = state_dir / KEY_FILE
    if not path.exists():
        try:
            return PortalKey(create_ed25519_key_file(path)), True
        except FileExistsError:
            pass  # created concurrently: use that one
    return _load(path), False
