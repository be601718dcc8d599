"""The bootloader's whole run, in process, against a fake portal (and CSC front) on 127.0.0.1:0:
every stage's failures, resume after a cut-off download, questions on a terminal."""

from __future__ import annotations

import http.server
import json
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bootloader import flow
from tests.support.packages import (
    ALIAS,
    DEVICE_TYPE,
    PASSWORD,
    AppFiles,
    CliRun,
    FakePortal,
    TtyInput,
    build_package,
    fingerprint,
    payload,
    public_raw,
    run_bootloader,
    tree_hash,
)

KEY = Ed25519PrivateKey.generate()
FP = fingerprint(KEY)
BIG = build_package(KEY, [AppFiles("client", "6.0", {"client/data.bin": payload(600_000)})])


@pytest.fixture
def portal() -> Iterator[FakePortal]:
    with FakePortal(KEY) as fake:
        yield fake


def boot(
    portal: FakePortal,
    target: Path,
    *extra: str,
    sms: str | None = None,
    env: dict[str, str] | None = None,
    stdin: TtyInput | None = None,
) -> CliRun:
    text = sms if sms is not None else f"User: alice Alias: {ALIAS} cdzprov Key: {FP}"
    argv = ["--csc", portal.url, "--target", str(target), "--device-type", DEVICE_TYPE]
    argv += ["--sms", text] if text else []
    environment = {"CSC_BOOTLOADER_PASSWORD": PASSWORD} if stdin is None else {}
    return run_bootloader([*argv, *extra], env={**environment, **(env or {})}, stdin=stdin)


def _client(target: Path) -> str:
    return f"{os.readlink(target / 'current')}|{tree_hash(target / 'releases')}"


# --- success -----------------------------------------------------------------------------------


def test_alias_run_installs_and_reports(portal: FakePortal, tmp_path: Path) -> None:
    target = tmp_path / "client"
    result = boot(portal, target)
    assert result.code == 0, result.err
    assert result.out.splitlines() == [
        f"Installed package {portal.package_id[:16]} from Acme Ltd for alice (linux-x64) in "
        f"{target / 'current'}",
        "  client 5.1.0 (2 files)",
        "  tools 1.2 (1 file)",
        "Policies:",
        "  sync-interval = 15m",
    ]
    assert (target / "current/client/bin/run").read_bytes() == b"#!/bin/sh\necho client\n"
    assert [p.split("?")[0] for p in portal.paths()] == [
        f"GET /v1/resolve/{ALIAS}",
        f"GET /t/{ALIAS}/v1/portal",
        f"POST /t/{ALIAS}/v1/logon",
        f"GET /t/{ALIAS}/v1/package/{portal.package_id}",
    ]
    (logon,) = portal.logons()
    device_id = (target / ".csc/device-id").read_text().strip()
    assert logon == {
        "user": "alice",
        "password": PASSWORD,
        "device_type": DEVICE_TYPE,
        "device_id": device_id,
    }
    assert "download: complete" in result.err
    assert list((target / ".partial").iterdir()) == []


def test_proxy_run_with_host_and_port(portal: FakePortal, tmp_path: Path) -> None:
    sms = f"User: alice Host: 127.0.0.1 Port: {portal.port} cdzprov Key: {FP}"
    argv = ["--target", str(tmp_path), "--device-type", DEVICE_TYPE, "--sms", sms, "--quiet"]
    result = run_bootloader(argv, env={"CSC_BOOTLOADER_PASSWORD": PASSWORD})
    assert result.code == 0, result.err
    assert result.err == ""  # --quiet, and the key was given: nothing to say
    assert portal.paths()[0] == "GET /v1/portal"


def test_second_run_replaces_the_client_and_keeps_the_device_id(
    portal: FakePortal, tmp_path: Path
) -> None:
    assert boot(portal, tmp_path).code == 0
    again = boot(portal, tmp_path)
    assert "Reinstalled: this package was the current release already" in again.out
    portal.package = build_package(KEY, [AppFiles("client", "5.2.0", {"client/bin/run": b"new"})])
    second = boot(portal, tmp_path)
    assert second.code == 0, second.err
    assert "client 5.2.0 (1 file)" in second.out
    assert "Replaced the previous release" in second.out
    assert len({logon["device_id"] for logon in portal.logons()}) == 1


# --- resolve and connect ---------------------------------------------------------------------


def test_unknown_alias(portal: FakePortal, tmp_path: Path) -> None:
    result = boot(portal, tmp_path, sms="User: alice Alias: nobody@example.com cdzprov")
    assert result.code == 3
    assert "resolve failed: no portal is registered for the alias nobody@example.com" in result.err
    assert "(request req-" in result.err


def test_portal_offline_says_when_to_retry(portal: FakePortal, tmp_path: Path) -> None:
    portal.resolve_failure = (503, "portal_offline", 30)
    result = boot(portal, tmp_path)
    assert result.code == 3
    assert (
        f"csc-bootloader: resolve failed: the portal of {ALIAS} is offline; try again in 30 s "
        "(request req-0001)"
    ) in result.err
    assert not (tmp_path / "current").exists()


@pytest.mark.parametrize(
    ("failure", "fragment"),
    [
        ((502, "upstream_refused", None), f"the portal of {ALIAS} cannot be reached"),
        ((504, "upstream_timeout", None), f"the portal of {ALIAS} did not answer in time"),
        ((503, "going_away", 5), "the CSC is restarting; try again in 5 s"),
        ((500, "internal", None), f"the portal of {ALIAS} answered HTTP 500 Internal Server Error"),
    ],
)
def test_relay_errors_on_the_tunnel(
    portal: FakePortal, tmp_path: Path, failure: tuple[int, str, int | None], fragment: str
) -> None:
    portal.tunnel_failure = failure
    result = boot(portal, tmp_path)
    assert result.code == 4, result.err
    assert f"connect failed: {fragment}" in result.err


def test_wrong_key_is_refused_before_any_credential_is_sent(
    portal: FakePortal, tmp_path: Path
) -> None:
    result = boot(portal, tmp_path, sms=f"User: alice Alias: {ALIAS} cdzprov Key: {'0' * 16}")
    assert result.code == 4
    assert f"has the key {FP}, not the 0000000000000000 you were given" in result.err
    assert portal.logons() == []


def test_trust_on_first_use_then_the_key_is_pinned(portal: FakePortal, tmp_path: Path) -> None:
    first = boot(portal, tmp_path, sms=f"User: alice Alias: {ALIAS} cdzprov")
    assert first.code == 0, first.err
    assert "warning: no key fingerprint given" in first.err and FP in first.err
    other = Ed25519PrivateKey.generate()
    portal.advertised_key = public_raw(other)
    second = boot(portal, tmp_path, sms=f"User: alice Alias: {ALIAS} cdzprov")
    assert second.code == 4
    assert "the installed client came from the key" in second.err
    assert f"--fingerprint {fingerprint(other)}" in second.err
    assert len(portal.logons()) == 1


def test_redirect_is_reported_not_followed(portal: FakePortal, tmp_path: Path) -> None:
    portal.redirect_portal = "https://portal.elsewhere.example/"
    result = boot(portal, tmp_path)
    assert result.code == 4
    assert "redirects to https://portal.elsewhere.example/; use that address" in result.err


def test_a_portal_that_does_not_answer_times_out(portal: FakePortal, tmp_path: Path) -> None:
    portal.stall.set()
    result = boot(portal, tmp_path, "--timeout", "0.3")
    assert result.code == 4
    assert "did not answer within 0.3 s" in result.err


def test_connection_refused(tmp_path: Path) -> None:
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        argv = ["--alias", ALIAS, "--user", "alice", "--password", "x", "--target", str(tmp_path)]
        result = run_bootloader([*argv, "--csc", f"http://127.0.0.1:{port}"])
    assert result.code == 3
    assert f"the CSC at http://127.0.0.1:{port} refused the connection" in result.err
    # an unreachable CSC says how to name the right one
    hint = f"if http://127.0.0.1:{port} is not your CSC, give it with --csc URL or "
    assert hint + "CSC_BOOTLOADER_CSC" in result.err


def test_a_server_that_is_not_a_csc_says_how_to_name_the_csc(tmp_path: Path) -> None:
    """A 404 without a CSC's error code points at --csc and the variable."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        argv = ["--alias", ALIAS, "--user", "alice", "--password", "x", "--target", str(tmp_path)]
        result = run_bootloader([*argv, "--csc", url])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert result.code == 3
    assert f"if {url} is not your CSC, give it with --csc URL or CSC_BOOTLOADER_CSC" in result.err


# --- logon -----------------------------------------------------------------------------------


def test_wrong_password_installs_nothing(portal: FakePortal, tmp_path: Path) -> None:
    result = boot(portal, tmp_path, env={"CSC_BOOTLOADER_PASSWORD": "wrong"})
    assert result.code == 5
    assert "logon failed: wrong user name or password (request " in result.err
    assert portal.downloads() == []
    assert not (tmp_path / "current").exists()


def test_too_many_attempts_says_when_to_retry(portal: FakePortal, tmp_path: Path) -> None:
    portal.logon_failure = (429, "too_many_attempts", 120)
    result = boot(portal, tmp_path)
    assert result.code == 5
    assert "logon failed: too many failed logons; try again in 2 min" in result.err


def test_unknown_device_type_lists_the_known_ones(portal: FakePortal, tmp_path: Path) -> None:
    result = boot(portal, tmp_path, "--device-type", "toaster")
    assert result.code == 5
    assert "no device type toaster" in result.err and "android-arm64" in result.err


# --- download and verification ---------------------------------------------------------------


def test_cut_off_download_resumes_on_the_next_run(portal: FakePortal, tmp_path: Path) -> None:
    portal.package = BIG
    portal.cut_after, portal.cuts = 200_000, 1
    first = boot(portal, tmp_path)
    assert first.code == 6
    assert "download failed: the connection to the portal of" in first.err
    assert "broke off after 195.3 KiB of" in first.err and "run again to resume" in first.err
    partial = tmp_path / ".partial" / f"{portal.package_id}.zip"
    assert partial.stat().st_size == 200_000
    assert not (tmp_path / "current").exists()

    second = boot(portal, tmp_path)
    assert second.code == 0, second.err
    assert "download: resuming at 195.3 KiB" in second.err
    resumed = portal.downloads()[-1].headers
    assert resumed["Range"] == "bytes=200000-"
    assert resumed["If-Range"] == f'"{portal.package_id}"'
    assert (tmp_path / "current/client/data.bin").read_bytes() == payload(600_000)
    assert not partial.exists()


def test_range_ignored_by_the_portal_starts_over(portal: FakePortal, tmp_path: Path) -> None:
    portal.package = BIG
    partial_dir = tmp_path / ".partial"
    partial_dir.mkdir(parents=True)
    (partial_dir / f"{portal.package_id}.zip").write_bytes(BIG[:1000])
    (partial_dir / f"{'0' * 64}.zip").write_bytes(b"an older package")
    portal.honour_ranges = False
    result = boot(portal, tmp_path)
    assert result.code == 0, result.err
    assert len(portal.downloads()) == 1
    assert list(partial_dir.iterdir()) == []


def test_damaged_partial_file_is_fetched_again_from_scratch(
    portal: FakePortal, tmp_path: Path
) -> None:
    portal.package = BIG
    partial_dir = tmp_path / ".partial"
    partial_dir.mkdir(parents=True)
    (partial_dir / f"{portal.package_id}.zip").write_bytes(b"\x00" * 1000)
    result = boot(portal, tmp_path)
    assert result.code == 0, result.err
    ranges = [d.headers.get("Range") for d in portal.downloads()]
    assert ranges == ["bytes=1000-", None]


def test_tampered_package_keeps_the_old_client(portal: FakePortal, tmp_path: Path) -> None:
    assert boot(portal, tmp_path).code == 0
    before = _client(tmp_path)

    def edit(entries: dict[str, bytes]) -> None:
        entries["files/tools/readme.txt"] = b"TOOLS\n"

    portal.package = build_package(KEY, edit_entries=edit)
    result = boot(portal, tmp_path)
    assert result.code == 7
    assert "verify failed: tools/readme.txt does not match its SHA-256" in result.err
    assert _client(tmp_path) == before
    # bytes that failed verification are not kept for a resume
    assert list((tmp_path / ".partial").iterdir()) == []


def test_package_signed_by_another_key_is_refused(portal: FakePortal, tmp_path: Path) -> None:
    portal.package = build_package(KEY, sign_with=Ed25519PrivateKey.generate())
    result = boot(portal, tmp_path)
    assert result.code == 7
    assert "signature does not match the portal's key" in result.err
    assert not (tmp_path / "current").exists()


# --- questions on a terminal ---------------------------------------------------------------


def test_everything_asked_on_a_terminal(portal: FakePortal, tmp_path: Path) -> None:
    portal.device_types = ["android-arm64", "win-x64"]
    portal.package = build_package(KEY, device_type="win-x64")
    answers = TtyInput(f"{ALIAS}\nfridge\nwin-x64\nalice\n{PASSWORD}\n")
    argv = ["--csc", portal.url, "--target", str(tmp_path)]
    result = run_bootloader(argv, stdin=answers)
    assert result.code == 0, result.err
    for prompt in ("Alias (or host:port): ", "User: ", "Password for alice: ", "Device type"):
        assert prompt in result.err
    assert "'fridge' is not one of android-arm64, win-x64" in result.err
    assert "trusting the key" in result.err


def test_wrong_password_is_asked_again(portal: FakePortal, tmp_path: Path) -> None:
    answers = TtyInput(f"alice\nwrong\nalice\n{PASSWORD}\n")
    result = boot(portal, tmp_path, sms=f"Alias: {ALIAS} cdzprov Key: {FP}", stdin=answers)
    assert result.code == 0, result.err
    assert "Wrong user name or password; try again" in result.err
    assert [logon["password"] for logon in portal.logons()] == ["wrong", PASSWORD]


def test_three_wrong_passwords_give_up(portal: FakePortal, tmp_path: Path) -> None:
    answers = TtyInput("a\n" * 3)
    result = boot(portal, tmp_path, stdin=answers)
    assert result.code == 5
    assert len(portal.logons()) == 3


# --- no tracebacks -------------------------------------------------------------------------


def test_internal_errors_are_one_line_unless_debugging(
    portal: FakePortal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(flow, "portal_info", broken)
    plain = boot(portal, tmp_path)
    assert plain.code == 1
    assert "internal error: RuntimeError: boom; --debug shows the details" in plain.err
    assert "Traceback" not in plain.err
    debug = boot(portal, tmp_path, "--debug")
    assert debug.code == 1 and "Traceback (most recent call last)" in debug.err


def test_broken_portal_answers_are_named(portal: FakePortal, tmp_path: Path) -> None:
    portal.name = "Acme\x1b[31m Ltd"
    original = portal.portal_document

    def no_types() -> dict[str, object]:
        document = original()
        document["device_types"] = "everything"
        return document

    portal.portal_document = no_types  # type: ignore[method-assign]
    result = boot(portal, tmp_path)
    assert result.code == 4
    assert f"connect failed: the portal of {ALIAS} sent no list of device types" in result.err
    assert json.dumps("\x1b") not in result.err


# --- TLS to a local/DMZ proxy -------------------------------------------------------------------


def test_tls_proxy_needs_a_trusted_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with FakePortal(KEY, tls=server) as portal:
        sms = f"User: alice Host: 127.0.0.1 Port: {portal.port} cdzprov Key: {FP}"
        argv = [
            "--sms",
            sms,
            "--tls",
            "--target",
            str(tmp_path / "t"),
            "--device-type",
            DEVICE_TYPE,
        ]
        env = {"CSC_BOOTLOADER_PASSWORD": PASSWORD}
        untrusted = run_bootloader(argv, env=env)
        trusted = run_bootloader([*argv, "--ca-file", str(ca_file)], env=env)
    assert untrusted.code == 4
    assert "is not trusted" in untrusted.err and "--ca-file" in untrusted.err
    assert trusted.code == 0, trusted.err


@pytest.mark.parametrize(
    "edit",
    [
        lambda answer: answer["package"].update(url="https://elsewhere.example/p.zip"),
        lambda answer: answer["package"].update(url="v1/package/\u00e9"),
        lambda answer: answer["package"].update(size=-1),
        lambda answer: answer["package"].update(sha256="0" * 64),
        lambda answer: answer.update(session="a\r\nX-Evil: 1"),
    ],
)
def test_logon_answers_that_describe_the_package_wrongly(
    portal: FakePortal, tmp_path: Path, edit: Callable[[dict[str, Any]], None]
) -> None:
    portal.edit_logon = edit
    result = boot(portal, tmp_path)
    assert result.code == 5, result.err
    assert "logon failed: the portal of" in result.err
    assert portal.downloads() == []


def test_a_portal_that_sends_another_size_than_announced(
    portal: FakePortal, tmp_path: Path
) -> None:
    size = len(portal.package)

    def bigger(answer: dict[str, Any]) -> None:
        answer["package"]["size"] = size + 10

    portal.edit_logon = bigger
    partial = tmp_path / ".partial" / f"{portal.package_id}.zip"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(portal.package)  # complete, so the resume asks beyond the end: 416
    result = boot(portal, tmp_path)
    assert result.code == 6, result.err
    assert f"sends {size} bytes but announced {size + 10}" in result.err
    assert [d.headers.get("Range") for d in portal.downloads()] == [f"bytes={size}-", None]
