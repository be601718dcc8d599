"""csc/signing: which signing key a node uses (file, database, state directory), and URLs shown
with the password masked (csc/store/postgres)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from csc import cli
from csc.config import CSCConfig
from csc.signing import signing_key, verification_keys
from csc.store import Store
from csc.store.postgres import masked_url
from shared.tokens import (
    PUBLIC_KEY_FILE,
    SIGNING_KEY_FILE,
    SigningKeyError,
    create_ed25519_key_file,
    verify_token,
)


def _pem(key: ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_embedded_default_is_the_state_directory_key(tmp_path: Path) -> None:
    config = CSCConfig(state_dir=tmp_path)
    with pytest.raises(SigningKeyError):
        signing_key(config, None, create=False)
    with pytest.raises(SigningKeyError, match="csc token issue"):
        verification_keys(config, None)  # never creates one
    first = signing_key(config, None)
    assert first.created and (tmp_path / SIGNING_KEY_FILE).exists()
    again = signing_key(config, None)
    assert not again.created and again.key.private_bytes_raw() == first.key.private_bytes_raw()
    assert (tmp_path / PUBLIC_KEY_FILE).exists() and len(verification_keys(config, None)) == 1


def test_signing_key_file_is_used_and_never_created(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "cluster.pem"
    config = CSCConfig(state_dir=tmp_path / "state", signing_key_file=path)
    with pytest.raises(SigningKeyError, match=f"signing_key_file {path}: no such file"):
        signing_key(config, None)
    assert not path.exists() and not (tmp_path / "state" / SIGNING_KEY_FILE).exists()
    key = create_ed25519_key_file(path)
    found = signing_key(config, None)
    assert found.key.private_bytes_raw() == key.private_bytes_raw() and not found.created
    assert found.where == str(path)
    [public] = verification_keys(config, None)
    assert public.public_bytes_raw() == key.public_key().public_bytes_raw()


def test_an_ec_key_file_works(tmp_path: Path) -> None:
    path = tmp_path / "ec.pem"
    path.write_bytes(_pem(ec.generate_private_key(ec.SECP256R1())))
    found = signing_key(CSCConfig(state_dir=tmp_path, signing_key_file=path), None)
    assert isinstance(found.key, ec.EllipticCurvePrivateKey)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a key", "not a usable PEM private key"),
        (_pem(x25519.X25519PrivateKey.generate()), "unsupported key type"),
    ],
)
def test_unusable_key_files_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.pem"
    path.write_bytes(content)
    with pytest.raises(SigningKeyError, match=message):
        signing_key(CSCConfig(state_dir=tmp_path, signing_key_file=path), None)


def test_unreadable_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="cannot read the signing key"):
        signing_key(CSCConfig(state_dir=tmp_path, signing_key_file=tmp_path), None)


def test_token_issue_signs_with_the_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cluster.pem"
    key = create_ed25519_key_file(path)
    state = tmp_path / "state"
    env = {"CSC_SIGNING_KEY_FILE": str(path)}
    args = ["token", "issue", "--state-dir", str(state), "--tenant", "acme"]
    assert cli.main([*args, "--alias", "a@acme.org", "--assign"], env=env) == 0
    token = capsys.readouterr().out.strip()
    claims = verify_token(token, [key.public_key()], audience="csc-agent", issuer="csc")
    assert claims.tenant == "acme" and not (state / SIGNING_KEY_FILE).exists()
    assert cli.main(["token", "verify", "--state-dir", str(state), token], env=env) == 0
    Store(state).close()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://csc:s3cret@db.example:5433/csc", "postgresql://csc:***@db.example:5433/csc"),
        ("postgres://csc@db/csc?password=s3cret&sslmode=require", "postgres://csc@db/csc"),
        ("postgresql://u:p@[::1]/x", "postgresql://u:***@[::1]/x"),
        ("postgresql:///csc", "postgresql:///csc"),
        ("postgresql://u:p@h:99999999/x", "postgresql://***"),
    ],
)
def test_urls_are_shown_without_the_password(url: str, shown: str) -> None:
    assert masked_url(url) == shown
