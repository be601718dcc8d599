"""Remembered token verifications (shared/tokens.py VerifiedTokens) and the shared catalog
re-read of the handshake (csc/relay/freshread.py)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from csc.relay.freshread import SharedRefresh
from shared.errors import AuthFailed
from shared.tokens import DEFAULT_LEEWAY, VerifiedTokens, issue_token

AUD, ISS = "csc-agent", "csc"
NOW = 1_700_000_000.0


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def issue(key: Ed25519PrivateKey, ttl: float = 3600, **kw: Any) -> str:
    return issue_token(
        key, tenant="acme", aliases=["acme@example.com"], ttl_seconds=ttl, audience=AUD,
        issuer=ISS, now=NOW, **kw,
    )  # fmt: skip


def test_a_token_seen_again_is_not_verified_again(key: Ed25519PrivateKey) -> None:
    cache = VerifiedTokens()
    keys = [key.public_key()]
    token = issue(key)
    first = cache.verify(token, keys, audience=AUD, issuer=ISS, now=NOW)
    again = cache.verify(token, keys, audience=AUD, issuer=ISS, now=NOW + 60)
    assert again is first and first.tenant == "acme"
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)


def test_an_expired_token_fails_even_when_remembered(key: Ed25519PrivateKey) -> None:
    cache = VerifiedTokens()
    keys = [key.public_key()]
    token = issue(key, ttl=100)
    cache.verify(token, keys, audience=AUD, issuer=ISS, now=NOW)
    cache.verify(token, keys, audience=AUD, issuer=ISS, now=NOW + 100 + DEFAULT_LEEWAY - 1)
    with pytest.raises(AuthFailed, match="token expired"):
        cache.verify(token, keys, audience=AUD, issuer=ISS, now=NOW + 100 + DEFAULT_LEEWAY)
    assert len(cache) == 0  # dropped, never re-added


def test_failures_are_not_remembered(key: Ed25519PrivateKey) -> None:
    cache = VerifiedTokens()
    other = Ed25519PrivateKey.generate()
    token = issue(other)
    for _ in range(2):
        with pytest.raises(AuthFailed, match="bad signature"):
            cache.verify(token, [key.public_key()], audience=AUD, issuer=ISS, now=NOW)
    assert (cache.misses, len(cache)) == (2, 0)
    for bad in ("", "a.b", "x" * 20000):
        with pytest.raises(AuthFailed, match="malformed"):
            cache.verify(bad, [key.public_key()], audience=AUD, issuer=ISS, now=NOW)
    assert len(cache) == 0


def test_an_entry_serves_only_the_same_keys_audience_and_issuer(key: Ed25519PrivateKey) -> None:
    cache = VerifiedTokens()
    keys = [key.public_key()]
    token = issue(key)
    cache.verify(token, keys, audience=AUD, issuer=ISS, now=NOW)
    with pytest.raises(AuthFailed, match="wrong audience"):
        cache.verify(token, keys, audience="other", issuer=ISS, now=NOW)
    cache.verify(token, keys, audience=AUD, issuer=ISS, now=NOW)
    with pytest.raises(AuthFailed, match="wrong issuer"):
        cache.verify(token, keys, audience=AUD, issuer="other", now=NOW)
    rotated = [Ed25519PrivateKey.generate().public_key()]  # the key was replaced
    cache.verify(token, keys, audience=AUD, issuer=ISS, now=NOW)
    with pytest.raises(AuthFailed, match="bad signature"):
        cache.verify(token, rotated, audience=AUD, issuer=ISS, now=NOW)
    assert cache.hits == 0


def test_the_least_recently_used_leave_first(key: Ed25519PrivateKey) -> None:
    cache = VerifiedTokens(max_entries=2)
    keys = [key.public_key()]
    a, b, c = (issue(key, jti=f"j{i}") for i in range(3))
    for token in (a, b, a, c):  # a was used after b: b leaves
        cache.verify(token, keys, audience=AUD, issuer=ISS, now=NOW)
    assert len(cache) == 2
    cache.verify(a, keys, audience=AUD, issuer=ISS, now=NOW)
    cache.verify(c, keys, audience=AUD, issuer=ISS, now=NOW)
    assert cache.hits == 3
    cache.verify(b, keys, audience=AUD, issuer=ISS, now=NOW)
    assert cache.misses == 4
    with pytest.raises(ValueError):
        VerifiedTokens(max_entries=0)


# -- the shared re-read ---------------------------------------------------------------------------


async def test_callers_share_a_re_read_that_started_after_they_asked() -> None:
    started: list[int] = []
    release = threading.Event()
    version = 0

    def refresh() -> None:
        nonlocal version
        started.append(version)
        release.wait(5)

    shared = SharedRefresh(refresh)
    first = asyncio.ensure_future(shared())
    await asyncio.sleep(0)
    while not started:  # the first re-read is running in its thread
        await asyncio.sleep(0.001)
    version = 1  # a change committed while it runs: later callers must not share it
    later = [asyncio.ensure_future(shared()) for _ in range(50)]
    await asyncio.sleep(0.01)
    assert not any(t.done() for t in later)
    release.set()
    await asyncio.wait_for(asyncio.gather(first, *later), 5)
    assert started == [0, 1] and shared.runs == 2  # 51 callers, two re-reads


async def test_a_failed_re_read_fails_every_caller_that_shared_it() -> None:
    def refresh() -> None:
        raise OSError("store away")

    shared = SharedRefresh(refresh)
    results = await asyncio.gather(shared(), shared(), return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results)
    calls = 0

    def fine() -> None:
        nonlocal calls
        calls += 1

    shared = SharedRefresh(fine)
    await shared()
    await shared()  # one at a time: each runs its own
    assert calls == 2
