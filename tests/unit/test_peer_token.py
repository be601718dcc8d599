"""Peer-link credentials (csc/cluster/peer.py): only a node holding the cluster secret, dialling
the node the token names, within its minute, gets in."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import jwt
import pytest

from csc.cluster.peerauth import peer_token, verify_peer_token
from shared.errors import AuthFailed

KEY = b"k" * 40


def test_a_token_names_its_source_to_its_target() -> None:
    assert verify_peer_token(KEY, peer_token(KEY, "B", "A"), "A") == "B"


def _other_algorithm() -> str:
    with warnings.catch_warnings():  # the test signs with the cluster key on purpose
        warnings.simplefilter("ignore")
        return jwt.encode({"iss": "B", "aud": "csc-peer:A", "exp": 2**40}, KEY, algorithm="HS512")


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda: peer_token(b"x" * 40, "B", "A"), "wrong secret"),
        (lambda: peer_token(KEY, "B", "C"), "meant for another node"),
        (lambda: peer_token(KEY, "B", "A", now=time.time() - 3600), "expired"),
        (lambda: jwt.encode({"iss": "B", "aud": "csc-peer:A"}, KEY, algorithm="HS256"), "no exp"),
        (_other_algorithm, "other algorithm"),
        (
            lambda: jwt.encode({"iss": "B", "aud": "csc-peer:A", "exp": 2**40}, None, "none"),
            "unsigned",
        ),
        (lambda: "not a token", "garbage"),
        (lambda: None, "missing"),
    ],
)
def test_refused(make: Callable[[], object], why: str) -> None:
    with pytest.raises(AuthFailed):
        verify_peer_token(KEY, make(), "A")
