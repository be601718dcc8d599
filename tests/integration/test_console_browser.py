"""The web console in a real headless Chromium, against a real CSC admin listener and a real
agent: the token form (a wrong token brings it back), the alias online with the tenant's
traffic charts, then offline once the agent leaves (live refresh: it stands out, says when it
was last seen, and the disconnect is among the recent events), the recent errors, and the stale
state when the API goes away (the node is no longer shown as serving). Screenshots are saved to
``$CSC_TEST_ARTIFACTS/console.png``, ``console-offline.png`` and ``console-stale.png`` (default
``build/test-artifacts/``)."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import aiohttp
from playwright.async_api import Locator

from tests.support.admin import admin_token
from tests.support.browser import Page, expect, headless_page
from tests.support.inproc import ALIAS, Relay, relay
from tests.support.procs import scaled

ROOT = Path(__file__).resolve().parents[2]
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")

#: runs before the page's own script: records CSP violations and uncaught errors
WATCH = """
window.__cspViolations = [];
window.__pageErrors = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__cspViolations.push(e.violatedDirective + " " + e.blockedURI));
window.addEventListener("error", (e) => window.__pageErrors.push(String(e.message)));
window.addEventListener("unhandledrejection", (e) => window.__pageErrors.push(String(e.reason)));
"""


def artifacts_dir() -> Path:
    configured = os.environ.get("CSC_TEST_ARTIFACTS")
    return Path(configured) if configured else ROOT / "build" / "test-artifacts"


def _ms(seconds: float) -> float:
    """A Playwright timeout (milliseconds) for ``seconds``, scaled."""
    return scaled(seconds) * 1000


def _alias_row(page: Page, alias: str) -> Locator:
    return page.locator(f'#aliases tr[data-alias="{alias}"]')


def _error_rows(page: Page, code: str) -> Locator:
    return page.locator(f'#errors tr[data-error="{code}"]')


async def _expect_badge(page: Page, alias: str, state: str, timeout: float = 15.0) -> Locator:
    row = _alias_row(page, alias)
    online = "true" if state == "online" else "false"
    await expect(row).to_have_attribute("data-online", online, timeout=_ms(timeout))
    await expect(row.locator(".badge")).to_have_text(state, timeout=_ms(timeout))
    return row


async def _sign_in(page: Page, token: str) -> None:
    await page.fill("#token", token)
    await page.click("#login-form button[type=submit]")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def test_console_in_headless_chromium(tmp_path: Path) -> None:
    async with relay(tmp_path) as r, aiohttp.ClientSession() as http:
        async with http.get(f"{r.csc_url}/v1/resolve/nobody@example.com") as resp:
            assert resp.status == 404
            unknown_id = resp.headers["X-Request-Id"]
        async with headless_page() as page:
            await page.add_init_script(WATCH)
            await page.goto(f"http://{r.node.admin_address}/console/")
            await _refused_then_signed_in(page, admin_token(r.state_dir))
            await _live_view(page, unknown_id)
            await _traffic_charts(page, r, http)
            shot = artifacts_dir() / "console.png"
            await page.screenshot(path=shot, full_page=True)
            await _agent_leaves(page, r, http)
            await page.screenshot(path=artifacts_dir() / "console-offline.png", full_page=True)
            await _api_goes_away(page, r)
            await page.screenshot(path=artifacts_dir() / "console-stale.png", full_page=True)
            assert await page.evaluate("window.__cspViolations") == []
            assert await page.evaluate("window.__pageErrors") == []
    width, height = _png_size(shot)
    assert 1000 <= width <= 4000 and 700 <= height <= 20000, (width, height)
    assert shot.stat().st_size > 20_000


async def _refused_then_signed_in(page: Page, token: str) -> None:
    await expect(page.locator("#login")).to_be_visible()
    await expect(page.locator("#dashboard")).to_be_hidden()
    await _sign_in(page, "not-an-operator-token")
    await expect(page.locator("#login-error")).to_contain_text("refused")
    await expect(page.locator("#login")).to_be_visible()
    assert await page.evaluate("sessionStorage.getItem('csc-console-token')") is None
    await expect(page.locator("#dashboard")).to_be_hidden()
    await _sign_in(page, token)
    await expect(page.locator("#status")).to_have_attribute("data-state", "live")
    await expect(page.locator("#login")).to_be_hidden()
    assert await page.evaluate("sessionStorage.getItem('csc-console-token')") == token


async def _live_view(page: Page, unknown_id: str) -> None:
    await _expect_badge(page, ALIAS, "online")
    unknown_rows = _error_rows(page, "unknown_alias")
    await expect(unknown_rows).to_have_count(1)
    unknown = await unknown_rows.inner_text()
    assert unknown_id in unknown and "resolve" in unknown and "404" in unknown
    assert "no tenant serves the alias nobody@example.com" in unknown
    assert ISO_UTC.match(unknown), unknown  # the time as the API and the CLI write it
    overview = page.locator("#overview div")
    counters = dict(
        zip(
            await overview.locator("dt").all_text_contents(),
            await overview.locator("dd").all_text_contents(),
            strict=True,
        )
    )
    assert counters["Node"] == "serving" and counters["Aliases online"] == "1 of 1"
    assert counters["Tenants"] == "1"
    # the relay fixture's own resolves while the agent was connecting count too
    assert int(counters["Errors recorded"]) >= 1 and int(counters["Sessions"]) >= 1
    tenant = await page.locator('#tenants tr[data-tenant="acme"]').inner_text()
    assert "acme" in tenant and "active" in tenant and ALIAS in tenant
    sessions = await page.locator("#sessions tr[data-session]").all_inner_texts()
    assert sessions and all("acme" in s and "127.0.0.1" in s for s in sessions)


async def _traffic_charts(page: Page, r: Relay, http: aiohttp.ClientSession) -> None:
    for path in ("small", "bytes/5000", "status/502"):
        async with http.get(f"{r.csc_url}/t/{ALIAS}/{path}") as resp:
            await resp.read()
    figures = page.locator('#traffic tr[data-traffic="acme"] figure')
    captions = figures.locator("figcaption")
    await expect(captions).to_have_count(3, timeout=_ms(10))
    await expect(captions.first).to_have_text("requests 3", timeout=_ms(10))
    text = await captions.all_text_contents()
    assert text[1] == "errors 1" and re.fullmatch(r"bytes \d\.\d KiB", text[2]), text
    assert await figures.first.locator("svg rect").count() >= 1


async def _agent_leaves(page: Page, r: Relay, http: aiohttp.ClientSession) -> None:
    await r.stop_agent()
    row = await _expect_badge(page, ALIAS, "offline", timeout=10)
    await expect(row).to_have_class("offline")
    cells = await row.evaluate("(row) => [...row.cells].map((c) => c.textContent)")
    assert ISO_UTC.fullmatch(cells[3]), cells  # "Last seen"
    badge = row.locator(".badge")
    colour = await badge.evaluate("(b) => getComputedStyle(b).backgroundColor")
    assert colour not in ("rgb(231, 233, 237)",), colour  # not the neutral grey
    disconnects = _error_rows(page, "agent_disconnected")
    await expect(disconnects.first).to_be_attached(timeout=_ms(10))
    gone = await disconnects.all_inner_texts()
    assert all("acme" in g and "agent" in g and "down" in g for g in gone), gone
    async with http.get(f"{r.csc_url}/v1/resolve/{ALIAS}") as resp:
        assert resp.status == 503
    offline_rows = _error_rows(page, "portal_offline")
    await expect(offline_rows).to_have_count(1)
    offline = await offline_rows.inner_text()
    assert "acme" in offline and "503" in offline
    await expect(_error_rows(page, "unknown_alias")).to_have_count(1)


async def _api_goes_away(page: Page, r: Relay) -> None:
    listener, r.node.admin = r.node.admin, None
    assert listener is not None
    await listener.stop()
    await expect(page.locator("#status")).to_have_attribute("data-state", "stale", timeout=_ms(10))
    stale = page.locator("#stale")
    await expect(stale).to_be_visible()
    await expect(stale).to_have_text(re.compile(r"^Stale: the last refresh failed"))
    text = await stale.text_content() or ""
    assert "the CSC did not answer" in text and "Failed to fetch" not in text
    await expect(page.locator("#count-node")).not_to_have_text("serving")
    # the last data stays on screen, marked stale
    await expect(page.locator("body")).to_have_class(re.compile(r"\bstale\b"))
    await expect(_alias_row(page, ALIAS)).to_have_count(1)
