"""The peer-link TLS identity (csc/cluster/peertls.py): every node derives the same certificate
from the cluster secret, hands its key to OpenSSL without a readable file, and the settings are
checked as one. Handshakes: tests/integration/test_cluster_peer_tls.py."""

from __future__ import annotations

import datetime
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from csc.cluster import peertls
from csc.config import load_csc_config
from shared.config import ConfigError

SECRET = b"s" * 40
OTHER = b"t" * 40


def test_every_node_derives_the_same_bytes_and_another_secret_others() -> None:
    assert peertls.derived_identity(SECRET) == peertls.derived_identity(bytes(SECRET))
    cert, key = peertls.derived_identity(SECRET)
    other_cert, other_key = peertls.derived_identity(OTHER)
    assert cert != other_cert and key != other_key


def test_the_derived_certificate() -> None:
    cert = x509.load_pem_x509_certificate(peertls.derived_identity(SECRET)[0])
    name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert name == peertls.SUBJECT and cert.issuer == cert.subject
    assert cert.not_valid_after_utc.year == 9999
    assert cert.not_valid_before_utc <= datetime.datetime.now(datetime.UTC)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.public_key() == peertls.derived_key(SECRET).public_key()


def test_the_key_file_is_gone_when_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    with peertls._private_file(b"secret") as path:
        assert Path(path).read_bytes() == b"secret"
        held = os.readlink(path)  # /proc/self/fd/N names the anonymous file while it is open
    # gone, or the descriptor number already reused by something else in this busy process
    assert not Path(path).exists() or os.readlink(path) != held
    monkeypatch.delattr(os, "memfd_create")  # where there is no anonymous memory file
    with peertls._private_file(b"secret") as path:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert Path(path).read_bytes() == b"secret"
    assert not Path(path).exists()
    assert peertls.derived_contexts(SECRET).client.verify_mode == ssl.CERT_REQUIRED


def test_looks_like_tls() -> None:
    assert peertls.looks_like_tls(b"\x16\x03\x01\x02\x00")  # a ClientHello
    assert peertls.looks_like_tls(b"\x15\x03\x03\x00\x02")  # an alert
    assert not peertls.looks_like_tls(b"\x01\x01\x00\x00")  # a frame header (protocol 1)
    assert not peertls.looks_like_tls(b"\x16")


def test_operator_files_that_cannot_be_used(tmp_path: Path) -> None:
    cert, key = peertls.derived_identity(SECRET)
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(peertls.derived_identity(OTHER)[1])  # not cert's key
    with pytest.raises(ValueError, match="cannot be used"):
        peertls.peer_contexts(SECRET, tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "c.pem")
    with pytest.raises(ValueError, match="peer_tls_ca"):
        peertls.peer_contexts(SECRET, tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "no")
    (tmp_path / "k.pem").write_bytes(key)
    pair = peertls.peer_contexts(SECRET, tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "c.pem")
    assert pair.server.verify_mode == ssl.CERT_REQUIRED


# -- settings ----------------------------------------------------------------------------------


def test_peer_tls_is_on_by_default_and_off_by_environment() -> None:
    assert load_csc_config(file=None, env={}).peer_tls is True
    assert load_csc_config(file=None, env={"CSC_PEER_TLS": "false"}).peer_tls is False


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        (
            {"CSC_PEER_TLS_CERT": "c.pem"},
            "peer_tls_cert, peer_tls_key and peer_tls_ca must be set together (or none)",
        ),
        (
            {"CSC_PEER_TLS": "false", "CSC_PEER_TLS_CA": "c.pem"},
            "peer_tls_ca set but peer_tls is false",
        ),
        (
            {"CSC_PEER_TLS_CERT": "c.pem", "CSC_PEER_TLS_KEY": "k.pem", "CSC_PEER_TLS_CA": "c.pem"},
            "peer_tls_key k.pem: no such file",
        ),
    ],
)
def test_peer_tls_files(
    env: dict[str, str], problem: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.pem").write_text("x")
    with pytest.raises(ConfigError) as exc:
        load_csc_config(file=None, env=env)
    assert exc.value.problems == [problem]
