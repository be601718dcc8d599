"""``csc serve`` refuses secrets other users can read (csc/permissions.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from csc.config import CSCConfig
from csc.permissions import NotPrivate, check_private, secret_paths
from shared.config import Secret


def _config(state: Path, **over: object) -> CSCConfig:
    return CSCConfig(state_dir=state, **over)  # type: ignore[arg-type]


def test_missing_and_private_paths_pass(tmp_path: Path) -> None:
    check_private(_config(tmp_path / "not-yet"))  # created 0700 later
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    for name in ("signing-key.pem", "admin-token"):
        (state / name).write_text("secret")
        (state / name).chmod(0o600)
    check_private(_config(state))


def test_every_open_secret_is_named_with_its_chmod(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    state.chmod(0o750)
    (state / "signing-key.pem").write_text("secret")
    (state / "signing-key.pem").chmod(0o604)
    (state / "admin-token").write_text("secret")
    (state / "admin-token").chmod(0o600)
    with pytest.raises(NotPrivate) as caught:
        check_private(_config(state))
    text = str(caught.value)
    opened = f"the state directory {state} is open to other users (mode 0750)"
    assert f"{opened}; run: chmod 700 {state}" in text
    assert f"the signing key {state / 'signing-key.pem'} is open to other users (mode 0604)" in text
    assert f"chmod 600 {state / 'signing-key.pem'}" in text
    assert "admin-token" not in text


def test_a_file_handed_over_through_a_group_may_be_group_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Kubernetes secret volume: owned by root, mode 0440, read through the pod's group."""
    key = tmp_path / "mounted" / "signing-key.pem"
    key.parent.mkdir(mode=0o755)
    key.write_text("secret")
    key.chmod(0o440)
    state = tmp_path / "state"
    config = _config(state, signing_key_file=key, database_url=Secret("postgresql://db/csc"))
    assert [p for p, _ in secret_paths(config)] == [state, key, state / "admin-token"]
    owner = os.getuid()
    monkeypatch.setattr("csc.permissions.os.getuid", lambda: owner + 1)
    check_private(config)
    key.chmod(0o444)
    with pytest.raises(NotPrivate, match=rf"mode 0444\); run: chmod o-rwx {key} \(as its owner\)"):
        check_private(config)
