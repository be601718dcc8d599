"""Where a node's agent-token signing key comes from: one decision for the node and the CLI.

1. ``signing_key_file`` set: the PEM private key in that file (Ed25519, RSA or EC). It is never
   created here; a missing, unreadable or unsupported file is refused with a clear message.
2. Else, ``database_url`` set: the key kept in the shared store, created once by whichever
   node (or ``csc token issue``) needs it first; every node reads the same one.
3. Else (the embedded default): ``signing-key.pem`` in ``state_dir``, created on first use
   (:func:`shared.tokens.load_or_create_signing_key`).

Verification uses the public half of the same key; in the embedded default ``csc token verify``
keeps reading ``signing-key.pub.pem`` and never creates a key.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from csc.config import CSCConfig
from csc.store import Store, StoreError, StoreUnavailable
from shared.tokens import (
    SIGNING_KEY_FILE,
    PrivateKey,
    PublicKey,
    SigningKeyError,
    load_or_create_signing_key,
    load_public_keys,
    load_signing_key,
)


@dataclass(frozen=True, slots=True)
class SigningKey:
    key: PrivateKey
    #: created by this call (first use)
    created: bool
    #: where it is kept, for messages
    where: str


def _new_pem() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _from_store(store: Store, create: bool) -> SigningKey:
    try:
        pem, created = store.signing_key_pem(_new_pem if create else None)
    except StoreUnavailable:
        raise
    except StoreError as exc:
        raise SigningKeyError(f"no signing key: {exc}") from None
    where = f"the database {store.where}"
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"the signing key in {where} is not usable: {exc}") from None
    if not isinstance(key, PrivateKey):
        raise SigningKeyError(f"the signing key in {where} has unsupported type")
    return SigningKey(key, created, where)


def signing_key(config: CSCConfig, store: Store | None, *, create: bool = True) -> SigningKey:
    """The signing key this configuration names (see the module docstring).

    ``store`` is needed with ``database_url`` (and ignored otherwise). Without ``create`` a
    missing key is an error instead of being created. Raises SigningKeyError; with
    ``database_url``, StoreUnavailable when the database cannot be reached.
    """
    if config.signing_key_file is not None:
        path = config.signing_key_file
        if not path.exists():
            raise SigningKeyError(f"signing_key_file {path}: no such file (it is not created)")
        return SigningKey(load_signing_key(path), False, str(path))
    if config.database_url is not None:
        if store is None:
            raise SigningKeyError("database_url is set but no store was opened")  # a bug
        return _from_store(store, create)
    if create:
        key, created = load_or_create_signing_key(config.state_dir)
        return SigningKey(key, created, str(config.state_dir))
    path = config.state_dir / SIGNING_KEY_FILE
    return SigningKey(load_signing_key(path), False, str(path))


def verification_keys(config: CSCConfig, store: Store | None) -> list[PublicKey]:
    """The public keys agent tokens are checked with (never creates a key)."""
    if config.signing_key_file is None and config.database_url is None:
        return load_public_keys(config.state_dir)
    return [signing_key(config, store, create=False).key.public_key()]
