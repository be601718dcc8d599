"""The preset a portal's get site builds into the zipapp: which CSC resolves aliases.

``bootloader/preset.json`` (written by ``portal.getsite``, absent in an installed bootloader) is a
JSON object with ``csc`` (the CSC's URL the bootloader was downloaded through), and optionally
``csc_key`` (the CSC's resolve key: base64 of the raw Ed25519 public key) and ``csc_ca`` (PEM CA
certificates for the CSC's TLS). ``--csc`` and ``CSC_BOOTLOADER_CSC`` override the URL; the key
and the CA belong to the preset's CSC and apply only while the URL is that one.

Invariants: a preset that is present but unreadable or malformed is a :class:`ConfigError`
(never ignored: it is what the device trusts); reading it needs no third-party package.
"""

from __future__ import annotations

import importlib.resources
import json
from dataclasses import dataclass
from typing import Any

from bootloader.errors import ConfigError
from shared import resolve_sig

PRESET_FILE = "preset.json"


@dataclass(frozen=True, slots=True)
class Preset:
    csc: str | None = None
    #: base64 of the CSC's raw Ed25519 resolve key
    csc_key: str | None = None
    #: PEM CA certificates for the CSC's TLS
    csc_ca: str | None = None


def load_preset() -> Preset:
    """The preset built into this bootloader, or an empty one."""
    try:
        raw = importlib.resources.files("bootloader").joinpath(PRESET_FILE).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return Preset()
    except OSError as exc:
        raise ConfigError(f"cannot read the built-in preset: {exc}") from None
    return parse_preset(raw)


def parse_preset(raw: bytes) -> Preset:
    try:
        data: Any = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        data = None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ConfigError("the built-in preset is not a JSON object of strings: get a new copy")
    unknown = sorted(set(data) - {"csc", "csc_key", "csc_ca"})
    if unknown:
        raise ConfigError(f"the built-in preset has unknown keys {', '.join(unknown)}")
    key = data.get("csc_key")
    if key is not None and resolve_sig.parse_public_key(key) is None:
        raise ConfigError("the built-in preset's csc_key is not a base64 Ed25519 public key")
    return Preset(data.get("csc"), key, data.get("csc_ca"))
