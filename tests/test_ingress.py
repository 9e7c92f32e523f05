"""The proxy behind an operator's ingress: a real nginx serves it at `http://127.0.0.1:PORT/comfy/` with the
prefix stripped, and the web page, its websocket and its images work there in Chromium.

The nginx `location` an operator writes (`RECOMMENDED`) passes the websocket upgrade through and tells
the proxy which host the browser asked for (`X-Forwarded-Host`); ComfyUI's cross-site guard compares the
browser's `Origin` with that. Two other configs work too: nginx passing the browser's `Host` on, as
ComfyUI itself expects, or no forwarded header but `server.public_url` set. A foreign `Origin` is refused
with 403 through every one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.app import create_app
from proxy.cli import where
from proxy.config import BackendConfig, Config, SchedulerConfig, ServerConfig, StoreConfig
from tests import tools
from tests.cdp import Browser, chromium_binary
from tests.client import ComfyClient, start_proxy
from tests.conftest import TEARDOWN_S, free_port, listening
from tests.test_frontend import INSTALL_HINT, ROOT, TXT2IMG, check_farm_page, needs_chromium

NGINX = tools.find("nginx")
needs_nginx = tools.needs("nginx")
PREFIX = "/comfy"
# What an operator writes in front of the proxy: the prefix stripped (the `/` after the upstream), the
# websocket upgrade passed on (HTTP/1.1, Upgrade, Connection), and the address the browser used.
UPGRADE = """
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $connection_upgrade;
        proxy_read_timeout 1h;"""
RECOMMENDED = UPGRADE + """
        proxy_set_header X-Forwarded-Host $http_host;
        proxy_set_header X-Forwarded-Proto $scheme;"""
AS_COMFYUI_EXPECTS = UPGRADE + """
        proxy_set_header Host $http_host;"""
CONFIG = """
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
{user}
events {{ worker_connections 256; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 100m;
        location {prefix}/ {{
            proxy_pass http://127.0.0.1:{upstream}/;{location}
        }}
    }}
}}
"""


@dataclass
class Farm:
    """A proxy over simulated backends, reached through nginx at `url` (`http://127.0.0.1:PORT/comfy`)."""

    url: str
    origin: str
    proxy_url: str


def nginx_config(tmp: Path, *, port: int, upstream: int, location: str) -> str:
    # As root, nginx's workers would run as `nobody` and could not use the test's private temp folders.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    return CONFIG.format(tmp=tmp, user=user, port=port, upstream=upstream, prefix=PREFIX, location=location)


def nginx_argv(tmp: Path, config: str) -> list[str]:
    """nginx in the foreground with its own prefix folder, config and error log (none of the system's)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "nginx.conf").write_text(config)
    return [NGINX or "nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "error.log")]


def error_log(tmp: Path) -> str:
    return (tmp / "error.log").read_text() if (tmp / "error.log").exists() else ""


@contextlib.asynccontextmanager
async def nginx(argv: list[str], tmp: Path, port: int) -> AsyncIterator[None]:
    """nginx running `argv` until the block ends, once it listens on `port`."""
    process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.DEVNULL)
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while not await listening(port):
            assert process.returncode is None, f"nginx exited: {error_log(tmp)}"
            assert asyncio.get_running_loop().time() < deadline, f"nginx did not listen on {port}: {error_log(tmp)}"
            await asyncio.sleep(0.05)
        yield
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), TEARDOWN_S)


@pytest.fixture
async def farm_behind_nginx(sims: Any, store_config: StoreConfig, tmp_path: Path
                            ) -> AsyncIterator[Callable[..., Awaitable[Farm]]]:
    """`start(location=..., public_url=False)`: two simulated backends, a proxy (with `server.public_url`
    set to nginx's address when asked) and nginx in front of it with that `location` body."""
    async with contextlib.AsyncExitStack() as stack:
        async def start(*, location: str = RECOMMENDED, public_url: bool = False) -> Farm:
            alpha = await sims("alpha")
            beta = await sims("beta", checkpoints=("v1-5-pruned-emaonly.safetensors",))
            port = free_port()
            origin = f"http://127.0.0.1:{port}"
            config = Config(
                server=ServerConfig(public_url=f"{origin}{PREFIX}/" if public_url else None),
                backends=tuple(BackendConfig(name=b.name, url=b.url, max_inflight=2) for b in (alpha, beta)),
                store=store_config, scheduler=SchedulerConfig(poll_interval_s=0.2))
            proxy = await start_proxy(create_app(config))
            stack.push_async_callback(lambda: asyncio.wait_for(proxy.close(), TEARDOWN_S))
            upstream = int(proxy.url.rsplit(":", 1)[1])
            tmp = tmp_path / "nginx"
            argv = nginx_argv(tmp, nginx_config(tmp, port=port, upstream=upstream, location=location))
            await stack.enter_async_context(nginx(argv, tmp, port))
            return Farm(origin + PREFIX, origin, proxy.url)
        yield start


async def _prompt_status(farm: Farm, origin: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.post(farm.url + "/prompt", json={"prompt": TXT2IMG}, headers={"Origin": origin}) as r:
            return r.status


async def _ws_status(farm: Farm, origin: str) -> int:
    """The websocket handshake through nginx with this `Origin`: 101 when the proxy takes it."""
    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(farm.url.replace("http", "ws", 1) + "/ws?clientId=ingress",
                                          origin=origin) as ws:
                message = await ws.receive_json(timeout=10)
                assert message["type"] == "status"
                return 101
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


@needs_nginx
@needs_chromium
async def test_the_page_under_a_prefix_behind_nginx_queues_and_shows_the_image(farm_behind_nginx, tmp_path: Path
                                                                                 ) -> None:
    assert ROOT is not None, INSTALL_HINT
    farm = await farm_behind_nginx()
    browser = await Browser.start(chromium_binary() or "", tmp_path / "profile")
    try:
        await check_farm_page(browser, farm.url, {"sd_xl_base_1.0.safetensors", "v1-5-pruned-emaonly.safetensors"})
    finally:
        await browser.close()


@needs_nginx
@pytest.mark.parametrize("location, public_url", [(RECOMMENDED, False), (AS_COMFYUI_EXPECTS, False),
                                                  (UPGRADE, True)],
                         ids=["x-forwarded-host", "host-passed-on", "public-url"])
async def test_through_nginx_the_browser_origin_is_accepted_and_a_foreign_one_refused(
        farm_behind_nginx, location: str, public_url: bool) -> None:
    farm = await farm_behind_nginx(location=location, public_url=public_url)
    assert await _prompt_status(farm, farm.origin) == 200
    assert await _ws_status(farm, farm.origin) == 101
    for foreign in ("http://evil.example", f"http://127.0.0.1:{free_port()}", "http://localhost"):
        assert await _prompt_status(farm, foreign) == 403, foreign
        assert await _ws_status(farm, foreign) == 403, foreign


@pytest.mark.parametrize("origin, headers, expected", [
    ("http://127.0.0.1:{port}", {}, 200),                                    # the page's own origin
    ("http://127.0.0.1", {}, 200),                                           # no port: host names alone
    ("http://evil.example", {}, 403),
    ("http://127.0.0.1:1", {}, 403),
    ("null", {}, 403),
    ("http://evil.example", {"Host": "farm.example:8188"}, 200),             # ComfyUI checks loopback only
    ("http://evil.example", {"Host": "farm.example", "X-Forwarded-Host": "127.0.0.1:9"}, 403),
    ("http://127.0.0.1:9", {"X-Forwarded-Host": "127.0.0.1:9, 10.0.0.1"}, 200),   # the first, the browser's
    ("http://10.0.0.1", {"X-Forwarded-Host": "127.0.0.1:9, 10.0.0.1"}, 403),
], ids=["same", "no-port", "foreign", "other-port", "null", "not-loopback", "forwarded-loopback",
        "forwarded-first", "forwarded-later"])
async def test_the_origin_check_without_an_ingress(proxies, sims, origin: str, headers: dict[str, str],
                                                   expected: int) -> None:
    proxy = await proxies([await sims("alpha")])
    port = proxy.url.rsplit(":", 1)[1]
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/system_stats",
                               headers={"Origin": origin.format(port=port), **headers}) as r:
            assert r.status == expected


@needs_nginx
async def test_an_ingress_that_names_no_host_leaves_the_page_refused(farm_behind_nginx) -> None:
    """Without a forwarded host and without `server.public_url`, the proxy sees only nginx's upstream
    address as its host, so it cannot tell the page's own origin from a foreign one: it refuses both,
    as ComfyUI would."""
    farm = await farm_behind_nginx(location=UPGRADE)
    assert await _prompt_status(farm, farm.origin) == 403
    async with ComfyClient(farm.url) as client:   # a client without an Origin is no browser page
        assert (await client.get("/queue"))[0] == 200


@needs_nginx
async def test_with_a_public_url_the_proxy_names_itself_by_it(farm_behind_nginx, proxies, sims) -> None:
    """`server.public_url` is the address the proxy hands out: the OpenAPI document's server, and the
    start-up lines of `comfy-proxy serve`. Without it the document names no server (OpenAPI's default:
    its own host), and the proxy builds no other absolute URL: answers carry paths only."""
    farm = await farm_behind_nginx(location=UPGRADE, public_url=True)
    async with ComfyClient(farm.url) as client:
        status, doc = await client.get("/proxy/openapi.json")
        assert status == 200 and doc["servers"] == [{"url": farm.url}]
    async with ComfyClient(doc["servers"][0]["url"]) as client:
        assert (await client.get("/queue"))[0] == 200
    assert where(ServerConfig(public_url=farm.url + "/")) == [
        f"  web page     {farm.url}/",
        f"  ComfyUI API  {farm.url}/prompt, /history, /view, ... (also under /api), "
        f"websocket {farm.url.replace('http', 'ws', 1)}/ws",
        f"  metrics      {farm.url}/metrics",
        f"  backends     {farm.url}/proxy/backends"]
    plain = await proxies([await sims("gamma")])
    async with ComfyClient(plain.url) as client:
        assert "servers" not in (await client.get("/proxy/openapi.json"))[1]
