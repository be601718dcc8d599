"""Password hashing: argon2id, secure default parameters, rehash on parameter change, and one
verification's cost for an unknown user."""

from __future__ import annotations

import pytest
from argon2 import extract_parameters

from portal.passwords import PROFILES, Passwords, Verdict, check_password


def test_standard_profile_is_argon2id_with_rfc_9106_parameters() -> None:
    stored = Passwords("standard").hash("a good password")
    assert stored.startswith("$argon2id$")
    params = extract_parameters(stored)
    assert (params.time_cost, params.memory_cost, params.parallelism) == PROFILES["standard"]
    assert params.memory_cost == 64 * 1024


def test_verify_right_and_wrong() -> None:
    passwords = Passwords("test")
    stored = passwords.hash("a good password")
    assert passwords.verify(stored, "a good password").ok
    assert not passwords.verify(stored, "a good passworD").ok
    assert passwords.verify(stored, "a good password").new_hash is None


def test_an_outdated_hash_verifies_and_is_replaced() -> None:
    old = Passwords("test").hash("a good password")
    verdict = Passwords("standard").verify(old, "a good password")
    assert verdict.ok and verdict.new_hash is not None
    params = extract_parameters(verdict.new_hash)
    assert (params.time_cost, params.memory_cost, params.parallelism) == PROFILES["standard"]
    assert not Passwords("standard").verify(old, "wrong password").ok


@pytest.mark.parametrize("stored", ["", "plain", "$argon2id$v=19$m=8,t=1,p=1$bad$bad", "$2b$10$x"])
def test_a_malformed_stored_hash_is_a_mismatch(stored: str) -> None:
    assert not Passwords("test").verify(stored, "whatever password").ok


def test_an_unknown_user_costs_one_verification(monkeypatch: pytest.MonkeyPatch) -> None:
    passwords = Passwords("test")
    calls: list[str] = []
    real = passwords.verify

    def counting(stored: str, password: str) -> Verdict:
        calls.append(stored)
        return real(stored, password)

    monkeypatch.setattr(passwords, "verify", counting)
    assert not passwords.verify_absent("some password").ok
    assert not passwords.verify_absent("another password").ok
    assert len(calls) == 2
    assert calls[0] == calls[1]  # the same dummy hash, made once, with current parameters
    assert extract_parameters(calls[0]).time_cost == PROFILES["test"][0]


def test_unknown_profile() -> None:
    with pytest.raises(ValueError, match="profile"):
        Passwords("fast")


@pytest.mark.parametrize(
    ("password", "problem"),
    [
        ("short", "at least 8"),
        ("x" * 1025, "at most 1024"),
        ("two\nlines!", "line breaks"),
    ],
)
def test_new_password_rules(password: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        check_password(password)
    assert check_password("eight ch") == "eight ch"
