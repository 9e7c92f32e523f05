"""The operator page (`/proxy/`) in headless Chromium: backends and the queue are shown, and a drain
clicked on the page takes effect in the farm; a screenshot of it is kept with the test's output."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import aiohttp

from proxy.config import TenantConfig
from tests import tools
from tests.cdp import Browser, chromium_binary
from tests.client import ComfyClient, txt2img
from tests.conftest import wait_until

TENANTS = (TenantConfig(name="ops", api_keys=("ops-key",), role="admin"),
           TenantConfig(name="alice", api_keys=("alice-key",)))
SCREENSHOT = Path(__file__).resolve().parent.parent / "test-output" / "operator-page.png"   # git ignores it


async def test_the_page_is_a_shell_and_its_tables_are_for_admins(sims, proxies) -> None:
    proxy = await proxies([await sims("alpha")], tenants=TENANTS)
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/proxy/") as resp:   # open: a browser sends no key on navigation
            page = await resp.text()
            assert resp.status == 200 and resp.content_type == "text/html" and "alpha" not in page
            assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
        async with session.get(proxy.url + "/proxy/ui/farm") as resp:
            assert resp.status == 401
        async with session.get(proxy.url + "/proxy/ui/farm", headers={"X-API-Key": "alice-key"}) as resp:
            assert resp.status == 403
        async with session.get(proxy.url + "/proxy/ui/farm", headers={"X-API-Key": "ops-key"}) as resp:
            assert resp.status == 200 and 'data-backend="alpha"' in await resp.text()


@tools.needs("chromium", "chromium-browser")
async def test_the_operator_page_shows_the_farm_and_drains_from_a_click(sims, proxies, tmp_path: Path) -> None:
    alpha, beta = await sims("alpha", step_ms=50), await sims("beta", step_ms=50)
    proxy = await proxies([alpha, beta], tenants=TENANTS)
    async with ComfyClient(proxy.url, headers={"X-API-Key": "alice-key"}) as alice, \
            ComfyClient(proxy.url, headers={"X-API-Key": "ops-key"}) as ops:
        for seed in range(6):   # four slots: two wait in the proxy's queue
            await alice.queue_prompt(txt2img(seed=seed, steps=400))
        browser = await Browser.start(chromium_binary() or "", tmp_path / "profile")
        try:
            page = await browser.new_page()
            await page.send("Page.navigate", url=f"{proxy.url}/proxy/#key=ops-key")
            await page.wait_for("document.querySelectorAll('#backends tbody tr').length === 2", 30, "both backends")
            await page.wait_for("[...document.querySelectorAll('#queue td')].some(td => td.textContent === 'alice')"
                                " && [...document.querySelectorAll('#jobs td')].some(td => td.textContent === "
                                "'in_progress')", 30, "alice's queue and a running job")
            assert await page.evaluate("location.hash") == ""   # the key left the address bar
            await page.evaluate("document.querySelector('button[data-action=drain][data-name=beta]').click()")
            await page.wait_for("document.querySelector('tr[data-backend=beta] .state').textContent === 'draining'",
                                30, "beta shown draining")

            async def drained() -> bool:
                _, body = await ops.get("/proxy/backends")
                return {b["name"]: b["draining"] for b in body["backends"]} == {"alpha": False, "beta": True}
            await wait_until(drained, what="the drain clicked on the page")
            shot = await page.send("Page.captureScreenshot", format="png")
            SCREENSHOT.parent.mkdir(exist_ok=True)
            SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))
            print(f"screenshot: {SCREENSHOT}")
            rows = json.loads(await page.evaluate(
                "JSON.stringify([...document.querySelectorAll('#backends tbody tr')].map(r => r.dataset.backend))"))
            assert rows == ["alpha", "beta"]
            assert not page.console_errors, page.console_errors
        finally:
            await browser.close()
