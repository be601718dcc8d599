"""The signed resolve answer (shared/resolve_sig.py), the bootloader's preset
(bootloader/preset.py) and what the portal's get site presets (portal/server.py csc_preset)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast
from unittest import mock

import pytest
from aiohttp.test_utils import make_mocked_request
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bootloader.errors import ConfigError
from bootloader.preset import Preset, parse_preset
from portal.getsite import PRESET_ENTRY, build_bootloader_pyz
from portal.server import csc_preset
from portal.state import PortalState
from shared import resolve_sig
from shared.peers import TrustedPeers
from tests.support.portal import fake_bootloader

ALIAS, TUNNEL = "acme@example.com", "/t/acme@example.com/"


def test_the_signed_bytes_are_canonical() -> None:
    signed = resolve_sig.signed_bytes(ALIAS, "Acme Corp", "help@acme.example", TUNNEL)
    assert signed == (
        b"csc-resolve-v1\n"
        b'{"alias":"acme@example.com","contact":"help@acme.example","name":"Acme Corp",'
        b'"tunnel":"/t/acme@example.com/"}'
    )
    assert resolve_sig.signed_bytes(ALIAS, "Müller 😀", "", TUNNEL).endswith(
        b'"name":"M\\u00fcller \\ud83d\\ude00","tunnel":"/t/acme@example.com/"}'
    )


def test_a_signature_covers_every_field() -> None:
    key = Ed25519PrivateKey.generate()
    public = resolve_sig.parse_public_key(resolve_sig.public_key_text(key.public_key()))
    assert public is not None
    sig = resolve_sig.sign(key, ALIAS, "Acme Corp", "help@acme.example", TUNNEL)
    assert resolve_sig.verify(public, sig, ALIAS, "Acme Corp", "help@acme.example", TUNNEL)
    for changed in (
        ("other@example.com", "Acme Corp", "help@acme.example", TUNNEL),
        (ALIAS, "Acme Corp Payroll", "help@acme.example", TUNNEL),
        (ALIAS, "Acme Corp", "evil@example.net", TUNNEL),
        (ALIAS, "Acme Corp", "help@acme.example", "/t/other@example.com/"),
    ):
        assert not resolve_sig.verify(public, sig, *changed)
    other = Ed25519PrivateKey.generate().public_key()
    assert not resolve_sig.verify(other, sig, ALIAS, "Acme Corp", "help@acme.example", TUNNEL)
    for bad in (None, 42, "", "not base64!", sig[:-4]):
        assert not resolve_sig.verify(public, bad, ALIAS, "Acme Corp", "help@acme.example", TUNNEL)
    assert resolve_sig.parse_public_key("AAAA") is None
    assert resolve_sig.parse_public_key("%%") is None


def _key_text() -> str:
    return resolve_sig.public_key_text(Ed25519PrivateKey.generate().public_key())


def test_preset_parsing() -> None:
    key = _key_text()
    raw = json.dumps({"csc": "https://csc.example", "csc_key": key, "csc_ca": "PEM"}).encode()
    assert parse_preset(raw) == Preset("https://csc.example", key, "PEM")
    assert parse_preset(b"{}") == Preset()
    for bad, message in (
        (b"[1]", "not a JSON object of strings"),
        (b'{"csc": 1}', "not a JSON object of strings"),
        (b'{"csc": "x", "url": "y"}', "unknown keys url"),
        (b'{"csc_key": "AAAA"}', "csc_key is not a base64 Ed25519 public key"),
        (b"\xff", "not a JSON object"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_preset(bad)


def test_the_preset_goes_into_the_zipapp(tmp_path: Path) -> None:
    pkg = fake_bootloader(tmp_path)
    (pkg / "preset.json").write_text('{"csc": "https://stray.example"}')  # never shipped
    plain = build_bootloader_pyz(pkg)
    with zipfile.ZipFile(io.BytesIO(plain)) as zf:
        assert PRESET_ENTRY not in zf.namelist()
    preset = {"csc": "https://csc.example"}
    with zipfile.ZipFile(io.BytesIO(build_bootloader_pyz(pkg, preset=preset))) as zf:
        assert json.loads(zf.read(PRESET_ENTRY)) == preset


def _state(csc_ca: str | None = None) -> PortalState:
    trusted = TrustedPeers(["127.0.0.0/8"])
    return cast(PortalState, SimpleNamespace(trusted=trusted, csc_ca=csc_ca))


def _request(peer: str, headers: dict[str, str]) -> Any:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (peer, 40000) if name == "peername" else default
    )
    return make_mocked_request(
        "GET", "/get/csc-bootloader.pyz", headers=headers, transport=transport
    )


def test_the_get_site_presets_the_csc_it_was_reached_through() -> None:
    key = _key_text()
    through_csc = {
        "X-Forwarded-Host": "csc.example.com:8443",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Prefix": "/t/acme@example.com",
        "X-CSC-Resolve-Key": key,
    }
    got = csc_preset(_request("127.0.0.1", through_csc), _state("PEM"))
    assert got == {"csc": "https://csc.example.com:8443", "csc_key": key, "csc_ca": "PEM"}
    # not believed from an untrusted peer; a DMZ proxy (no /t/ prefix) is not a CSC
    assert csc_preset(_request("192.0.2.7", through_csc), _state()) is None
    assert (
        csc_preset(_request("127.0.0.1", {**through_csc, "X-Forwarded-Prefix": ""}), _state())
        is None
    )
    for host in ("", "evil.example/path", "a b", "x@y"):
        headers = {**through_csc, "X-Forwarded-Host": host}
        assert csc_preset(_request("127.0.0.1", headers), _state()) is None, host
    weird = {**through_csc, "X-Forwarded-Proto": "gopher", "X-CSC-Resolve-Key": "junk"}
    assert csc_preset(_request("127.0.0.1", weird), _state()) == {
        "csc": "https://csc.example.com:8443"
    }
