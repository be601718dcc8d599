"""Waiting without sleeping blindly, and talking to the CSC while waiting.

:func:`wait_until` / :func:`async_wait_until` poll a condition until a deadline scaled by
:func:`harness.procs.scaled` (a busy machine gets more time, never a shorter one);
:func:`wait_alias_online` waits until an alias resolves; :func:`http_request` is a blocking
request that ignores ``*_proxy`` variables (tests only talk to loopback).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from harness.procs import READY_TIMEOUT, scaled

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    interval: float = 0.05,
    *,
    message: str = "",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` until it returns a truthy value (returned) or ``timeout`` (scaled)
    passes (:class:`TimeoutError`). Exceptions of the ``ignore`` types count as falsy."""
    deadline = time.monotonic() + scaled(timeout)
    last: object = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except ignore as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{message or 'condition'} not met in {scaled(timeout):.1f}s: {last!r}"
            )
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], T | Awaitable[T | None] | None],
    timeout: float,
    interval: float = 0.05,
    *,
    message: str = "",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Like :func:`wait_until`, without blocking the loop; ``predicate`` may be async."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + scaled(timeout)
    last: object = None
    while True:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            last = value
        except ignore as exc:
            last = exc
        if loop.time() >= deadline:
            raise TimeoutError(
                f"{message or 'condition'} not met in {scaled(timeout):.1f}s: {last!r}"
            )
        await asyncio.sleep(interval)


def resolve_url(csc_url: str, alias: str) -> str:
    """``{csc_url}/v1/resolve/{alias}`` with the alias quoted for a path segment."""
    return f"{csc_url.rstrip('/')}/v1/resolve/{urllib.parse.quote(alias, safe='@')}"


def tunnel_url(csc_url: str, alias: str, path: str = "/") -> str:
    """``{csc_url}/t/{alias}/{path}``: a URL through the tunnel to the tenant's upstream."""
    quoted = urllib.parse.quote(alias, safe="@")
    return f"{csc_url.rstrip('/')}/t/{quoted}/{path.lstrip('/')}"


#: urllib opener that ignores *_proxy environment variables: tests only talk to loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_request(
    url: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """A blocking HTTP request without proxies: ``(status, headers, body)``, errors included."""
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with _OPENER.open(req, timeout=scaled(timeout)) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers.items()), err.read()


def _resolve_once(csc_url: str, alias: str) -> dict[str, Any] | str:
    """The resolve answer when online; otherwise a short description of why not."""
    try:
        status, _, body = http_request(resolve_url(csc_url, alias), timeout=5.0)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    if status == 200:
        data = json.loads(body)
        if isinstance(data, dict):
            return data
    return f"HTTP {status}: {body[:200]!r}"


def wait_alias_online(csc_url: str, alias: str, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
    """Poll ``GET /v1/resolve/{alias}`` until it answers 200; returns its JSON."""
    last: list[str] = ["no answer"]

    def online() -> dict[str, Any] | None:
        answer = _resolve_once(csc_url, alias)
        if isinstance(answer, dict):
            return answer
        last[0] = answer
        return None

    try:
        return wait_until(online, timeout, message=f"alias {alias!r} online")
    except TimeoutError:
        raise TimeoutError(
            f"alias {alias!r} not online at {csc_url} within {scaled(timeout):.1f}s "
            f"(last: {last[0]})"
        ) from None


async def async_wait_alias_online(
    csc_url: str, alias: str, timeout: float = READY_TIMEOUT
) -> dict[str, Any]:
    """:func:`wait_alias_online` for async tests (runs the polls in a worker thread)."""
    return await asyncio.to_thread(wait_alias_online, csc_url, alias, timeout)
