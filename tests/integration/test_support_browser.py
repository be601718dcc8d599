"""tests/support/browser: a real headless Chromium renders a loopback page, runs its script."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.support.browser import expect, headless_page

PAGE = """<!doctype html><title>t</title><p id=p>static</p>
<button id=again>again</button><input id=name><output id=echo></output>
<script>
const load = () => fetch('/data').then(r => r.text()).then(t => {
  document.getElementById('p').textContent = t; });
load();
document.getElementById('again').addEventListener('click', () => {
  document.getElementById('p').textContent = 'reloading'; load(); });
document.getElementById('name').addEventListener('input', (e) => {
  document.getElementById('echo').textContent = 'hello ' + e.target.value; });
</script>"""


async def test_page_renders_with_headers_and_script(tmp_path: Path) -> None:
    seen: list[str | None] = []
    loads = 0

    async def index(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.Response(text=PAGE, content_type="text/html")

    async def data(request: web.Request) -> web.Response:
        nonlocal loads
        loads += 1
        return web.Response(text=f"loaded by script {loads}")

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/data", data)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with headless_page() as page:
            await page.set_extra_http_headers({"Authorization": "Bearer t0k"})
            await page.goto(str(server.make_url("/")))
            await expect(page.locator("#p")).to_have_text("loaded by script 1")
            await page.click("#again")
            await expect(page.locator("#p")).to_have_text("loaded by script 2")
            await page.fill("#name", "csc")
            await expect(page.locator("#echo")).to_have_text("hello csc")
            shot = await page.screenshot(path=tmp_path / "page.png")
    finally:
        await server.close()
    assert seen == ["Bearer t0k"]
    assert shot.startswith(b"\x89PNG") and (tmp_path / "page.png").read_bytes() == shot
