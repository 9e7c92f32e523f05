"""The official web frontend (`comfyui-frontend-package`) and ComfyUI's workflow templates
(`comfyui-workflow-templates`) through the proxy, as ComfyUI serves them; and in headless Chromium: the
page loads from the proxy's URL, lists the farm's nodes, opens the first-run templates dialog with the
package's templates, queues a prompt and shows the output image fetched through the proxy's `/view`.

Both packages are base dependencies, so their absence fails these tests; only a missing Chromium skips.
`check_farm_page` is the browser scenario, shared with tests/test_ingress.py (the page behind nginx)."""

from __future__ import annotations

import asyncio
import json
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
from comfyui_workflow_templates import get_asset_path

from proxy.comfy.frontend import INSTALL_HINT, REQUIRED_VERSION, ROUTER_BASE, mended_scripts, web_root
from tests import tools
from tests.cdp import Browser, Page, chromium_binary
from tests.client import ComfyClient, txt2img
from tests.conftest import free_port, wait_until

ROOT = web_root()
needs_chromium = tools.needs("chromium", "chromium-browser")
# What ComfyUI itself answers 404 at startup: index.html links a user.css that the package lacks, a user
# without user.css/saved workflows/templates file, no favicon.
EXPECTED_404 = ("/user.css", "/favicon.ico", "/api/userdata/user.css", "/api/userdata",
                "/api/userdata/comfy.templates.json")
TXT2IMG = txt2img(seed=7, steps=3, ckpt="sd_xl_base_1.0.safetensors")
SHOWN_IMAGE = """(() => {
  const node = app.graph.nodes.find(n => n.type === "SaveImage");
  const img = node && node.imgs && node.imgs[0];
  return img && img.complete && img.naturalWidth > 0 ? img.src : null;
})()"""
# The cards of the templates dialog (1.32.9 marks each `data-testid="template-workflow-<name>"`): name, text.
TEMPLATE_CARDS = """Array.from(document.querySelectorAll('.p-dialog [data-testid^="template-workflow-"]'))
  .map(card => [card.dataset.testid.slice("template-workflow-".length), card.textContent])"""
FIRST_SCREEN_CARDS = 12   # the dialog renders cards a screenful at a time (24 first at 1280x900)


def template_bytes(template_id: str, filename: str) -> bytes:
    """An asset of ComfyUI's templates package, found with the package's own lookup (`index.json` belongs to
    the template `index`)."""
    return Path(get_asset_path(template_id, filename)).read_bytes()


def template_titles() -> dict[str, str]:
    """Template name → title, as the package's `index.json` lists them."""
    index = json.loads(template_bytes("index", "index.json"))
    return {t["name"]: t["title"] for category in index for t in category["templates"]}


def test_the_pinned_frontend_is_installed() -> None:
    """`pip install .` installs the version ComfyUI 0.3.75 pins; the page tests below need it."""
    assert ROOT is not None, INSTALL_HINT
    assert version("comfyui-frontend-package") == REQUIRED_VERSION


async def test_page_and_assets_are_served_as_comfyui_serves_them(sims, proxies) -> None:
    sim = await sims("alpha")
    proxy = await proxies([sim])
    assert ROOT is not None, INSTALL_HINT
    assert len(mended_scripts(ROOT)) == 1, "the pinned frontend's router-base bug is where ROUTER_BASE says"
    mended = mended_scripts(ROOT)
    script = next(p for p in (ROOT / "assets").iterdir() if p.suffix == ".js" and f"/assets/{p.name}" not in mended)
    icon = next(p for p in (ROOT / "assets").rglob("*.png"))
    async with aiohttp.ClientSession() as session:
        for base in (sim.url, proxy.url):
            async with session.get(base + "/") as r:
                assert r.status == 200 and r.content_type == "text/html"
                assert (r.headers["Cache-Control"], r.headers["Pragma"], r.headers["Expires"]) == ("no-cache",
                                                                                                    "no-cache", "0")
                assert await r.read() == (ROOT / "index.html").read_bytes()
            async with session.get(f"{base}/assets/{script.name}") as r:
                assert (r.status, r.headers["Cache-Control"]) == (200, "no-cache")
                assert await r.read() == script.read_bytes()
            async with session.get(f"{base}/{icon.relative_to(ROOT).as_posix()}") as r:
                assert (r.status, r.headers["Cache-Control"]) == (200, "public, max-age=86400")
            for path, body in mended.items():
                async with session.get(base + path) as r:
                    assert (r.status, r.headers["Cache-Control"]) == (200, "no-cache")
                    if base == sim.url:   # ComfyUI serves the package's bytes
                        assert await r.read() == (ROOT / path[1:]).read_bytes()
                        continue
                    # the proxy: the entry script with upstream's fix of the router base
                    assert r.content_type == "text/javascript"
                    assert await r.read() == body == (ROOT / path[1:]).read_bytes().replace(*ROUTER_BASE)
                    etag = r.headers["ETag"]
                async with session.get(base + path, headers={"If-None-Match": etag}) as r:
                    assert (r.status, r.headers["ETag"]) == (304, etag)
            async with session.get(base + "/assets/nope.js") as r:
                assert r.status == 404
            async with session.get(base + "/api/") as r:  # ComfyUI's `/` has its /api twin too
                assert r.status == 200 and r.content_type == "text/html"
            async with session.get(base + "/extensions/core/groupNode.js") as r:
                assert r.status == 200 and await r.read() == (ROOT / "extensions/core/groupNode.js").read_bytes()
        # The proxy's own routes added after the frontend's static folder still answer.
        async with session.get(proxy.url + "/metrics") as r:
            assert r.status == 200


async def test_workflow_templates_are_served_as_comfyui_serves_them(sims, proxies) -> None:
    """`/templates/<asset>`: exactly the names the package's manifest lists, as static files (the page
    reads `index.json` only when its content type is JSON); anything else 404; no `/api` twin."""
    sim = await sims("alpha")
    proxy = await proxies([sim])
    index = template_bytes("index", "index.json")
    first = json.loads(index)[0]["templates"][0]
    thumbnail = f"{first['name']}-1.{first['mediaSubtype']}"
    unlisted = "..%2F__init__.py"   # a file of the media package beside the assets, listed by no template
    async with aiohttp.ClientSession() as session:
        for base in (sim.url, proxy.url):
            async with session.get(base + "/templates/index.json") as r:
                assert (r.status, r.content_type, r.headers["Cache-Control"]) == (200, "application/json", "no-cache")
                assert await r.read() == index
            async with session.get(f"{base}/templates/{thumbnail}") as r:
                assert (r.status, r.headers["Cache-Control"]) == (200, "public, max-age=86400")
                assert await r.read() == template_bytes(first["name"], thumbnail)
            for path in ("/templates/nope.webp", "/templates/", f"/templates/{unlisted}",
                         "/api/templates/index.json"):
                async with session.get(base + path) as r:
                    assert r.status == 404, (base, path)


async def test_the_demo_says_where_the_page_api_and_operator_routes_are() -> None:
    """`pip install .` then `comfy-proxy demo`: its start-up lines name the page, the API, `/metrics` and
    `/proxy/backends`, each answering there, and the page and its workflow templates are ComfyUI's."""
    assert ROOT is not None, INSTALL_HINT
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("comfy-proxy")), "--log-level", "warning", "demo", "--port", str(port),
        "--backends", "1", "--step-ms", "5", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    try:
        lines = [(await asyncio.wait_for(proc.stdout.readline(), 30)).decode().rstrip() for _ in range(6)]
        base = f"http://127.0.0.1:{port}"
        assert lines[1] == f"comfy-proxy demo ready: {base} (Ctrl-C stops everything)", lines
        named = {line.split()[0]: line.split()[-1] for line in lines[2:] if line.startswith("  ")}
        assert named == {"web": f"{base}/", "ComfyUI": f"ws://127.0.0.1:{port}/ws", "metrics": f"{base}/metrics",
                         "backends": f"{base}/proxy/backends"}, lines
        assert f"{base}/prompt" in lines[3]
        async with aiohttp.ClientSession() as session:
            for url in (named["web"], f"{base}/prompt", named["metrics"], named["backends"]):
                async with session.get(url) as r:
                    assert r.status == 200, url
            async with session.get(named["web"]) as r:
                assert await r.read() == (ROOT / "index.html").read_bytes()
            index = template_bytes("index", "index.json")

            async def templates_served() -> bool:  # from the backend, once the proxy has polled it
                async with session.get(f"{base}/templates/index.json") as r:
                    return (r.status, r.content_type, await r.read()) == (200, "application/json", index)
            await wait_until(templates_served, 10, "the demo to serve ComfyUI's workflow templates")
            async with session.ws_connect(named["ComfyUI"] + "?clientId=demo") as ws:
                assert (await ws.receive_json(timeout=10))["type"] == "status"
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_without_the_package_the_page_says_how_to_get_it(sims, proxies, monkeypatch) -> None:
    monkeypatch.setattr("proxy.api.web_root", lambda: None)  # as if comfyui-frontend-package were absent
    proxy = await proxies([await sims("alpha")])
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/") as r:
            assert (r.status, await r.text()) == (404, INSTALL_HINT)
            assert f"pip install comfyui-frontend-package=={REQUIRED_VERSION}" in INSTALL_HINT
        async with session.get(proxy.url + "/api/object_info") as r:
            assert r.status == 200  # the API is whole without the page


async def open_page(browser: Browser, url: str) -> Page:
    """A new tab on `url` (the page's address, ending in `/`), once the farm's nodes have reached it."""
    page = await browser.new_page()
    await page.send("Page.navigate", url=url)
    # object_info reached the page: the farm's node classes are registered with their model lists.
    try:
        await page.wait_for("window.app && app.graph && window.LiteGraph && LiteGraph.registered_node_types.KSampler",
                            60, "the frontend to register the farm's nodes")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; failed: {failed(page, url.rstrip('/'))} {page.failures}; "
                             f"errors: {page.console_errors}") from None
    return page


def failed(page: Page, base: str) -> list[str]:
    """Answers of 400 and above from `base`, less those ComfyUI itself gives (EXPECTED_404, paths below
    `base`)."""
    prefix = urlsplit(base).path
    return [f"{r.status} {r.url}" for r in page.responses
            if r.url.startswith(base) and r.status >= 400
            and not (r.status == 404 and urlsplit(r.url).path.removeprefix(prefix) in EXPECTED_404)]


async def check_farm_page(browser: Browser, base: str, checkpoints: set[str]) -> None:
    """The page at `base + "/"` as a new user meets it: it lists the farm's `checkpoints` (the merged
    object_info), opens the templates dialog with ComfyUI's templates, queues the default txt2img workflow,
    and the SaveImage node shows the output image, fetched from `base + "/api/view"` with the bytes `/view`
    serves; no request to `base` failed, no script error."""
    page = await open_page(browser, base + "/")
    # A first run (the user's `Comfy.TutorialCompleted` setting unset, nothing in the browser's storage) gets
    # a blank graph and the templates dialog, whose cards come from `base + "/templates/index.json"`.
    cards = await page.wait_for(f"(cards => cards.length >= {FIRST_SCREEN_CARDS} && cards)({TEMPLATE_CARDS})",
                                30, "the first-run dialog to list the templates")
    titles = template_titles()
    assert all(name in titles and titles[name] in text for name, text in cards), cards
    index = [r for r in page.responses if r.url == base + "/templates/index.json"]
    assert index and index[0].status == 200 and index[0].mime_type == "application/json"
    ckpts = await page.evaluate(
        "LiteGraph.registered_node_types.CheckpointLoaderSimple.nodeData.input.required.ckpt_name[0]")
    assert checkpoints <= set(ckpts)
    await page.evaluate(f"app.loadApiJson({json.dumps(TXT2IMG)}, 'farm.json')")
    await page.evaluate("app.queuePrompt(0, 1)")
    # The canvas draws (and so fetches) a node's image only when the node is in view.
    await page.evaluate("app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    src = await page.wait_for(SHOWN_IMAGE, 30, "the SaveImage node to show its output")
    assert src.startswith(base + "/api/view?"), src
    name = parse_qs(urlsplit(src).query)["filename"][0]
    assert name.startswith("ComfyUI_00001_~") and name.endswith(".png")  # the proxy's file reference
    fetched = [r for r in page.responses if r.url == src]
    assert fetched and fetched[0].status == 200 and fetched[0].mime_type == "image/png"
    body = await page.body(fetched[0])
    async with ComfyClient(base) as client:
        history: dict[str, Any] = (await client.get("/history"))[1]
        assert (await client.get("/settings/Comfy.TutorialCompleted"))[1] is True  # the dialog was shown once
        (entry,) = history.values()
        assert entry["status"]["status_str"] == "success"
        assert entry["outputs"]["9"]["images"][0]["filename"] == name
        status, direct = await client.get_bytes("/view", filename=name, type="output", subfolder="")
    assert status == 200 and body == direct and body.startswith(b"\x89PNG")
    assert failed(page, base) == []
    assert [url for url in page.failures if url.startswith(base)] == []
    assert page.console_errors == []


@needs_chromium
async def test_frontend_in_chromium_lists_nodes_queues_and_shows_the_image(sims, proxies, tmp_path: Path) -> None:
    assert ROOT is not None, INSTALL_HINT
    alpha, beta = await sims("alpha"), await sims("beta", checkpoints=("v1-5-pruned-emaonly.safetensors",))
    proxy = await proxies([alpha, beta])
    browser = await Browser.start(chromium_binary() or "", tmp_path / "profile")
    try:
        # Both backends' model files are in the page's combo: the merged object_info.
        await check_farm_page(browser, proxy.url, {"sd_xl_base_1.0.safetensors", "v1-5-pruned-emaonly.safetensors"})
    finally:
        await browser.close()
