"""``csc serve`` refuses secrets that other users can read: the state directory, the signing key
and the ``admin-token`` file.

The rule, per path that exists (a missing one is created private later, 0700 or 0600):

* owned by this process's user: no group or other permission bit may be set (``chmod 700`` a
  directory, ``chmod 600`` a file);
* owned by someone else (a Kubernetes secret volume, a file root hands over through a group):
  no *other* bit may be set; a group bit is how this process is meant to read it.

Symlinks are followed (a Kubernetes secret file is a symlink into ``..data``). The check runs
before the node opens anything, so a refused start changes nothing.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from csc.config import CSCConfig
from csc.store import ADMIN_TOKEN_FILE
from shared.tokens import SIGNING_KEY_FILE


class NotPrivate(Exception):
    """A secret that other users can read; the message names the path and the fix."""


def _problem(path: Path, what: str) -> str | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{what} {path}: {exc.strerror or exc}"
    mode = stat.S_IMODE(st.st_mode)
    is_dir = stat.S_ISDIR(st.st_mode)
    if st.st_uid == os.getuid():
        if not mode & 0o077:
            return None
        fix = f"chmod {'700' if is_dir else '600'} {path}"
    else:
        if not mode & 0o007:
            return None
        fix = f"chmod o-rwx {path} (as its owner)"
    return (
        f"{what} {path} is open to other users (mode {mode:04o}); run: {fix}, "
        "and check that nothing secret was exposed"
    )


def secret_paths(config: CSCConfig) -> list[tuple[Path, str]]:
    """The paths the check looks at, with how messages name them."""
    state_dir = config.state_dir.absolute()
    paths = [(state_dir, "the state directory")]
    if config.signing_key_file is not None:
        paths.append((config.signing_key_file.absolute(), "the signing key"))
    elif config.database_url is None:
        paths.append((state_dir / SIGNING_KEY_FILE, "the signing key"))
    paths.append((state_dir / ADMIN_TOKEN_FILE, "the admin token file"))
    return paths


def check_private(config: CSCConfig) -> None:
    """Raise :class:`NotPrivate` naming every secret that other users can read."""
    problems = [p for path, what in secret_paths(config) if (p := _problem(path, what))]
    if problems:
        raise NotPrivate("; ".join(problems))
