"""Fuzz targets: ``shared.units`` value parsers and ``shared.tokens.verify_token``.

Units: ``parse_size``, ``parse_duration``, ``parse_hostport`` and ``check_url`` take text from
configuration files and ``CSC_*`` variables (and ``parse_duration`` token lifetimes from the
CLI). Checks: only ``ValueError`` (their documented error), never a negative, NaN or infinite
result, a port in 0..65535, and bounded memory for 64 KiB of input.

Tokens: whatever a client sends as ``Authorization: Bearer ...`` (or the HELLO's token) reaches
``verify_token``. Checks: every failure is ``AuthFailed`` with a short message (no other
exception, whatever the header, claims or signature hold); a token signed by the trusted key
with arbitrary claims either yields claims that satisfy the documented invariants or
``AuthFailed``; an oversized token is refused before it is decoded.
"""

from __future__ import annotations

import base64
import json
import math
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import example, given
from hypothesis import strategies as st

from shared.errors import AuthFailed
from shared.tokens import MAX_TOKEN_LENGTH, TENANT_RE, verify_token
from shared.units import check_url, parse_duration, parse_hostport, parse_size
from tests.fuzz.budget import MiB, fuzz, only, peak_memory

# -- units --------------------------------------------------------------------------------------

unit_words = st.sampled_from(
    ["", "b", "k", "KiB", "mb", "GiB", "t", "ms", "s", "m", "h", "d", "w", "days", "x", "e", "."]
)
numbers = st.sampled_from(["0", "1", "1.5", ".5", "5.", "1e3", "1e999", "-1", "9" * 400, "nan"])
unit_texts = st.lists(
    st.tuples(
        numbers | st.text("0123456789.eE+-", max_size=6),
        unit_words,
        st.sampled_from(["", " ", "\t"]),
    ),
    max_size=4,
).map(lambda parts: "".join(a + b + c for a, b, c in parts)) | st.text(max_size=30)
plain = st.integers() | st.floats() | st.booleans() | st.none()


@fuzz(400)
@given(value=unit_texts | plain)
@example("1" * 5000)
@example("1" * 5000 + "kib")  # was int()'s "Exceeds the limit (4300 digits)" message
@example("0." + "0" * 5000 + "1k")
def test_size_and_duration(value: Any) -> None:
    for parse in (parse_size, parse_duration):
        try:
            result = parse(value)
        except ValueError:
            continue
        if parse is parse_size:
            assert isinstance(result, int) and result >= 0
        else:
            assert result >= 0 and math.isfinite(result)


hostports = (
    st.tuples(
        st.sampled_from(
            ["", "h", "h.example", "[::1]", "[::1", "::1", "1.2.3.4", "-h", "_x", "a" * 300]
        )
        | st.text(max_size=10),
        st.sampled_from(["", ":", ":0", ":65535", ":65536", ":99999999", ":-1", ":\u0661", "]:1"]),
    ).map("".join)
    | st.text(max_size=30)
    | plain
)


@fuzz(300)
@given(value=hostports)
def test_hostport(value: Any) -> None:
    try:
        host, port = parse_hostport(value)
    except ValueError:
        return
    assert host and 0 <= port <= 65535


urls = st.tuples(
    st.sampled_from(["http://", "https://", "redis://", "HTTP://", "", "http:", "//"]),
    st.sampled_from(["", "u:p@", "@", "h", "[::1]", "[::1", "h:0", "h:65536", "h:x", "h:\u0661"])
    | st.text(max_size=8),
    st.sampled_from(["", "/", "/p?q#f", "\n"]),
).map("".join) | st.text(max_size=30)


@fuzz(300)
@given(value=urls)
def test_url(value: str) -> None:
    only((ValueError,), check_url, value, ("http", "https"))


def test_64_kib_of_input_is_refused_in_bounded_memory() -> None:
    size = 64 * 1024
    for text in ("1" * size + "x", "1s" * (size // 2) + "x", "[" + ":" * size, "h" * size + ":1"):
        for parse in (parse_size, parse_duration, parse_hostport):
            error, peak = peak_memory(lambda p=parse, t=text: only((ValueError,), p, t))  # type: ignore[misc]
            assert isinstance(error, ValueError)
            assert peak < 32 * size, (parse.__name__, peak)


# -- tokens -------------------------------------------------------------------------------------

KEY = Ed25519PrivateKey.generate()
AUD, ISS = "csc", "csc-operator"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def verify(token: Any) -> Any:
    return verify_token(
        token,
        [KEY.public_key(), b"s" * 32],
        audience=AUD,
        issuer=ISS,
        algorithms=("EdDSA", "HS256"),
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
headers = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from(["EdDSA", "HS256", "none", "RS256", "", "EDDSA"]) | json_values,
        "kid": st.text(max_size=16) | json_values,
        "typ": json_values,
        "crit": json_values,
    },
)
segments = (
    headers.map(lambda h: b64(json.dumps(h).encode()))
    | json_values.map(lambda v: b64(json.dumps(v).encode()))
    | st.binary(max_size=40).map(b64)
    | st.text(max_size=20)
    | st.just(b64(b"[" * 5000))
)


@fuzz(400)
@given(parts=st.lists(segments, max_size=4), joiner=st.sampled_from([".", "..", ""]))
@example(parts=[b64(b"[" * 5000), "e30", "sig"], joiner=".")
@example(parts=[b64(b'{"alg": "EdDSA", "kid": null}'), "e30"], joiner="..")  # found in CI
@example(parts=[b64(b'{"alg": "EdDSA", "crit": null}'), "e30"], joiner="..")
def test_any_token_text_gives_only_auth_failed(parts: list[str], joiner: str) -> None:
    error = only((AuthFailed,), verify, joiner.join(parts))
    assert isinstance(error, AuthFailed)  # nothing here is signed by KEY
    assert error.message and len(error.message) < 200


@fuzz(100)
@given(value=st.binary(max_size=20) | st.none() | st.integers() | st.lists(st.text(), max_size=2))
def test_a_token_that_is_not_text_gives_auth_failed(value: Any) -> None:
    assert isinstance(only((AuthFailed,), verify, value), AuthFailed)


claim_values = st.fixed_dictionaries(
    {
        "exp": st.sampled_from([time.time() + 3600, time.time() - 3600, "x", None, True, 1e400]),
        "aud": st.sampled_from([AUD, [AUD], ["x"], 5, None]),
        "iss": st.sampled_from([ISS, "x", None]),
        "jti": st.sampled_from(["j1", "", "j" * 200, 5]),
        "tenant": st.sampled_from(["acme", "ACME", "", "-a", "a" * 64, None]),
        "aliases": st.sampled_from(
            [["acme@example.com"], [], ["*@acme.example"], ["bad alias"], "x", [5], None]
        ),
    },
    optional={"nbf": json_values, "iat": json_values, "sub": json_values, "x": json_values},
)


@fuzz(250)
@given(claims=claim_values)
def test_signed_tokens_with_arbitrary_claims(claims: dict[str, Any]) -> None:
    token = jwt.encode({k: v for k, v in claims.items() if v is not None}, KEY, algorithm="EdDSA")
    try:
        result = verify(token)
    except AuthFailed as exc:
        assert exc.message
        return
    assert TENANT_RE.fullmatch(result.tenant) and result.aliases and result.jti
    assert result.expires_at > time.time() - 60


def test_an_oversized_token_is_refused_before_decoding() -> None:
    token = b64(b'{"alg":"EdDSA"}') + "." + "A" * (4 * MiB) + ".x"
    error, peak = peak_memory(lambda: only((AuthFailed,), verify, token))
    assert isinstance(error, AuthFailed) and "too long" in error.message
    assert peak < 64 * 1024, peak
    assert len(token) > MAX_TOKEN_LENGTH
