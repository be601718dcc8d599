"""The admin API's client, as ``csc admin`` uses it: where the API is and which operator token
to send (flags, environment, files in the state directory), and the typed errors of a request.
Standard library only (urllib), so the CLI starts without aiohttp.
"""

from __future__ import annotations

import argparse
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csc.config import default_state_dir
from csc.store import ADMIN_TOKEN_FILE

URL_FILE = "admin-url"  # csc.admin.api.URL_FILE (not imported: keeps the CLI free of aiohttp)
API_PREFIX = "/v1/admin"
#: What a namespace from another parser (``csc``'s own) lacks of the admin options.
COMMON_DEFAULTS: dict[str, Any] = {
    "url": None,
    "token_file": None,
    "state_dir": None,
    "ca_file": None,
    "timeout": 30.0,
    "json": False,
}


class UsageProblem(Exception):
    """No URL or token could be found, or the arguments make no request."""


class AdminApiError(Exception):
    def __init__(self, status: int, code: str, message: str, problems: list[str]) -> None:
        self.status, self.code, self.message, self.problems = status, code, message, problems
        super().__init__(message)


class Unreachable(Exception):
    pass


@dataclass(frozen=True)
class AdminClient:
    url: str
    token: str
    context: ssl.SSLContext | None = None
    timeout: float = 30.0

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        query: Mapping[str, str] | None = None,
    ) -> Any:
        """One API call; the decoded JSON answer. Raises AdminApiError or Unreachable."""
        full = self.url.rstrip("/") + API_PREFIX + path
        if query:
            full += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(full, data=data, method=method, headers=headers)
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if self.context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=self.context))
        opener = urllib.request.build_opener(*handlers)
        try:
            with opener.open(request, timeout=self.timeout) as response:
                return _decode(response.read(), self.url)
        except urllib.error.HTTPError as err:
            raise _api_error(err) from None
        except urllib.error.URLError as err:
            raise Unreachable(f"cannot reach the admin API at {self.url}: {err.reason}") from None
        except OSError as err:
            raise Unreachable(f"admin API at {self.url}: {err}") from None


def _decode(raw: bytes, url: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise Unreachable(f"{url} did not answer with JSON: is it the admin API?") from None


def _api_error(err: urllib.error.HTTPError) -> AdminApiError:
    try:
        body = json.loads(err.read())
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return AdminApiError(err.code, "http_error", f"HTTP {err.code} {err.reason}", [])
    problems = body.get("problems")
    return AdminApiError(
        err.code,
        str(body.get("error", "error")),
        str(body.get("message", "")),
        [str(p) for p in problems] if isinstance(problems, list) else [],
    )


def segment(text: str) -> str:
    return urllib.parse.quote(text, safe="@*+")


def _read_secret(path: Path, what: str) -> str:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageProblem(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if not value:
        raise UsageProblem(f"the {what} {path} is empty")
    return value


def _state_dir(args: argparse.Namespace, env: Mapping[str, str]) -> Path:
    if args.state_dir:
        return Path(args.state_dir).expanduser()
    if env.get("CSC_STATE_DIR", "").strip():
        return Path(env["CSC_STATE_DIR"].strip()).expanduser()
    return default_state_dir(env)


def _find_url(args: argparse.Namespace, env: Mapping[str, str]) -> str:
    if args.url:
        return str(args.url)
    if env.get("CSC_ADMIN_URL", "").strip():
        return env["CSC_ADMIN_URL"].strip()
    path = _state_dir(args, env) / URL_FILE
    if not path.exists():
        raise UsageProblem(
            f"no admin API URL: pass --url, set CSC_ADMIN_URL, or run where the node's state "
            f"directory is ({path} not found: is 'csc serve' running with the admin API on?)"
        )
    return _read_secret(path, "admin URL file")


def _find_token(args: argparse.Namespace, env: Mapping[str, str]) -> str:
    if args.token_file is not None:
        return _read_secret(args.token_file, "token file")
    if env.get("CSC_ADMIN_TOKEN", "").strip():
        return env["CSC_ADMIN_TOKEN"].strip()
    if env.get("CSC_ADMIN_TOKEN_FILE", "").strip():
        return _read_secret(Path(env["CSC_ADMIN_TOKEN_FILE"].strip()), "token file")
    path = _state_dir(args, env) / ADMIN_TOKEN_FILE
    if not path.exists():
        raise UsageProblem(
            f"no operator token: pass --token-file, set CSC_ADMIN_TOKEN or CSC_ADMIN_TOKEN_FILE, "
            f"or run where the node's state directory is ({path} not found)"
        )
    return _read_secret(path, "operator token file")


def client_for(args: argparse.Namespace, env: Mapping[str, str]) -> AdminClient:
    args = with_defaults(args)
    url = _find_url(args, env)
    if not url.startswith(("http://", "https://")):
        raise UsageProblem(f"admin API URL {url!r}: expected http://HOST:PORT or https://...")
    ca_file = args.ca_file or (env.get("CSC_ADMIN_CA_FILE", "").strip() or None)
    context = None
    if url.startswith("https://"):
        try:
            context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise UsageProblem(f"CA file {ca_file}: {exc}") from None
    return AdminClient(url, _find_token(args, env), context, args.timeout)


def with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    for name, value in COMMON_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    return args
