"""The web console in a real headless Chromium, against a real CSC admin listener and a real
agent: the token form (a wrong token brings it back), the alias online with the tenant's
traffic charts, then offline once the agent leaves (live refresh: it stands out, says when it
was last seen, and the disconnect is among the recent events), the recent errors, and the stale
state when the API goes away (the node is no longer shown as serving). Screenshots are saved to
``$CSC_TEST_ARTIFACTS/console.png``, ``console-offline.png`` and ``console-stale.png`` (default
``build/test-artifacts/``)."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import aiohttp

from tests.support.admin import admin_token
from tests.support.browser import Page, headless_page
from tests.support.inproc import ALIAS, Relay, relay

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


def _alias_row(alias: str) -> str:
    return f"document.querySelector('#aliases tr[data-alias={json.dumps(alias)}]')"


def _badge_is(alias: str, state: str) -> str:
    online = "true" if state == "online" else "false"
    row = _alias_row(alias)
    return (
        f"{row}?.dataset.online === '{online}' && "
        f"{row}.querySelector('.badge').textContent === '{state}'"
    )


async def _sign_in(page: Page, token: str) -> None:
    await page.evaluate(
        "(() => { document.getElementById('token').value = "
        f"{json.dumps(token)}; document.getElementById('login-form').requestSubmit(); }})()"
    )


async def _error_rows(page: Page, code: str) -> list[str]:
    rows = await page.evaluate(
        f"[...document.querySelectorAll('#errors tr[data-error=\"{code}\"]')]"
        ".map((r) => r.innerText)"
    )
    return [str(r) for r in rows]


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
            await page.call("Page.enable")
            await page.call("Page.addScriptToEvaluateOnNewDocument", source=WATCH)
            await page.goto(f"http://{r.node.admin_address}/console/")
            await _refused_then_signed_in(page, admin_token(r.state_dir))
            await _live_view(page, unknown_id)
            await _traffic_charts(page, r, http)
            shot = await page.screenshot(artifacts_dir() / "console.png")
            await _agent_leaves(page, r, http)
            await page.screenshot(artifacts_dir() / "console-offline.png")
            await _api_goes_away(page, r)
            await page.screenshot(artifacts_dir() / "console-stale.png")
            assert await page.evaluate("window.__cspViolations") == []
            assert await page.evaluate("window.__pageErrors") == []
    width, height = _png_size(shot)
    assert 1000 <= width <= 4000 and 700 <= height <= 20000, (width, height)
    assert shot.stat().st_size > 20_000


async def _refused_then_signed_in(page: Page, token: str) -> None:
    await page.wait_for("!document.getElementById('login').hidden")
    assert await page.evaluate("document.getElementById('dashboard').hidden")
    await _sign_in(page, "not-an-operator-token")
    await page.wait_for(
        "!document.getElementById('login').hidden && "
        "document.getElementById('login-error').textContent.includes('refused')"
    )
    assert await page.evaluate("sessionStorage.getItem('csc-console-token')") is None
    assert await page.evaluate("document.getElementById('dashboard').hidden")
    await _sign_in(page, token)
    await page.wait_for("document.getElementById('status').dataset.state === 'live'")
    assert await page.evaluate("document.getElementById('login').hidden")
    assert await page.evaluate("sessionStorage.getItem('csc-console-token')") == token


async def _live_view(page: Page, unknown_id: str) -> None:
    await page.wait_for(_badge_is(ALIAS, "online"))
    [unknown] = await page.wait_for(
        "[...document.querySelectorAll('#errors tr[data-error=\"unknown_alias\"]')]"
        ".map((r) => r.innerText)"
    )
    assert unknown_id in unknown and "resolve" in unknown and "404" in unknown
    assert "no tenant serves the alias nobody@example.com" in unknown
    assert ISO_UTC.match(unknown), unknown  # the time as the API and the CLI write it
    counters = await page.evaluate(
        "Object.fromEntries([...document.querySelectorAll('#overview div')]"
        ".map((d) => [d.querySelector('dt').textContent, d.querySelector('dd').textContent]))"
    )
    assert counters["Node"] == "serving" and counters["Aliases online"] == "1 of 1"
    assert counters["Tenants"] == "1"
    # the relay fixture's own resolves while the agent was connecting count too
    assert int(counters["Errors recorded"]) >= 1 and int(counters["Sessions"]) >= 1
    tenant = await page.evaluate(
        "document.querySelector('#tenants tr[data-tenant=\"acme\"]').innerText"
    )
    assert "acme" in tenant and "active" in tenant and ALIAS in tenant
    sessions = await page.evaluate(
        "[...document.querySelectorAll('#sessions tr[data-session]')].map((r) => r.innerText)"
    )
    assert sessions and all("acme" in s and "127.0.0.1" in s for s in sessions)


async def _traffic_charts(page: Page, r: Relay, http: aiohttp.ClientSession) -> None:
    for path in ("small", "bytes/5000", "status/502"):
        async with http.get(f"{r.csc_url}/t/{ALIAS}/{path}") as resp:
            await resp.read()
    charts = await page.wait_for(
        "(() => { const row = document.querySelector('#traffic tr[data-traffic=\"acme\"]');"
        " if (!row) return null; const figs = [...row.querySelectorAll('figure')];"
        " const total = (i) => figs[i].querySelectorAll('svg rect').length;"
        " const text = figs.map((f) => f.querySelector('figcaption').textContent);"
        " return text.length === 3 && text[0] === 'requests 3' ? {text, bars: total(0)} : null;"
        " })()",
        timeout=10,
    )
    assert charts["text"][1] == "errors 1" and re.fullmatch(r"bytes \d\.\d KiB", charts["text"][2])
    assert charts["bars"] >= 1


async def _agent_leaves(page: Page, r: Relay, http: aiohttp.ClientSession) -> None:
    await r.stop_agent()
    await page.wait_for(_badge_is(ALIAS, "offline"), timeout=10)
    offline = await page.evaluate(
        f"(() => {{ const row = {_alias_row(ALIAS)}; return {{cls: row.className, "
        "cells: [...row.cells].map((c) => c.textContent), "
        "colour: getComputedStyle(row.querySelector('.badge')).backgroundColor}; })()"
    )
    assert offline["cls"] == "offline"
    assert ISO_UTC.fullmatch(offline["cells"][3]), offline  # "Last seen"
    assert offline["colour"] not in ("rgb(231, 233, 237)",), offline  # not the neutral grey
    gone = await page.wait_for(
        "[...document.querySelectorAll('#errors tr[data-error=\"agent_disconnected\"]')]"
        ".map((r) => r.innerText)",
        timeout=10,
    )
    assert all("acme" in g and "agent" in g and "down" in g for g in gone), gone
    async with http.get(f"{r.csc_url}/v1/resolve/{ALIAS}") as resp:
        assert resp.status == 503
    [offline] = await page.wait_for(
        "[...document.querySelectorAll('#errors tr[data-error=\"portal_offline\"]')]"
        ".map((r) => r.innerText)"
    )
    assert "acme" in offline and "503" in offline
    assert len(await _error_rows(page, "unknown_alias")) == 1


async def _api_goes_away(page: Page, r: Relay) -> None:
    listener, r.node.admin = r.node.admin, None
    assert listener is not None
    await listener.stop()
    stale = await page.wait_for(
        "document.getElementById('status').dataset.state === 'stale' && "
        "!document.getElementById('stale').hidden && "
        "document.getElementById('stale').textContent",
        timeout=10,
    )
    assert stale.startswith("Stale: the last refresh failed")
    assert "the CSC did not answer" in stale and "Failed to fetch" not in stale
    node = await page.evaluate("document.getElementById('count-node').textContent")
    assert node != "serving", node
    # the last data stays on screen, marked stale
    assert await page.evaluate("document.body.classList.contains('stale')")
    assert await page.evaluate(f"{_alias_row(ALIAS)} !== null")
