"""Run-and-wait (`POST /proxy/run`, and `wait_s` on template runs): the finished job with signed links
(and inlined bytes), or 202 with a `Location` to follow. Both state stores; with Redis, the prompt's end
may be settled by the other replica."""

from __future__ import annotations

import base64
from typing import Any

import aiohttp

from tests.client import ComfyClient, txt2img


def files_of(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [item for ui in job["outputs"].values() for item in ui.get("images", [])]


async def test_run_waits_for_the_job_and_hands_out_links(sims, proxies, store_kind) -> None:
    backend = await sims("alpha", step_ms=5)
    first = await proxies([backend])
    front = await proxies([backend]) if store_kind == "redis" else first   # the end may cross the bus
    async with ComfyClient(front.url) as client, aiohttp.ClientSession() as plain:
        status, job = await client.post("/proxy/run", {"prompt": txt2img(seed=3), "wait_s": 30})
        assert status == 200 and job["status"] == "completed"
        assert set(job) >= {"id", "outputs", "execution_status", "workflow", "outputs_count"}
        [image] = files_of(job)
        view = await client.get_bytes("/view", filename=image["filename"], subfolder=image["subfolder"],
                                      type=image["type"])
        assert view[0] == 200
        async with plain.get(image["link"]) as resp:   # no key needed
            assert (resp.status, await resp.read()) == (200, view[1])
        assert "data" not in image
        status, inlined = await client.post("/proxy/run?inline=1", {"prompt": txt2img(seed=4), "wait_s": 30})
        [image] = files_of(inlined)
        assert base64.b64decode(image["data"]) == (await client.get_bytes(
            "/view", filename=image["filename"], subfolder=image["subfolder"], type=image["type"]))[1]


async def test_a_job_not_done_in_time_answers_202_with_where_to_follow_it(sims, proxies) -> None:
    proxy = await proxies([await sims("alpha", step_ms=20)])
    async with ComfyClient(proxy.url) as client:
        async with client.session.post(proxy.url + "/proxy/run",   # type: ignore[union-attr]
                                       json={"prompt": txt2img(seed=5, steps=200), "wait_s": 0.2}) as resp:
            assert resp.status == 202
            body = await resp.json()
            location = resp.headers["Location"]
        assert location == f"/api/jobs/{body['id']}" and body["status"] in ("pending", "in_progress")
        status, job = await client.get(location)
        assert status == 200 and job["id"] == body["id"]
        for bad in (-1, 301, "10", True, None):
            status, answer = await client.post("/proxy/run", {"prompt": txt2img(seed=6), "wait_s": bad})
            assert status == 400 and answer["error"]["type"] == "invalid_prompt", bad
        status, answer = await client.post("/proxy/run", {"prompt": {"1": {"class_type": "Nope", "inputs": {}}}})
        assert status == 400 and answer["node_errors"] is not None   # ComfyUI's own refusal, unchanged
