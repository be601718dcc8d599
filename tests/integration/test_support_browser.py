"""tests/support/browser: a real headless Chromium renders a loopback page, runs its script."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.support.browser import headless_page

PAGE = """<!doctype html><title>t</title><p id=p>static</p>
<script>fetch('/data').then(r => r.text()).then(t => { document.getElementById('p').textContent = t; });
</script>"""


async def test_page_renders_with_headers_and_script(tmp_path: Path) -> None:
    seen: list[str | None] = []

    async def index(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.Response(text=PAGE, content_type="text/html")

    async def data(request: web.Request) -> web.Response:
        return web.Response(text="loaded by script")

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/data", data)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with headless_page() as page:
            await page.goto(str(server.make_url("/")), headers={"Authorization": "Bearer t0k"})
            text = await page.wait_for(
                "document.getElementById('p')?.textContent === 'loaded by script' && document.body.innerText"
            )
            shot = await page.screenshot(tmp_path / "page.png")
    finally:
        await server.close()
    assert "loaded by script" in text
    assert seen == ["Bearer t0k"]
    assert shot.read_bytes().startswith(b"\x89PNG")
