"""Headless Chromium for tests of the web pages, driven by Playwright.

:func:`headless_page` launches Debian's ``chromium`` through Playwright's Python API
(``executable_path``: Playwright's own browser downloads are never used) and yields one
Playwright :class:`~playwright.async_api.Page`: tests click, type, wait on selectors and
assert with ``expect`` as anywhere else. Its default timeouts (actions and ``expect``) are
scaled by ``CSC_TEST_TIMEOUT_FACTOR``.

Invariants: only what the test navigates to is contacted (loopback); the browser and
Playwright's driver are started and stopped by the context manager; nothing sleeps (Playwright
waits on conditions up to the deadline).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from playwright.async_api import Page, async_playwright, expect

from tests.support.procs import scaled

CHROMIUM_NAMES = ("chromium", "chromium-browser")
#: Seconds (scaled) an action or an ``expect`` may wait for its condition.
TIMEOUT = 15.0

__all__ = ["Page", "chromium_path", "expect", "headless_page"]


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


@asynccontextmanager
async def headless_page(width: int = 1280, height: int = 900) -> AsyncIterator[Page]:
    """A fresh headless Chromium with one blank page; closed (with its driver) on exit."""
    binary = chromium_path()
    timeout_ms = scaled(TIMEOUT) * 1000
    expect.set_options(timeout=timeout_ms)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=binary,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
            timeout=scaled(30) * 1000,
        )
        try:
            context = await browser.new_context(viewport={"width": width, "height": height})
            context.set_default_timeout(timeout_ms)
            yield await context.new_page()
        finally:
            await browser.close()
