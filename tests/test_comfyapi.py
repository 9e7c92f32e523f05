"""ComfyAPI's clients against the proxy (proxy.api.comfyapi), with both state stores: a client written from
ComfyAPI's README alone (register a socket, list, describe, queue with the cid and an image by URL, wait on
the socket for the result), image URLs refused for each reason, templates saved by the ComfyUI editor,
idle sockets closed, and every route scoped to its tenant."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import TenantConfig, WebhooksConfig, WorkflowsConfig
from proxy.uploads import tenant_dir
from tests.test_imagefetch import PNG, ImageServer, data_url, image

KEYS = {"acme": "acme-key", "other": "other-key"}
TENANTS = tuple(TenantConfig(name=name, api_keys=(key,)) for name, key in KEYS.items())
UIGRAPH = Path(__file__).parent / "data" / "uigraph"
CHECKPOINTS = tuple(json.loads((UIGRAPH / "recorded.json").read_text())["checkpoints"])   # the seed's dreamshaper_8
INVERT = {   # an image-to-image template: LoadImage's image is the input, by node id
    "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}, "_meta": {"title": "Load Image"}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": "inverted", "images": ["2", 0]}},
}


def templates(folder: Path) -> Path:
    """A folder with an API-format template and two editor (UI-format) graphs, one with reroutes, primitive
    nodes and a bypassed node (less the preview fed through a muted node, which ComfyUI would refuse)."""
    folder.mkdir()
    (folder / "invert.json").write_text(json.dumps(INVERT))
    shutil.copy(Path(__file__).parent.parent / "config" / "workflows" / "portrait.yaml", folder / "portrait.yaml")
    shutil.copy(UIGRAPH / "text_to_image.ui.json", folder / "text_to_image.json")
    shutil.copy(UIGRAPH / "seed_text_to_image.ui.json", folder / "seed_text_to_image.json")
    graph = json.loads((UIGRAPH / "reroutes_primitives_bypass.ui.json").read_text())
    graph["nodes"] = [n for n in graph["nodes"] if n["id"] != 19]
    (folder / "reroutes.json").write_text(json.dumps(graph))
    return folder


@pytest.fixture
async def farm(sims, proxies, tmp_path: Path):  # type: ignore[no-untyped-def]
    backends = [await sims(name, checkpoints=CHECKPOINTS) for name in ("gpu-a", "gpu-b")]
    server = await ImageServer().start()
    proxy = await proxies(backends, tenants=TENANTS, webhooks=WebhooksConfig(allow_private=True),
                          workflows=WorkflowsConfig(dir=str(templates(tmp_path / "workflows")), socket_idle_s=30.0,
                                                    image_max_mb=0.05, image_max_redirects=3,
                                                    image_allow_cidrs=("127.0.0.1/32",)))
    yield proxy, backends, server
    await server.stop()


class ComfyApiClient:
    """What ComfyAPI's README says a client does, and nothing more."""

    def __init__(self, base: str, key: str) -> None:
        self.base = base
        self.http = aiohttp.ClientSession(headers={"X-API-Key": key})
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._results: dict[str, dict[str, Any]] = {}   # results that came while another was awaited

    async def register(self, query: str = "") -> str:
        self.ws = await self.http.ws_connect(f"{self.base.replace('http', 'ws', 1)}/ws/register{query}")
        return str((await self.ws.receive_json(timeout=10))["websocket_cid"])

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.http.get(self.base + path) as resp:
            return resp.status, await resp.json()

    async def queue(self, workflow_id: str, cid: str, inputs: list[dict[str, Any]]) -> tuple[int, Any]:
        async with self.http.post(f"{self.base}/workflows/{workflow_id}/queue",
                                  json={"websocket_cid": cid, "inputs": inputs}) as resp:
            return resp.status, await resp.json()

    async def result(self, request_id: str) -> tuple[list[dict[str, Any]], dict[str, Any], list[bytes]]:
        """The socket's messages up to the run's result, the result, and the binary frames after it."""
        assert self.ws is not None
        seen: list[dict[str, Any]] = []
        async with asyncio.timeout(30):
            while request_id not in self._results:
                msg = await self.ws.receive()
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                body = json.loads(msg.data)
                if body.get("type") == "result":
                    self._results[body["request_id"]] = body
                else:
                    seen.append(body)
            body = self._results.pop(request_id)
            frames = []
            for _ in (o for o in body["outputs"] if o["kind"] == "images") if self._binary else ():
                header = await self.ws.receive_json()
                assert header["type"] == "image"
                frames.append(await self.ws.receive_bytes())
        return seen, body, frames

    _binary = False

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        await self.http.close()


@pytest.fixture
async def client(farm):  # type: ignore[no-untyped-def]
    made = ComfyApiClient(farm[0].url, KEYS["acme"])
    yield made
    await made.close()


def uploads_of(tmp_path: Path, tenant: str) -> list[Path]:
    folder = tmp_path / "file-store" / ".uploads" / tenant_dir(tenant) / "input"
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


async def test_a_client_from_comfyapis_readme_runs_unchanged(farm, client, tmp_path: Path) -> None:
    proxy, backends, server = farm
    client._binary = True
    cid = await client.register("?images=binary")
    status, ids = await client.get("/workflows/")
    assert status == 200 and ids == ["invert", "portrait", "reroutes", "seed_text_to_image", "text_to_image"]
    status, described = await client.get("/workflows/invert")
    assert status == 200 and described["workflow_id"] == "invert" and described["sink_ids"] == ["3"]
    image_input = next(i for i in described["inputs"] if i["type"] == "image")
    assert image_input["node_id"] == "1" and image_input["node_type"] == "LoadImage"
    assert [o["node_id"] for o in described["outputs"]] == ["3"] and described["outputs"][0]["produces"] == ["images"]

    status, queued = await client.queue("invert", cid, [{"node_id": "1", "value": server.url("/png")}])
    assert status == 200, queued
    seen, result, frames = await client.result(queued["request_id"])
    assert {"execution_start", "executing", "executed"} <= {m.get("type") for m in seen}
    assert {"type": "workflow_status", "request_id": queued["request_id"], "status": "completed"} in seen
    assert result["status"] == "completed" and result["error"] is None
    [output] = result["outputs"]
    assert output["node_id"] == "3" and output["link"].startswith(proxy.url)
    assert len(frames) == 1 and frames[0].startswith(b"\x89PNG")
    # It ran on one of the two backends, with the fetched image as its LoadImage input.
    ran = [b for b in backends if queued["prompt_id"] in b.sim.queue.history]
    assert len(ran) == 1
    loaded = ran[0].sim.queue.history[queued["prompt_id"]]["prompt"][2]["1"]["inputs"]["image"]
    assert (Path(ran[0].sim.paths.input) / loaded).read_bytes() == PNG
    # An ordinary prompt: in the tenant's history.
    async with client.http.get(f"{proxy.url}/history/{queued['prompt_id']}") as resp:
        assert queued["prompt_id"] in await resp.json()


async def test_image_urls_are_refused_for_each_reason_and_kept_once(farm, client, tmp_path: Path) -> None:
    proxy, backends, server = farm
    cid = await client.register()
    refused = {
        "http://10.0.0.7/cat.png": "private",
        "http://169.254.169.254/latest/meta-data": "link-local",
        server.url("/page"): "not an image",
        server.url("/big"): "larger than",
        server.url("/hop/10"): "redirects",
    }
    for url, why in refused.items():
        status, body = await client.queue("invert", cid, [{"node_id": "1", "value": url}])
        assert status == 400 and body["error"]["message"] == "Invalid image input", (url, body)
        assert why in body["error"]["details"] and body["detail"] == "Invalid image input", (url, body)
    pids = []
    for value in (server.url("/png"), server.url("/png"), data_url(PNG)):
        status, queued = await client.queue("invert", cid, [{"node_id": "1", "value": value}])
        assert status == 200, queued
        pids.append(queued["request_id"])
    for pid in pids:
        _, result, _ = await client.result(pid)
        assert result["status"] == "completed"
    assert [p.name for p in uploads_of(tmp_path, "acme")] == [f"url-{hashlib.sha256(PNG).hexdigest()[:16]}.png"]


async def test_workflows_saved_by_the_editor_convert_as_the_frontend_does_and_run(farm, client) -> None:
    cid = await client.register()
    for workflow_id, recorded in (("seed_text_to_image", "seed_text_to_image"), ("text_to_image", "text_to_image"),
                                  ("reroutes", "reroutes_primitives_bypass")):
        status, described = await client.get(f"/workflows/{workflow_id}")
        assert status == 200, described
        expected = json.loads((UIGRAPH / f"{recorded}.api.json").read_text())
        expected.pop("19", None)   # the preview fed through the muted node, left out of the template
        assert described["workflow_json"] == expected
        seed = next(i for i in described["inputs"] if i["node_id"] == "3" and i["input"] == "seed")
        assert seed["type"] == "int" and seed["min"] == 0
        status, queued = await client.queue(workflow_id, cid, [{"node_id": "3", "input": "seed", "value": 7}])
        assert status == 200, queued
        _, result, _ = await client.result(queued["request_id"])
        assert result["status"] == "completed" and result["outputs"], result


async def test_inputs_by_node_id_are_checked_against_object_info(farm, client) -> None:
    cid = await client.register()
    cases = [
        ([{"node_id": "3", "value": 7}], "several inputs"),                   # KSampler: name one
        ([{"node_id": "99", "value": 7}], "No node 99"),
        ([{"node_id": "3", "input": "steps", "value": 0}], "smaller than min"),
        ([{"node_id": "3", "input": "sampler_name", "value": "nope"}], "not in list"),
        ([{"node_id": "3", "input": "seed", "value": "7"}], "must be int"),
        ([{"node_id": "3", "input": "model", "value": 1}], "no widget input model"),
        ([{"value": 1}], "node_id and value"),
    ]
    for inputs, why in cases:
        status, body = await client.queue("text_to_image", cid, inputs)
        assert status == 400 and why in body["detail"], (inputs, body)
    status, body = await client.queue("text_to_image", cid, [{"node_id": "6", "value": "a red fox"}])
    assert status == 200, body   # a text node's single widget needs no input name
    # A template's marked input keeps its own range, addressed by name or by node id.
    for item in ({"node_id": "steps", "value": 500}, {"node_id": "3", "input": "steps", "value": 500}):
        status, body = await client.queue("portrait", cid, [item, {"node_id": "prompt", "value": "a fox"}])
        assert status == 400 and "bigger than max of 150" in body["detail"], (item, body)
    # JSON's NaN (which Python's parser takes) is no number a backend would run.
    raw = json.dumps({"websocket_cid": cid, "inputs": [{"node_id": "3", "input": "cfg", "value": float("nan")}]})
    async with client.http.post(f"{client.base}/workflows/text_to_image/queue", data=raw,
                                headers={"Content-Type": "application/json"}) as resp:
        body = json.loads(await resp.text())
        assert resp.status == 400 and body["error"]["extra_info"]["received_value"] == "nan", body


async def test_an_interrupted_run_gets_its_result_too(farm, client) -> None:
    proxy, _, _ = farm
    cid = await client.register()
    status, queued = await client.queue("seed_text_to_image", cid, [{"node_id": "3", "input": "steps",
                                                                      "value": 10000}])
    assert status == 200, queued
    assert client.ws is not None
    async with asyncio.timeout(15):   # it runs: the socket says so
        while (await client.ws.receive_json()).get("type") != "execution_start":
            pass
    async with client.http.post(f"{proxy.url}/interrupt", json={"prompt_id": queued["request_id"]}) as resp:
        assert resp.status == 200
    seen, result, _ = await client.result(queued["request_id"])
    assert result["status"] == "interrupted" and result["error"]["type"] == "execution_interrupted"
    assert {"type": "workflow_status", "request_id": queued["request_id"], "status": "interrupted"} in seen


async def test_an_idle_socket_is_closed_and_its_cid_refused(sims, proxies, tmp_path: Path) -> None:
    proxy = await proxies([await sims("gpu-a", checkpoints=CHECKPOINTS)], tenants=TENANTS,
                          workflows=WorkflowsConfig(dir=str(templates(tmp_path / "workflows")), socket_idle_s=0.5))
    client, busy = ComfyApiClient(proxy.url, KEYS["acme"]), ComfyApiClient(proxy.url, KEYS["acme"])
    try:
        cid = await client.register()
        assert client.ws is not None
        # Another socket of the same tenant keeps running things: that is not this socket's activity.
        busy_cid = await busy.register()
        for seed in range(3):
            status, queued = await busy.queue("text_to_image", busy_cid, [{"node_id": "3", "input": "seed",
                                                                           "value": seed}])
            assert status == 200, queued
        msg = await client.ws.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.extra == "idle"
        status, body = await client.queue("invert", cid, [{"node_id": "1", "value": data_url(PNG)}])
        assert status == 400 and body["detail"] == f"Connection {cid} not found"
    finally:
        await client.close()
        await busy.close()


async def test_cids_and_runs_belong_to_their_tenant(farm, client) -> None:
    proxy, _, _ = farm
    cid = await client.register()
    other = ComfyApiClient(proxy.url, KEYS["other"])
    try:
        status, body = await other.queue("invert", cid, [{"node_id": "1", "value": data_url(PNG)}])
        assert status == 400 and body["detail"] == f"Connection {cid} not found"
        own = await other.register()
        status, queued = await other.queue("invert", own, [{"node_id": "1", "value": data_url(image(seed=9))}])
        assert status == 200
        _, result, _ = await other.result(queued["request_id"])
        assert result["status"] == "completed"
        async with client.http.get(f"{proxy.url}/history/{queued['request_id']}") as resp:
            assert await resp.json() == {}          # acme does not see other's run
        async with aiohttp.ClientSession() as anonymous, anonymous.get(f"{proxy.url}/workflows/") as resp:
            assert resp.status == 401 and (await resp.json())["detail"]   # FastAPI's shape, before any handler
    finally:
        await other.close()


async def test_a_run_deleted_from_the_queue_gets_its_result(farm, client) -> None:
    """ComfyUI tells a deleted prompt's client nothing; a ComfyAPI client still hears its run ended."""
    proxy, _, _ = farm
    cid = await client.register()
    queued = []
    for seed in range(6):   # two backends of two slots each: the last two wait in the proxy's queue
        status, body = await client.queue("seed_text_to_image", cid, [
            {"node_id": "3", "input": "steps", "value": 10000}, {"node_id": "3", "input": "seed", "value": seed}])
        assert status == 200, body
        queued.append(body["request_id"])
    async with client.http.post(f"{proxy.url}/queue", json={"delete": [queued[-1]]}) as resp:
        assert resp.status == 200
    _, result, _ = await client.result(queued[-1])
    assert result["status"] == "interrupted" and result["error"]["type"] == "withdrawn"
    async with client.http.post(f"{proxy.url}/queue", json={"clear": True}) as resp:
        assert resp.status == 200
    for pid in queued[:4]:
        async with client.http.post(f"{proxy.url}/interrupt", json={"prompt_id": pid}) as resp:
            assert resp.status == 200
