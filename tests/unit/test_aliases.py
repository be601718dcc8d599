"""Alias normalisation (shared/aliases.py): the one way in for every lookup."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import aliases
from shared.aliases import MAX_ALIAS_LENGTH, normalise_alias
from shared.errors import BadAlias


@pytest.mark.parametrize(
    ("raw", "alias"),
    [
        ("acme@example.com", "acme@example.com"),
        ("  Acme@Example.COM\t", "acme@example.com"),
        ("ACME", "acme"),
        (" " * 300 + "acme", "acme"),  # long only by its padding: checked, not remembered
    ],
)
def test_an_alias_has_one_canonical_form(raw: str, alias: str) -> None:
    assert normalise_alias(raw) == alias
    assert normalise_alias(raw) == alias  # the second time from the remembered forms


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("a" * (MAX_ALIAS_LENGTH + 1), "longer than"),
        ("ünïcode@example.com", "ASCII"),
        ("two words", "not a valid alias"),
        ("acme@", "not a valid alias"),
        (42, "must be a string"),
        (["acme"], "must be a string"),  # unhashable: refused, never a TypeError
    ],
)
def test_a_bad_alias_is_refused_every_time(raw: object, why: str) -> None:
    for _ in range(2):  # a refusal is not remembered as an answer
        with pytest.raises(BadAlias, match=why):
            normalise_alias(raw)  # type: ignore[arg-type]


def test_the_remembered_forms_are_bounded() -> None:
    size = aliases._remembered.cache_info().maxsize
    assert size is not None
    for i in range(size + 500):
        assert normalise_alias(f"Device{i}@Example.com") == f"device{i}@example.com"
    assert aliases._remembered.cache_info().currsize <= size


@given(st.text(max_size=MAX_ALIAS_LENGTH + 20))
def test_remembered_or_not_the_answer_is_the_same(raw: str) -> None:
    def outcome(fn: object) -> object:
        try:
            return fn(raw)  # type: ignore[operator]
        except BadAlias as err:
            return ("refused", err.message)

    first = outcome(normalise_alias)
    assert outcome(normalise_alias) == first == outcome(aliases._canonical)
    if isinstance(first, str):
        assert normalise_alias(first) == first
