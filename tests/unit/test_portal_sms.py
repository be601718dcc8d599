"""The provisioning SMS: its exact text (docs/provisioning.md) and its length in GSM-7 septets
or UCS-2 units, with property tests for the counting."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portal.sms import (
    GSM7_BASIC,
    GSM7_EXTENSION,
    PART,
    SINGLE,
    is_gsm7,
    length_warning,
    sms_length,
    sms_text,
)
from shared.errors import BadAlias

FP = "3f2a9c4177d012be"
URL = "http://portal.example/get/"

basic_text = st.text(alphabet=sorted(GSM7_BASIC), max_size=400)
gsm_text = st.text(alphabet=sorted(GSM7_BASIC | GSM7_EXTENSION), max_size=400)
non_gsm_char = st.characters(codec="utf-8").filter(
    lambda c: c not in GSM7_BASIC and c not in GSM7_EXTENSION
)


def test_texts_match_the_documented_examples() -> None:
    assert sms_text(URL, FP, alias="acme@example.com") == (
        "Get the client: http://portal.example/get/ then Alias: acme@example.com cdzprov "
        "Key: 3f2a9c4177d012be"
    )
    assert sms_text(URL, FP, host="dmz.example.com", port=8443) == (
        "Get the client: http://portal.example/get/ then Host: dmz.example.com Port: 8443 "
        "cdzprov Key: 3f2a9c4177d012be"
    )
    assert sms_text(URL, FP, alias="ACME@Example.com", user="alice") == (
        "Get the client: http://portal.example/get/ then User: alice Alias: acme@example.com "
        "cdzprov Key: 3f2a9c4177d012be"
    )


def test_alias_and_host_exclusive() -> None:
    with pytest.raises(ValueError, match="not both"):
        sms_text(URL, FP, alias="acme@example.com", host="h", port=1)
    with pytest.raises(ValueError, match="give an alias"):
        sms_text(URL, FP)
    with pytest.raises(ValueError, match="give an alias"):
        sms_text(URL, FP, host="h")
    with pytest.raises(BadAlias):
        sms_text(URL, FP, alias="not an alias")


def test_known_lengths() -> None:
    assert sms_length("") == sms_length("")
    assert (sms_length("").units, sms_length("").parts) == (0, 0)
    assert sms_length("Hello @ £ € {x}").units == 15 + 3  # € { } take two septets each
    assert sms_length("a" * 160).parts == 1
    assert sms_length("a" * 161).parts == 2
    assert sms_length("a" * 306).parts == 2 and sms_length("a" * 307).parts == 3
    ucs = sms_length("Grüße, Zoë: ✓")
    assert (ucs.encoding, ucs.units) == ("UCS-2", 13)
    assert sms_length("😀").units == 2  # a surrogate pair
    assert sms_length("x" * 70 + "✓").parts == 2


def test_an_extension_pair_is_never_split_across_parts() -> None:
    text = "a" * 152 + "€" + "a" * 10  # 152 + 2 + 10 = 164 septets
    length = sms_length(text)
    assert (length.units, length.parts) == (164, 2)
    assert sms_length("a" * 152 + "€" * 77).parts == 3  # 152 | € doesn't fit in 153


def test_warning_only_when_too_long() -> None:
    assert length_warning(sms_length("a" * 160)) is None
    warning = length_warning(sms_length("a" * 170))
    assert warning is not None and "170 GSM-7" in warning and "2 parts" in warning
    warning = length_warning(sms_length("✓" * 71))
    assert warning is not None and "UCS-2" in warning and "(70)" in warning


@given(basic_text)
def test_basic_alphabet_counts_one_septet_each(text: str) -> None:
    length = sms_length(text)
    assert length.encoding == "GSM-7"
    assert length.units == len(text)


@given(gsm_text)
def test_extension_characters_count_two(text: str) -> None:
    length = sms_length(text)
    assert length.encoding == "GSM-7"
    assert length.units == len(text) + sum(c in GSM7_EXTENSION for c in text)


@given(gsm_text, non_gsm_char, gsm_text)
def test_one_foreign_character_switches_to_ucs2(before: str, odd: str, after: str) -> None:
    text = before + odd + after
    assert not is_gsm7(text)
    length = sms_length(text)
    assert length.encoding == "UCS-2"
    assert length.units == len(text.encode("utf-16-le")) // 2


@given(st.text(max_size=500))
def test_parts_hold_the_text(text: str) -> None:
    length = sms_length(text)
    assert length.fits == (length.parts <= 1)
    assert length.limit == SINGLE[length.encoding]
    if length.parts > 1:
        per_part = PART[length.encoding]
        # each full part wastes at most one unit (a two-unit character that did not fit)
        assert (per_part - 1) * (length.parts - 1) < length.units <= per_part * length.parts
    else:
        assert length.units <= length.limit


@given(st.text(max_size=300), st.characters(codec="utf-8"))
def test_appending_never_shortens(text: str, extra: str) -> None:
    before, after = sms_length(text), sms_length(text + extra)
    if before.encoding == after.encoding:
        assert after.units > before.units
        assert after.parts >= before.parts
