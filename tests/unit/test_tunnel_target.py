"""The upstream target of a tunnel request: what follows the alias in ``/t/{alias}{rest}``."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csc.relay.http_ingress import tunnel_target


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/t/acme", "/"),
        ("/t/acme/", "/"),
        ("/t/acme/get/x?y=1", "/get/x?y=1"),
        ("/t/acme?y=1/z", "/?y=1/z"),
        ("/t/a%40b.com/p", "/p"),
        ("/t/", "/"),
    ],
)
def test_examples(target: str, expected: str) -> None:
    assert tunnel_target(target) == expected


@given(st.text(alphabet="ab/?#%@.", max_size=16))
def test_rest_after_the_alias(rest: str) -> None:
    """The alias ends at the first ``/`` or ``?``; the rest is kept raw, with a leading ``/``."""
    alias, tail = re.fullmatch(r"([^/?]*)(.*)", rest, re.DOTALL).groups()  # type: ignore[union-attr]
    got = tunnel_target("/t/" + rest)
    assert got == (tail if tail.startswith("/") else "/" + tail)
    assert "/t/" + alias + tail == "/t/" + rest
