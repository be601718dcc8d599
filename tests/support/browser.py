"""Headless Chromium driven over the DevTools protocol, for tests of the web console.

:class:`Browser` starts Debian's ``chromium`` (a real process, its own profile directory,
``--remote-debugging-port=0``), reads the port it chose from ``DevToolsActivePort`` and talks
to one page over the DevTools WebSocket with the ``websockets`` client already in the
project: set extra request headers (the operator's bearer token), navigate, evaluate
JavaScript until a condition holds, and save a screenshot.

Invariants: only loopback is ever contacted; the process is ended by PID when the context
exits; no fixed ports and no sleeps (every wait polls up to a deadline).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.support.procs import scaled

CHROMIUM_NAMES = ("chromium", "chromium-browser")


def chromium_path() -> str:
    """Path of the Chromium binary; skips the test locally and fails it under ``CI=true``."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    reason = "chromium is not installed (make test installs Debian's chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


class BrowserError(RuntimeError):
    """The browser did something the test did not expect."""


class Page:
    """One page target over its DevTools WebSocket."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its ``result`` (events in between are ignored)."""
        ident = next(self._ids)
        await self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(await self._ws.recv())
            if message.get("id") != ident:
                continue
            if "error" in message:
                raise BrowserError(f"{method}: {message['error']}")
            result: dict[str, Any] = message.get("result", {})
            return result

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaiting a promise)."""
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def goto(self, url: str, *, headers: dict[str, str] | None = None) -> None:
        await self.call("Network.enable")
        if headers:
            await self.call("Network.setExtraHTTPHeaders", headers=headers)
        await self.call("Page.enable")
        await self.call("Page.navigate", url=url)

    async def wait_for(self, expression: str, timeout: float = 15.0) -> Any:
        """Poll ``expression`` until it is truthy; its last value is in the failure message."""
        deadline = time.monotonic() + scaled(timeout)
        value: Any = None
        while time.monotonic() < deadline:
            try:
                value = await self.evaluate(expression)
            except BrowserError as exc:  # the page may be between documents
                value = exc
            else:
                if value:
                    return value
            await asyncio.sleep(0.1)
        raise BrowserError(f"timed out waiting for {expression!r}; last value {value!r}")

    async def text(self) -> str:
        return str(await self.evaluate("document.body ? document.body.innerText : ''"))

    async def screenshot(self, path: Path) -> Path:
        result = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(result["data"]))
        return path


def _devtools_port(profile: Path, proc: subprocess.Popen[bytes], timeout: float) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrowserError(f"chromium exited with {proc.returncode} before it was ready")
        try:
            first = marker.read_text().splitlines()[0]
            return int(first)
        except (FileNotFoundError, IndexError, ValueError):
            time.sleep(0.05)
    raise BrowserError("chromium did not open its DevTools port in time")


def _page_websocket(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
        targets = json.load(answer)
    for target in targets:
        if target.get("type") == "page":
            return str(target["webSocketDebuggerUrl"])
    raise BrowserError(f"no page target among {targets!r}")


@asynccontextmanager
async def headless_page(width: int = 1280, height: int = 900) -> AsyncIterator[Page]:
    """A fresh headless Chromium with one blank page, stopped (by PID) on exit."""
    binary = chromium_path()
    with tempfile.TemporaryDirectory(prefix="csc-chromium-") as tmp:
        profile = Path(tmp)
        args = [
            binary,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port = await asyncio.to_thread(_devtools_port, profile, proc, scaled(30))
            url = await asyncio.to_thread(_page_websocket, port)
            async with connect(url, max_size=64 * 1024 * 1024) as ws:
                yield Page(ws)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
