"""Agent tokens: key files, issue, and every way verification must fail."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import AuthFailed, BadAlias
from shared.tokens import (
    PUBLIC_KEY_FILE,
    SIGNING_KEY_FILE,
    AgentClaims,
    SigningKeyError,
    check_tenant_id,
    generate_keypair,
    issue_token,
    key_id,
    load_or_create_signing_key,
    load_public_key,
    load_public_keys,
    parse_ttl,
    verify_token,
)

AUD, ISS = "csc-agent", "csc"
NOW = 1_700_000_000


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def issue(key: Any, **kw: Any) -> str:
    args: dict[str, Any] = {
        "tenant": "acme",
        "aliases": ["acme@example.com"],
        "ttl_seconds": 3600,
        "audience": AUD,
        "issuer": ISS,
    }
    args.update(kw)
    return issue_token(key, **args)


def verify(token: str, key: Ed25519PrivateKey, **kw: Any) -> AgentClaims:
    return verify_token(token, [key.public_key()], audience=AUD, issuer=ISS, **kw)


def reason(token: str, key: Ed25519PrivateKey, **kw: Any) -> str:
    with pytest.raises(AuthFailed) as exc:
        verify(token, key, **kw)
    return exc.value.message


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    head = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    return head + "." + b64(signature)


def good_payload(**kw: Any) -> dict[str, Any]:
    now = int(time.time())
    payload = {
        "iss": ISS,
        "aud": AUD,
        "sub": "acme",
        "tenant": "acme",
        "aliases": ["acme@example.com"],
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "jti": uuid.uuid4().hex,
    }
    payload.update(kw)
    return payload


def sign_eddsa(key: Ed25519PrivateKey, payload: dict[str, Any]) -> str:
    return jwt.encode(payload, key, algorithm="EdDSA")


# --- round trip --------------------------------------------------------------------------------


def test_issue_and_verify_round_trip(key: Ed25519PrivateKey) -> None:
    token = issue(key, aliases=["ACME@example.com", "*@Example.org"], jti="abc")
    claims = verify(token, key)
    assert claims.tenant == "acme"
    assert claims.aliases == ("acme@example.com", "*@example.org")
    assert claims.jti == "abc"
    assert claims.issuer == ISS
    assert claims.expires_at == pytest.approx(time.time() + 3600, abs=5)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA"
    assert header["kid"] == key_id(key.public_key())


def test_issued_claims(key: Ed25519PrivateKey) -> None:
    token = issue(key, now=NOW, ttl_seconds=60)
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload["iat"] == payload["nbf"] == NOW
    assert payload["exp"] == NOW + 60
    assert payload["sub"] == payload["tenant"] == "acme"
    assert payload["iss"] == ISS and payload["aud"] == AUD
    assert len(payload["jti"]) == 32 and int(payload["jti"], 16) >= 0
    other = jwt.decode(issue(key, now=NOW), options={"verify_signature": False})
    assert other["jti"] != payload["jti"]


def test_issue_rejects_bad_input(key: Ed25519PrivateKey) -> None:
    with pytest.raises(ValueError):
        issue(key, tenant="Not Valid")
    with pytest.raises(ValueError):
        issue(key, ttl_seconds=0)
    with pytest.raises(ValueError):
        issue(key, aliases=[])
    with pytest.raises(BadAlias):
        issue(key, aliases=["bad alias"])


def test_pattern_grants(key: Ed25519PrivateKey) -> None:
    claims = verify(issue(key, aliases=["*@example.com", "x@other.org"]), key)
    assert claims.aliases == ("*@example.com", "x@other.org")
    token = sign_eddsa(key, good_payload(aliases=["*@*.com"]))
    assert reason(token, key).startswith("invalid alias in claims")


def test_rsa_and_ec_keys_when_allowed() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = issue(rsa_key)
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    pub = rsa_key.public_key()
    with pytest.raises(AuthFailed, match="algorithm 'RS256' not allowed"):
        verify_token(token, [pub], audience=AUD, issuer=ISS)
    claims = verify_token(token, [pub], audience=AUD, issuer=ISS, algorithms=("RS256",))
    assert claims.tenant == "acme"
    ec_key = ec.generate_private_key(ec.SECP256R1())
    token = issue(ec_key)
    claims = verify_token(
        token, [ec_key.public_key()], audience=AUD, issuer=ISS, algorithms=("ES256",)
    )
    assert claims.tenant == "acme"


def test_several_public_keys(key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    token = issue(key)
    keys = [other.public_key(), key.public_key()]
    assert verify_token(token, keys, audience=AUD, issuer=ISS).tenant == "acme"
    no_kid = sign_eddsa(key, good_payload())
    assert verify_token(no_kid, keys, audience=AUD, issuer=ISS).tenant == "acme"


# --- rejections --------------------------------------------------------------------------------


def test_forged_signature_other_key(key: Ed25519PrivateKey) -> None:
    forger = Ed25519PrivateKey.generate()
    assert reason(issue(forger), key) == "bad signature"


def test_tampered_payload(key: Ed25519PrivateKey) -> None:
    head, _, sig = issue(key).split(".")
    evil = b64(json.dumps(good_payload(tenant="evil", sub="evil")).encode())
    assert reason(f"{head}.{evil}.{sig}", key) == "bad signature"


def test_expired(key: Ed25519PrivateKey) -> None:
    token = issue(key, now=time.time() - 7200, ttl_seconds=3600)
    assert reason(token, key) == "token expired"


def test_expiry_leeway(key: Ed25519PrivateKey) -> None:
    token = issue(key, now=time.time() - 3610, ttl_seconds=3600)
    assert verify(token, key).tenant == "acme"
    assert reason(token, key, leeway=0) == "token expired"


def test_not_yet_valid(key: Ed25519PrivateKey) -> None:
    token = issue(key, now=time.time() + 3600)
    assert reason(token, key) == "token not yet valid"


def test_wrong_audience_and_issuer(key: Ed25519PrivateKey) -> None:
    assert reason(issue(key, audience="someone-else"), key) == "wrong audience"
    assert reason(issue(key, issuer="mallory"), key) == "wrong issuer"


def test_alg_none(key: Ed25519PrivateKey) -> None:
    token = craft({"alg": "none", "typ": "JWT"}, good_payload())
    assert reason(token, key) == "algorithm 'none' not allowed"
    token = craft({"alg": "None", "typ": "JWT"}, good_payload())
    assert reason(token, key) == "algorithm 'None' not allowed"
    # even when the caller lists it, 'none' never verifies
    with pytest.raises(AuthFailed):
        verify(token, key, algorithms=("EdDSA", "none"))


def test_hs256_key_confusion(key: Ed25519PrivateKey) -> None:
    """An HS256 token whose HMAC secret is the public key PEM (the classic confusion attack)."""
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT"}
    unsigned = craft(header, good_payload()).rsplit(".", 1)[0]
    mac = hmac.new(pem, unsigned.encode(), hashlib.sha256).digest()
    token = unsigned + "." + b64(mac)
    assert reason(token, key) == "algorithm 'HS256' not allowed"
    # and even if HS256 were listed, an asymmetric key is never used as an HMAC secret
    assert reason(token, key, algorithms=("EdDSA", "HS256")) == "no key for algorithm 'HS256'"


def test_hs256_only_with_explicit_secret() -> None:
    secret = b"a-shared-secret-of-enough-length-32b"
    token = jwt.encode(good_payload(), secret, algorithm="HS256")
    claims = verify_token(token, [secret], audience=AUD, issuer=ISS, algorithms=("HS256",))
    assert claims.tenant == "acme"
    with pytest.raises(AuthFailed, match="bad signature"):
        verify_token(token, [b"x" * 32], audience=AUD, issuer=ISS, algorithms=("HS256",))


@pytest.mark.parametrize("claim", ["jti", "exp", "aud", "iss", "tenant", "aliases"])
def test_missing_claims(key: Ed25519PrivateKey, claim: str) -> None:
    payload = good_payload()
    del payload[claim]
    assert reason(sign_eddsa(key, payload), key) == f"missing claim {claim!r}"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"tenant": "Bad Tenant", "sub": "Bad Tenant"}, "invalid tenant id"),
        ({"tenant": "", "sub": ""}, "invalid tenant id"),
        ({"tenant": 7, "sub": "7"}, "invalid tenant id"),
        ({"sub": "other"}, "claim 'sub' does not match 'tenant'"),
        ({"aliases": "acme@example.com"}, "claim 'aliases' must be a list of strings"),
        ({"aliases": [1]}, "claim 'aliases' must be a list of strings"),
        ({"aliases": []}, "claim 'aliases' is empty"),
        ({"aliases": ["ok@example.com", "not an alias"]}, "invalid alias in claims"),
        ({"jti": ""}, "invalid claim 'jti'"),
        ({"exp": "tomorrow"}, "invalid claim 'exp'"),
    ],
)
def test_bad_claims(key: Ed25519PrivateKey, changes: dict[str, Any], expected: str) -> None:
    assert reason(sign_eddsa(key, good_payload(**changes)), key).startswith(expected)


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "garbage",
        "a.b.c",
        "a.b",
        "....",
        "eyJhbGciOiJFZERTQSJ9.e30",
        b64(b"not json") + "." + b64(b"{}") + ".x",
        b64(b'{"alg": 5}') + "." + b64(b"{}") + ".x",
        b64(b"[1]") + "." + b64(b"{}") + ".x",
        "x" * 20_000,
        b64(b"[" * 5000) + "." + b64(b"{}") + ".x",  # nested beyond the JSON decoder's depth
        # header members PyJWT refuses with its base InvalidTokenError, not a DecodeError
        b64(b'{"alg": "EdDSA", "kid": null}') + "." + b64(b"{}") + "." + b64(b"sig"),
        b64(b'{"alg": "EdDSA", "crit": null}') + "." + b64(b"{}") + "." + b64(b"sig"),
        b64(b'{"alg": "EdDSA", "crit": ["exp"]}') + "." + b64(b"{}") + "." + b64(b"sig"),
    ],
)
def test_garbage(key: Ed25519PrivateKey, garbage: str) -> None:
    assert reason(garbage, key).startswith(("malformed token", "algorithm"))


def test_payload_not_json(key: Ed25519PrivateKey) -> None:
    head = b64(json.dumps({"alg": "EdDSA"}).encode())
    body = b64(b"not json")
    sig = key.sign(f"{head}.{body}".encode())
    assert reason(f"{head}.{body}.{b64(sig)}", key).startswith("malformed token")


def test_deeply_nested_signed_payload(key: Ed25519PrivateKey) -> None:
    head = b64(json.dumps({"alg": "EdDSA"}).encode())
    body = b64(b"[" * 5000)
    sig = key.sign(f"{head}.{body}".encode())
    assert reason(f"{head}.{body}.{b64(sig)}", key).startswith("malformed token")


@settings(max_examples=200)
@given(st.text(max_size=300))
def test_arbitrary_strings_only_raise_auth_failed(text: str) -> None:
    key = Ed25519PrivateKey.generate()
    with pytest.raises(AuthFailed):
        verify_token(text, [key.public_key()], audience=AUD, issuer=ISS)


def test_non_string_token(key: Ed25519PrivateKey) -> None:
    with pytest.raises(AuthFailed, match="malformed token"):
        verify_token(b"abc", [key.public_key()], audience=AUD, issuer=ISS)  # type: ignore[arg-type]


# --- key files ---------------------------------------------------------------------------------


def test_load_or_create_signing_key(tmp_path: Path) -> None:
    state = tmp_path / "state" / "csc"
    key, created = load_or_create_signing_key(state)
    assert created
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / SIGNING_KEY_FILE).stat().st_mode) == 0o600
    assert (state / PUBLIC_KEY_FILE).is_file()
    again, created = load_or_create_signing_key(state)
    assert not created
    assert key_id(again.public_key()) == key_id(key.public_key())
    assert key_id(load_public_key(state / PUBLIC_KEY_FILE)) == key_id(key.public_key())
    assert [key_id(k) for k in load_public_keys(state)] == [key_id(key.public_key())]
    assert sorted(p.name for p in state.iterdir()) == sorted([PUBLIC_KEY_FILE, SIGNING_KEY_FILE])


def test_public_key_is_rewritten_when_missing(tmp_path: Path) -> None:
    key, _ = load_or_create_signing_key(tmp_path)
    (tmp_path / PUBLIC_KEY_FILE).unlink()
    _, created = load_or_create_signing_key(tmp_path)
    assert not created
    assert key_id(load_public_key(tmp_path / PUBLIC_KEY_FILE)) == key_id(key.public_key())


def test_generate_keypair_refuses_to_overwrite(tmp_path: Path) -> None:
    generate_keypair(tmp_path)
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path)


def test_corrupt_key_files(tmp_path: Path) -> None:
    (tmp_path / SIGNING_KEY_FILE).write_text("not a key")
    with pytest.raises(SigningKeyError, match=SIGNING_KEY_FILE):
        load_or_create_signing_key(tmp_path)
    (tmp_path / PUBLIC_KEY_FILE).write_text("not a key")
    with pytest.raises(SigningKeyError):
        load_public_key(tmp_path / PUBLIC_KEY_FILE)
    with pytest.raises(SigningKeyError, match="no public key"):
        load_public_keys(tmp_path / "empty")


def test_tokens_from_key_files_verify(tmp_path: Path) -> None:
    key, _ = load_or_create_signing_key(tmp_path)
    token = issue(key)
    assert verify_token(token, load_public_keys(tmp_path), audience=AUD, issuer=ISS).jti


# --- helpers -----------------------------------------------------------------------------------


def test_parse_ttl() -> None:
    assert parse_ttl("30d") == 30 * 86400
    assert parse_ttl("90") == 90
    for bad in ("0", "-1d", "soon"):
        with pytest.raises(ValueError):
            parse_ttl(bad)


@pytest.mark.parametrize("tenant", ["acme", "a", "acme-corp.eu_1", "0" * 63])
def test_tenant_ids_accepted(tenant: str) -> None:
    assert check_tenant_id(tenant) == tenant


@pytest.mark.parametrize("tenant", ["", "Acme", "-acme", ".a", "a b", "a" * 64, "ä"])
def test_tenant_ids_rejected(tenant: str) -> None:
    with pytest.raises(ValueError):
        check_tenant_id(tenant)
