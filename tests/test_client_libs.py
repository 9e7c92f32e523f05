"""Two ComfyUI client libraries from PyPI, unchanged, through their own documented flows against the proxy
in front of two simulated backends (both stores): upload → prompt → websocket wait → history → view.

- comfy-api-simplified (`ComfyApiWrapper`, `ComfyWorkflowWrapper`; README and examples/send_input_image.py):
  requests for HTTP, `websockets` for the wait. Traps it sets for a server: it opens the websocket only
  *after* POST /prompt and stops at the first `status` with `queue_remaining == 0` — the greeting
  included — then reads /history at once; it uploads into the subfolder `default_upload_folder`; it takes
  any binary frame as a result image. Sync (it calls `asyncio.run`), so it runs in a thread here.
- ComfyKit (`ComfyKit(...).execute(file, params)`; README "Option 2: Local ComfyUI"): node titles carry its
  DSL (`$~image!` uploads a local file for LoadImage, `$output.name` names an output); the websocket
  executor collects `executed` outputs, the http executor polls /history once a second; results are
  `/view` URLs. Its import calls `logging.basicConfig(force=True)`.

Prompts are pinned to each backend in turn with the proxy's drain route, so both libraries' uploads are
used by a backend that never received them from the client."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.real.comfy_flows import load_chain, png, titled

SUBFOLDER = "default_upload_folder"  # comfy-api-simplified's default


IMG2IMG = load_chain("placeholder.png", prefix="libs")


@pytest.fixture
async def farm(sims: Callable[..., Awaitable[Any]], proxies: Callable[..., Awaitable[Any]]) -> Any:
    backends = [await sims("gpu-a", previews=False), await sims("gpu-b", previews=False)]
    proxy = await proxies(backends)
    proxy.backend_names = [b.name for b in backends]
    return proxy


@contextlib.asynccontextmanager
async def pinned(proxy: Any, backend: str) -> AsyncIterator[None]:
    """Only `backend` takes prompts while inside: the others are drained (the operator's route)."""
    others = [name for name in proxy.backend_names if name != backend]
    async with aiohttp.ClientSession() as s:
        for name in others:
            async with s.post(f"{proxy.url}/proxy/backends/{name}/drain") as r:
                assert r.status == 200
        try:
            yield
        finally:
            for name in others:
                async with s.post(f"{proxy.url}/proxy/backends/{name}/undrain") as r:
                    assert r.status == 200


async def view(url: str) -> bytes:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200, url
        return await r.read()


async def test_comfy_api_simplified_documented_flow(farm: Any, tmp_path: Path) -> None:
    from comfy_api_simplified import ComfyApiWrapper, ComfyWorkflowWrapper

    workflow_file = tmp_path / "workflow_api_input_image.json"
    workflow_file.write_text(json.dumps(titled(IMG2IMG, {"1": "input_image", "2": "invert", "3": "scale",
                                                         "4": "output_image"})))
    input_file = tmp_path / "input_image.png"
    input_file.write_bytes(png(40, 30, seed=3))

    def send_input_image() -> tuple[dict[str, Any], dict[str, bytes]]:
        # examples/send_input_image.py, with the proxy's address
        api = ComfyApiWrapper(farm.url + "/")
        wf = ComfyWorkflowWrapper(str(workflow_file))
        image_metadata = api.upload_image(str(input_file))
        wf.set_node_param("input_image", "image", f"{image_metadata['subfolder']}/{image_metadata['name']}")
        return image_metadata, api.queue_and_wait_images(wf, "output_image")

    for backend in farm.backend_names:
        async with pinned(farm, backend):
            metadata, results = await asyncio.wait_for(asyncio.to_thread(send_input_image), 30)
        assert metadata == {"name": "input_image.png", "subfolder": SUBFOLDER, "type": "input"}
        [(filename, data)] = results.items()
        assert filename.startswith("libs_") and "~" in filename  # the proxy's file reference
        assert data.startswith(b"\x89PNG")


async def test_comfykit_websocket_and_http_executors(farm: Any, tmp_path: Path) -> None:
    from comfykit import ComfyKit

    workflow_file = tmp_path / "img2img.json"
    workflow_file.write_text(json.dumps(titled(IMG2IMG, {"1": "Load Image, $~image!", "2": "Invert",
                                                         "3": "Scale, $width, $height", "4": "$output.result"})))
    input_file = tmp_path / "photo.png"
    input_file.write_bytes(png(40, 30, seed=5))

    for executor_type, backend in zip(("websocket", "http"), farm.backend_names, strict=True):
        async with pinned(farm, backend):
            # README, "Execute workflow" (its `kit.close()` fails on the local executors, which have no
            # close(); they open a session per request, so nothing is left open without it)
            kit = ComfyKit(comfyui_url=farm.url, executor_type=executor_type)
            params = {"image": str(input_file), "width": 20}
            result = await asyncio.wait_for(kit.execute(str(workflow_file), params), 30)
        assert result.status == "completed", (executor_type, result.msg)
        assert list(result.images_by_var) == ["result"] and len(result.images) == 1
        url = result.images[0]
        assert url.startswith(f"{farm.url}/view?filename=libs_") and "~" in url
        assert (await view(url)).startswith(b"\x89PNG")
        assert result.outputs is not None and result.prompt_id is not None
