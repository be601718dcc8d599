"""The provisioning SMS: its text (docs/provisioning.md, "The provisioning SMS") and its length.

:func:`sms_text` composes ``Get the client: URL then [User: NAME ]Alias: A cdzprov Key: FP`` (or
``Host: H Port: P`` instead of the alias). :func:`sms_length` counts what a phone network counts:
GSM-7 septets when every character is in the GSM 03.38 default alphabet or its extension table
(extension characters take two septets), otherwise UCS-2 code units (UTF-16; a character outside
the Basic Multilingual Plane takes two). One SMS holds 160 septets or 70 UCS-2 units; a longer
text is sent in parts of 153 or 67 (the rest is the concatenation header), and a two-unit
character is never split across parts. Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from shared.aliases import normalise_alias

#: GSM 03.38 default alphabet (without the escape code 0x1B).
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
#: GSM 03.38 extension table: each takes an escape septet plus its own.
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")

SINGLE = {"GSM-7": 160, "UCS-2": 70}
PART = {"GSM-7": 153, "UCS-2": 67}
Encoding = Literal["GSM-7", "UCS-2"]


@dataclass(frozen=True, slots=True)
class SmsLength:
    """How long a text is as an SMS."""

    encoding: Encoding
    units: int  # septets (GSM-7) or UTF-16 code units (UCS-2)
    parts: int  # messages needed (0 for the empty text)

    @property
    def limit(self) -> int:
        return SINGLE[self.encoding]

    @property
    def fits(self) -> bool:
        return self.units <= self.limit


def is_gsm7(text: str) -> bool:
    return all(c in GSM7_BASIC or c in GSM7_EXTENSION for c in text)


def _parts(costs: Iterable[int], total: int, encoding: Encoding) -> int:
    if total == 0:
        return 0
    if total <= SINGLE[encoding]:
        return 1
    size, parts, used = PART[encoding], 1, 0
    for cost in costs:
        if used + cost > size:
            parts, used = parts + 1, 0
        used += cost
    return parts


def sms_length(text: str) -> SmsLength:
    """Encoding, length in units and number of parts of ``text`` sent as an SMS."""
    encoding: Encoding
    if is_gsm7(text):
        encoding = "GSM-7"
        costs = [2 if c in GSM7_EXTENSION else 1 for c in text]
    else:
        encoding = "UCS-2"
        costs = [2 if ord(c) > 0xFFFF else 1 for c in text]
    total = sum(costs)
    return SmsLength(encoding, total, _parts(costs, total, encoding))


def sms_text(
    get_url: str,
    fingerprint: str,
    *,
    alias: str | None = None,
    host: str | None = None,
    port: int | None = None,
    user: str | None = None,
) -> str:
    """The SMS; exactly one of ``alias`` or ``host`` (with ``port``) must be given."""
    if alias is not None and host is not None:
        raise ValueError("give an alias or a host and port, not both")
    if alias is not None:
        config = f"Alias: {normalise_alias(alias)}"
    elif host is not None and port is not None:
        config = f"Host: {host} Port: {port}"
    else:
        raise ValueError("give an alias, or a host and a port")
    who = f"User: {user} " if user else ""
    return f"Get the client: {get_url} then {who}{config} cdzprov Key: {fingerprint}"


def length_warning(length: SmsLength) -> str | None:
    """A warning when the text does not fit one SMS, else None."""
    if length.fits:
        return None
    return (
        f"the text is {length.units} {length.encoding} characters, more than one SMS holds "
        f"({length.limit}); it will arrive as {length.parts} parts"
    )
