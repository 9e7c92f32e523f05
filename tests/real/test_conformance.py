"""Conformance against REAL ComfyUI 0.3.75: the same client flows run directly against a real backend and
through the proxy in front of two of them, and what a client observes must agree — the message sequence
of a prompt, its history entry, `/view` bytes, upload use on either backend, validation error bodies,
`/queue` items and interrupts. Only what legitimately differs is normalised (comfy_flows.normalized).

Prompts are pinned to one backend with the proxy's own drain route, so that a direct run and a proxied
run are compared on the same machine state (ComfyUI caches node outputs across prompts)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.sim import SimOptions, start_sim
from tests.client import ComfyClient, Frame
from tests.conftest import wait_until
from tests.real.comfy_flows import (
    RUN_TIMEOUT_S,
    assert_same,
    fresh_color,
    get_bytes,
    image_chain,
    load_chain,
    message_types,
    normalized,
    normalized_history,
    output_files,
    pinned,
    png,
    png_pixels,
    run_prompt,
    slow_chain,
    titled,
)
from tests.real.conftest import Farm
from tests.real.harness import Process


def backend_of(farm: Farm, which: str) -> tuple[Process, list[str]]:
    backend = farm.a if which == "a" else farm.b
    return backend, [name for name in farm.backends if name != backend.name]


@pytest.mark.parametrize("output", ["SaveImage", "PreviewImage"])
@pytest.mark.parametrize("which", ["a", "b"])
async def test_message_sequence_and_history_match_a_direct_run(farm: Farm, which: str, output: str) -> None:
    backend, others = backend_of(farm, which)
    # Each prompt runs twice in a row: the second time ComfyUI's cache (the last prompt's outputs) has
    # every node, so the second run is all `execution_cached`.
    direct_graph, proxied_graph = (image_chain(fresh_color(), output=output) for _ in range(2))
    direct = [await run_prompt(backend.url, direct_graph) for _ in range(2)]
    async with pinned(farm.proxy.url, backend.name, others):
        proxied = [await run_prompt(farm.proxy.url, proxied_graph) for _ in range(2)]
    async with aiohttp.ClientSession() as s:
        for got, want in zip(proxied, direct, strict=True):
            assert_same(normalized(got.frames), normalized(want.frames), "the message sequence")
            assert_same(normalized_history(got.history), normalized_history(want.history), "the history entry")
            assert got.history["prompt"][2] == proxied_graph  # the client's own graph
            [shown], [real] = output_files(got.history), output_files(want.history)
            assert "~" in shown["filename"]  # a file reference, by design
            got_file, want_file = (await get_bytes(s, farm.proxy.url + "/view", **shown),
                                   await get_bytes(s, backend.url + "/view", **real))
            assert (got_file[0], got_file[2]) == (want_file[0], want_file[2]) == (200, "image/png")
            assert png_pixels(got_file[1])[0] == png_pixels(want_file[1])[0]  # same size and format
    cached = next(f for f in proxied[1].frames if isinstance(f, dict) and f["type"] == "execution_cached")
    assert sorted(cached["data"]["nodes"]) == ["1", "2", "3"]


async def test_prompt_answer_and_a_client_chosen_prompt_id(farm: Farm) -> None:
    answers = []
    async with aiohttp.ClientSession() as s:
        for base in (farm.a.url, farm.proxy.url):
            chosen = str(uuid.uuid4())
            body = {"prompt": image_chain(fresh_color(), output="PreviewImage"), "prompt_id": chosen}
            async with s.post(base + "/prompt", json=body) as r:
                answer = await r.json()
            assert r.status == 200 and answer["prompt_id"] == chosen
            answers.append([(key, type(value).__name__) for key, value in answer.items()])
            async with ComfyClient(base) as client:  # wait for it: later tests want an idle farm
                async def done(chosen: str = chosen) -> bool:
                    return chosen in (await client.get(f"/history/{chosen}"))[1]
                await wait_until(done, RUN_TIMEOUT_S, "the prompt's history entry")
    assert answers[1] == answers[0] == [("prompt_id", "str"), ("number", "int"), ("node_errors", "dict")]


async def test_history_listing_and_prompt_answer_match(farm: Farm) -> None:
    backend, others = backend_of(farm, "a")
    async with aiohttp.ClientSession() as s:
        answers = []
        for base in (backend.url, farm.proxy.url):
            async with pinned(farm.proxy.url, backend.name, others):
                run = await run_prompt(base, image_chain(fresh_color()))
            async with s.get(base + "/history", params={"max_items": "50"}) as r:
                listing = await r.json()
            assert listing[run.prompt_id] == run.history  # the listing holds the same entry
            async with s.get(base + "/prompt") as r:
                answers.append((r.status, await r.json()))
    assert answers[0] == answers[1] == (200, {"exec_info": {"queue_remaining": 0}})


async def test_view_serves_the_same_bytes_for_the_same_workflow(farm: Farm) -> None:
    graph = image_chain(fresh_color(), prefix="view")
    direct = await run_prompt(farm.a.url, graph)
    file = output_files(direct.history)[0]
    async with aiohttp.ClientSession() as s:
        status, want, content_type = await get_bytes(s, farm.a.url + "/view", **file)
        assert status == 200 and want.startswith(b"\x89PNG")
        for which in ("a", "b"):  # cached on a, run afresh on b: the same file either way
            backend, others = backend_of(farm, which)
            async with pinned(farm.proxy.url, backend.name, others):
                proxied = await run_prompt(farm.proxy.url, graph)
            shown = output_files(proxied.history)[0]
            assert (await get_bytes(s, farm.proxy.url + "/view", **shown)) == (200, want, content_type), which
            # The seed documents' form: file name and type only
            got = await get_bytes(s, farm.proxy.url + "/view", filename=shown["filename"], type="output")
            assert got == (200, want, content_type)


# Template package files the page reads (the index, a thumbnail, a preview sound, a workflow), names it does
# not list, a file beside the assets, and the `/api` form that ComfyUI does not route.
TEMPLATE_PATHS = ("/templates/index.json", "/templates/index.fr.json", "/templates/default-1.webp",
                  "/templates/audio_stable_audio_example-1.mp3", "/templates/default.json", "/templates/nope.webp",
                  "/templates/nope.json", "/templates/", "/templates/..%2F__init__.py", "/api/templates/index.json")


async def test_workflow_templates_are_served_the_same_direct_through_the_proxy_and_by_the_simulator(
        farm: Farm) -> None:
    sim = await start_sim(SimOptions(name="sim", port=0))
    try:
        async with aiohttp.ClientSession() as s:
            for path in TEMPLATE_PATHS:
                answers = []
                for base in (farm.a.url, farm.proxy.url, sim.url):
                    async with s.get(base + path) as r:
                        answers.append((r.status, await r.read(), r.headers.get("Content-Type"),
                                        r.headers.get("Cache-Control")))
                direct, proxied, simulated = answers
                assert simulated == direct, path
                if direct[0] == 200:
                    assert proxied == direct, path
                else:  # the proxy's own 404, without ComfyUI's body
                    assert proxied[0] == direct[0], path
    finally:
        await sim.close()


async def upload(session: aiohttp.ClientSession, base: str, name: str, data: bytes,
                 **fields: str) -> tuple[int, Any]:
    form = aiohttp.FormData()
    for key, value in fields.items():
        form.add_field(key, value)
    form.add_field("image", data, filename=name, content_type="image/png")
    async with session.post(base + "/upload/image", data=form) as r:
        return r.status, await r.json()


async def test_an_upload_through_the_proxy_is_used_on_either_backend(farm: Farm) -> None:
    name, data = f"conf-{uuid.uuid4().hex[:8]}.png", png(40, 30, seed=fresh_color() % 251)
    async with aiohttp.ClientSession() as s:
        direct_answer = await upload(s, farm.a.url, name, data)
        assert await upload(s, farm.proxy.url, name, data) == direct_answer == (
            200, {"name": name, "subfolder": "", "type": "input"})
        for base in (farm.a.url, farm.proxy.url):
            assert await get_bytes(s, base + "/view", filename=name, type="input") == (200, data, "image/png")

        direct = await run_prompt(farm.a.url, load_chain(name))
        assert direct.history["status"]["status_str"] == "success"
        want = png_pixels((await get_bytes(s, farm.a.url + "/view", **output_files(direct.history)[0]))[1])
        for which in ("a", "b"):  # b never received an upload from the client
            backend, others = backend_of(farm, which)
            async with pinned(farm.proxy.url, backend.name, others):
                proxied = await run_prompt(farm.proxy.url, load_chain(name))
            assert_same(normalized(proxied.frames), normalized(direct.frames), f"the message sequence on {which}")
            assert_same(normalized_history(proxied.history), normalized_history(direct.history),
                        f"the history entry on {which}")
            assert proxied.history["prompt"][2] == load_chain(name)  # the client's own graph
            status, got, _ = await get_bytes(s, farm.proxy.url + "/view", **output_files(proxied.history)[0])
            assert status == 200 and png_pixels(got) == want, which

        # ComfyUI's naming: the same bytes keep the name, other bytes under a taken name get " (1)"
        other = png(40, 30, seed=(fresh_color() % 251) + 1)
        for base in (farm.a.url, farm.proxy.url):
            assert await upload(s, base, name, data) == (200, {"name": name, "subfolder": "", "type": "input"})
            renamed = name.replace(".png", " (1).png")
            assert await upload(s, base, name, other) == (200, {"name": renamed, "subfolder": "", "type": "input"})
            assert await upload(s, base, name, other, subfolder="sub", overwrite="true") == (
                200, {"name": name, "subfolder": "sub", "type": "input"})


BAD_PROMPTS: dict[str, Any] = {
    "unknown_class": {"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}},
    "missing_input": {"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"width": 64}},
                                 "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x",
                                                                             "images": ["1", 0]}}}},
    "bad_link": {"prompt": {"2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x",
                                                                        "images": ["99", 0]}}}},
    "out_of_range": {"prompt": {"1": {"class_type": "EmptyImage",
                                      "inputs": {"width": 0, "height": 64, "batch_size": 1, "color": 0}},
                                "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x",
                                                                            "images": ["1", 0]}}}},
    "no_output": {"prompt": {"1": {"class_type": "EmptyImage",
                                   "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}}},
    "no_prompt": {"client_id": "x"},
    "wrong_type": {"prompt": {"1": {"class_type": "EmptyImage",
                                    "inputs": {"width": "wide", "height": 8, "batch_size": 1, "color": 0}},
                              "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x",
                                                                          "images": ["1", 0]}}}},
    "value_not_in_list": {"prompt": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bogus", "width": 8,
                                                     "height": 8, "crop": "disabled"}},
        "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["2", 0]}}}},
    "missing_checkpoint": {"prompt": {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "nowhere.safetensors"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
        "4": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["2", 0]}}}},
    "load_missing_image": {"prompt": {
        "1": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["1", 0]}}}},
    "blur_radius_too_big": {"prompt": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 99, "sigma": 1.0}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}},
}


BAD_PROMPTS["body_is_a_list"] = [1]


def comparable_errors(body: Any) -> Any:
    """An error body with what cannot be equal made equal: a traceback names the files of the process
    that raised it (ComfyUI's own, or the proxy's validator), and ComfyUI lists one node's errors in
    the order of a `set` of input names (execution.validate_inputs), which follows the process's string
    hashing — two real ComfyUIs disagree with each other there. Errors are compared sorted."""
    if isinstance(body, dict):
        out = {k: ("TB" if k == "traceback" and isinstance(v, list) and v else comparable_errors(v))
               for k, v in body.items()}
        if isinstance(out.get("errors"), list):
            out["errors"] = sorted(out["errors"], key=lambda e: json.dumps(e, sort_keys=True))
        return out
    return [comparable_errors(x) for x in body] if isinstance(body, list) else body


@pytest.mark.parametrize("case", sorted(BAD_PROMPTS))
async def test_validation_error_bodies_are_equal(farm: Farm, case: str) -> None:
    async with aiohttp.ClientSession() as s:
        answers = []
        for base in (farm.a.url, farm.proxy.url):
            async with s.post(base + "/prompt", json=BAD_PROMPTS[case]) as r:
                answers.append((r.status, r.content_type, await r.text()))
    assert answers[0][0] == 400, answers[0]
    assert answers[1][:2] == answers[0][:2]
    assert_same(comparable_errors(json.loads(answers[1][2])), comparable_errors(json.loads(answers[0][2])),
                "the error body")


MALFORMED = {"invalid_json": b"{not json", "prompt_is_a_list": b'{"prompt": ["1"]}',
             "prompt_is_a_string": b'{"prompt": "x"}'}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_malformed_bodies_get_400_where_comfyui_fails_with_500(farm: Farm, case: str) -> None:
    """ComfyUI answers these bodies with a bare 500 (an exception in its handler); the proxy answers 400 in
    ComfyUI's error shape (README, "How a prompt flows", says so for invalid JSON)."""
    async with aiohttp.ClientSession() as s:
        async with s.post(farm.a.url + "/prompt", data=MALFORMED[case]) as r:
            assert (r.status, r.content_type) == (500, "text/plain")
        async with s.post(farm.proxy.url + "/prompt", data=MALFORMED[case]) as r:
            body = await r.json()
            assert r.status == 400 and list(body) == ["error", "node_errors"] and body["node_errors"] == {}
            assert list(body["error"]) == ["type", "message", "details", "extra_info"]
            assert body["error"]["type"] == "invalid_prompt"


def item_shape(item: list[Any]) -> list[Any]:
    """A /queue item `[number, prompt_id, prompt, extra_data, outputs_to_execute]` as types and keys."""
    return [type(x).__name__ for x in item] + [sorted(item[3])]


async def queue_of(session: aiohttp.ClientSession, base: str) -> dict[str, list[list[Any]]]:
    async with session.get(base + "/queue") as r:
        assert r.status == 200
        return dict(await r.json())


async def post_json(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, str]:
    async with session.post(url, json=body) as r:
        return r.status, await r.text()


async def test_queue_items_delete_and_clear_as_comfyui(farm: Farm) -> None:
    async with aiohttp.ClientSession() as s, ComfyClient(farm.a.url) as direct, \
            ComfyClient(farm.proxy.url) as proxied:
        # Directly: three slow prompts on one backend, one running and two pending.
        await direct.connect()
        graphs = [slow_chain(fresh_color()) for _ in range(3)]
        ids = [await direct.queue_prompt(g) for g in graphs]
        await direct.wait_for(lambda f: f.type == "execution_start", RUN_TIMEOUT_S)
        want = await queue_of(s, farm.a.url)
        assert [i[1] for i in want["queue_running"]] == ids[:1]
        assert [i[1] for i in want["queue_pending"]] == ids[1:]
        shape = item_shape(want["queue_running"][0])
        assert want["queue_running"][0][2] == graphs[0] and want["queue_running"][0][4] == ["99"]
        delete_answer = await post_json(s, farm.a.url + "/queue", {"delete": [ids[2]]})
        clear_answer = await post_json(s, farm.a.url + "/queue", {"clear": True})
        interrupt_answer = await post_json(s, farm.a.url + "/interrupt", {})
        await direct.wait_done(ids[0], RUN_TIMEOUT_S)

        # Through the proxy: six slow prompts on two backends with two slots each.
        await proxied.connect()
        graphs = [slow_chain(fresh_color()) for _ in range(6)]
        ids = [await proxied.queue_prompt(g) for g in graphs]
        # one running on each backend
        await proxied.wait_for(lambda f: len(proxied.messages_of_type("execution_start")) == 2, RUN_TIMEOUT_S)
        got = await queue_of(s, farm.proxy.url)
        running = [i[1] for i in got["queue_running"]]
        pending = [i[1] for i in got["queue_pending"]]
        assert sorted(running + pending) == sorted(ids)
        assert set(running) == {m["data"]["prompt_id"] for m in proxied.messages_of_type("execution_start")}
        assert pending == [i for i in ids if i not in running]  # in queue order
        for item in got["queue_running"] + got["queue_pending"]:
            assert item_shape(item) == shape
            assert item[2] == graphs[ids.index(item[1])] and item[4] == ["99"]
            assert item[3]["client_id"] == proxied.client_id
        assert [i[0] for i in got["queue_pending"]] == sorted(i[0] for i in got["queue_pending"])

        assert await post_json(s, farm.proxy.url + "/queue", {"delete": [pending[-1]]}) == delete_answer
        assert pending[-1] not in str(await queue_of(s, farm.proxy.url))
        assert await post_json(s, farm.proxy.url + "/queue", {"clear": True}) == clear_answer
        assert await post_json(s, farm.proxy.url + "/interrupt", {}) == interrupt_answer
        for prompt_id in running:
            await proxied.wait_done(prompt_id, RUN_TIMEOUT_S)
        assert await queue_of(s, farm.proxy.url) == {"queue_running": [], "queue_pending": []}
        for prompt_id in pending:  # never ran anywhere
            assert not [m for m in proxied.messages_of(prompt_id) if m["type"] == "execution_start"]
            for backend in (farm.a, farm.b):
                async with s.get(f"{backend.url}/history/{prompt_id}") as r:
                    assert await r.json() == {}


def executing(prompt_id: str, node: str) -> Callable[[Frame], bool]:
    """The frame that says `node` of `prompt_id` has started (an interrupt then hits an ImageBlur)."""
    return lambda f: (f.text is not None and f.text["type"] == "executing"
                      and f.text["data"].get("prompt_id") == prompt_id and f.text["data"].get("node") == node)


def interrupted_view(messages: list[dict[str, Any]], history: dict[str, Any]) -> dict[str, Any]:
    """What an interrupt looks like to a client (the prompt's own messages and history entry), whatever
    node it hit."""
    interrupted = next(m["data"] for m in messages if m["type"] == "execution_interrupted")
    return {
        "tail": message_types(messages)[-2:],
        "interrupted_keys": list(interrupted),
        "node_type": interrupted["node_type"],
        "history": {"status_str": history["status"]["status_str"], "completed": history["status"]["completed"],
                    "messages": [m[0] for m in history["status"]["messages"]], "outputs": history["outputs"]},
    }


async def test_interrupt_by_prompt_id_ends_exactly_that_prompt(farm: Farm) -> None:
    async with aiohttp.ClientSession() as s:
        # Directly
        async with ComfyClient(farm.a.url) as direct:
            await direct.connect()
            target = await direct.queue_prompt(slow_chain(fresh_color()))
            await direct.wait_for(executing(target, "2"), RUN_TIMEOUT_S)
            answer = await post_json(s, farm.a.url + "/interrupt", {"prompt_id": target})
            await direct.wait_done(target, RUN_TIMEOUT_S)
            want = interrupted_view(direct.messages_of(target), (await direct.get(f"/history/{target}"))[1][target])

        # Through the proxy: one prompt on each backend, interrupt one of them
        async with ComfyClient(farm.proxy.url) as proxied:
            await proxied.connect()
            started: list[str] = []
            for which, blurs in (("a", 8), ("b", 3)):
                backend, others = backend_of(farm, which)
                async with pinned(farm.proxy.url, backend.name, others):
                    started.append(await proxied.queue_prompt(slow_chain(fresh_color(), blurs)))
                    await proxied.wait_for(executing(started[-1], "2"), RUN_TIMEOUT_S)
            target, bystander = started
            assert await post_json(s, farm.proxy.url + "/interrupt", {"prompt_id": target}) == answer
            await proxied.wait_done(target, RUN_TIMEOUT_S)
            got = interrupted_view(proxied.messages_of(target), (await proxied.get(f"/history/{target}"))[1][target])
            assert got == want
            await proxied.wait_done(bystander, RUN_TIMEOUT_S)
            assert "execution_interrupted" not in message_types(proxied.messages_of(bystander))
            _, history = await proxied.get(f"/history/{bystander}")
            assert history[bystander]["status"]["status_str"] == "success"
            interrupted = proxied.messages_of_type("execution_interrupted")
            assert [m["data"]["prompt_id"] for m in interrupted] == [target]


async def test_interrupt_without_prompt_id_stops_what_runs(farm: Farm) -> None:
    """ComfyUI's bare /interrupt stops the prompt that runs on that server; the farm's, through the proxy,
    stops every running prompt of the caller (here: the only tenant), wherever it runs, and nothing that
    waits."""
    async with aiohttp.ClientSession() as s:
        async with ComfyClient(farm.a.url) as direct:
            await direct.connect()
            target = await direct.queue_prompt(slow_chain(fresh_color()))
            await direct.wait_for(executing(target, "2"), RUN_TIMEOUT_S)
            answer = await post_json(s, farm.a.url + "/interrupt", {})
            await direct.wait_done(target, RUN_TIMEOUT_S)
            want = interrupted_view(direct.messages_of(target), (await direct.get(f"/history/{target}"))[1][target])

        async with ComfyClient(farm.proxy.url) as proxied:
            await proxied.connect()
            running: list[str] = []
            for which in ("a", "b"):
                backend, others = backend_of(farm, which)
                async with pinned(farm.proxy.url, backend.name, others):
                    running.append(await proxied.queue_prompt(slow_chain(fresh_color())))
                    await proxied.wait_for(executing(running[-1], "2"), RUN_TIMEOUT_S)
            assert await post_json(s, farm.proxy.url + "/interrupt", {}) == answer
            for prompt_id in running:
                await proxied.wait_done(prompt_id, RUN_TIMEOUT_S)
                got = interrupted_view(proxied.messages_of(prompt_id),
                                       (await proxied.get(f"/history/{prompt_id}"))[1][prompt_id])
                assert got == want


async def flush_cache(backend: Process) -> None:
    """ComfyUI keeps the outputs of the last prompt only: one other prompt makes the next run uncached."""
    run = await run_prompt(backend.url, image_chain(fresh_color(), prefix="flush"))
    assert run.history["status"]["status_str"] == "success"


async def test_a_run_that_fails_on_the_backend_reads_the_same(farm: Farm) -> None:
    """A prompt that passes validation and fails at run time (the trace run_error.json: SaveImage refuses a
    path outside the output folder): the execution_error message, traceback included, and the history
    entry agree. Both runs on one backend with the same graph, so paths and tensors in it are equal."""
    graph = image_chain(fresh_color(), prefix="../outside")
    backend, others = backend_of(farm, "b")
    direct = await run_prompt(backend.url, graph)
    await flush_cache(backend)
    async with pinned(farm.proxy.url, backend.name, others):
        proxied = await run_prompt(farm.proxy.url, graph)
    assert "execution_error" in message_types(direct.frames)
    assert_same(normalized(proxied.frames), normalized(direct.frames), "the message sequence")
    assert_same(normalized_history(proxied.history), normalized_history(direct.history), "the history entry")


async def test_history_is_readable_when_status_says_the_queue_is_empty(farm: Farm) -> None:
    """ComfyUI stores the history entry before it sends `status` with queue_remaining 0 (and then `executing`
    null); comfy-api-simplified reads /history at that `status`. Read it at that moment on both paths."""
    backend, others = backend_of(farm, "a")
    for base in (backend.url, farm.proxy.url):
        async with pinned(farm.proxy.url, backend.name, others), ComfyClient(base) as client:
            await client.connect()
            await client.wait_for(lambda f: f.type == "status")
            prompt_id = await client.queue_prompt(image_chain(fresh_color()))
            success = await client.wait_for(lambda f: f.type == "execution_success", RUN_TIMEOUT_S)
            after = next(i for i, f in enumerate(client.frames) if f is success)
            await client.wait_for(lambda f, after=after: f.type == "status" and f.text is not None
                                  and f.text["data"]["status"]["exec_info"]["queue_remaining"] == 0
                                  and any(f is g for g in client.frames[after:]), RUN_TIMEOUT_S)
            status, history = await client.get(f"/history/{prompt_id}")
            assert status == 200 and prompt_id in history, base


def comfy_api_simplified_flow(url: str, workflow_file: Path, input_file: Path) -> tuple[Any, dict[str, bytes]]:
    """examples/send_input_image.py of comfy-api-simplified, with the server address as a parameter."""
    from comfy_api_simplified import ComfyApiWrapper, ComfyWorkflowWrapper

    api = ComfyApiWrapper(url)
    wf = ComfyWorkflowWrapper(str(workflow_file))
    image_metadata = api.upload_image(str(input_file))
    wf.set_node_param("input_image", "image", f"{image_metadata['subfolder']}/{image_metadata['name']}")
    return image_metadata, api.queue_and_wait_images(wf, "output_image")


async def test_client_libraries_get_the_same_images(farm: Farm, tmp_path: Path) -> None:
    """comfy-api-simplified and ComfyKit, unchanged, directly against a real backend and through the proxy
    (run on the other backend): the same upload answers and the same output pixels."""
    from comfykit import ComfyKit

    stem = f"lib-{uuid.uuid4().hex[:8]}"
    input_file = tmp_path / f"{stem}.png"
    input_file.write_bytes(png(40, 30, seed=fresh_color() % 251))
    simplified = tmp_path / "simplified.json"
    simplified.write_text(json.dumps(titled(load_chain("x.png", prefix=stem), {
        "1": "input_image", "2": "invert", "3": "scale", "4": "output_image"})))
    kit_workflow = tmp_path / "kit.json"
    kit_workflow.write_text(json.dumps(titled(load_chain("x.png", prefix=stem), {
        "1": "Load Image, $~image!", "2": "Invert", "3": "Scale, $width", "4": "$output.result"})))

    results = []
    async with aiohttp.ClientSession() as s:
        for base, which in ((farm.a.url, "a"), (farm.proxy.url, "b")):
            backend, others = backend_of(farm, which)
            async with pinned(farm.proxy.url, backend.name, others):
                metadata, images = await asyncio.wait_for(
                    asyncio.to_thread(comfy_api_simplified_flow, base + "/", simplified, input_file), RUN_TIMEOUT_S)
                kit = await ComfyKit(comfyui_url=base, executor_type="websocket").execute(
                    str(kit_workflow), {"image": str(input_file), "width": 20})
            assert kit.status == "completed", kit.msg
            [kit_image] = kit.images
            status, kit_png, _ = await get_bytes(s, kit_image)
            assert status == 200
            [simplified_png] = images.values()
            results.append((metadata, png_pixels(simplified_png), png_pixels(kit_png)))
    assert results[1] == results[0]
    assert results[0][0] == {"name": input_file.name, "subfolder": "default_upload_folder", "type": "input"}


async def test_two_prompts_of_one_client_on_one_backend_read_the_same(farm: Farm) -> None:
    """A second prompt queued while the first runs: the `status` counts and the two message streams
    interleave as on a single ComfyUI (both prompts pinned to one backend)."""
    backend, others = backend_of(farm, "a")
    frames = []
    for base in (backend.url, farm.proxy.url):
        async with pinned(farm.proxy.url, backend.name, others), ComfyClient(base) as client:
            await client.connect()
            await client.wait_for(lambda f: f.type == "status")
            first = await client.queue_prompt(slow_chain(fresh_color(), 2))
            await client.wait_for(executing(first, "2"), RUN_TIMEOUT_S)
            second = await client.queue_prompt(image_chain(fresh_color()))
            await client.wait_done(first, RUN_TIMEOUT_S)
            await client.wait_done(second, RUN_TIMEOUT_S)
            frames.append([f.text for f in client.frames])
    assert_same(normalized(frames[1]), normalized(frames[0]), "the message sequence")


@pytest.mark.parametrize("poster_client_id", ["another-client", None])
async def test_an_onlooker_socket_sees_what_comfyui_broadcasts(farm: Farm, poster_client_id: str | None) -> None:
    """A socket that queued nothing, while another client (or a script without client_id) runs a prompt:
    what it receives, directly and through the proxy."""
    backend, others = backend_of(farm, "a")
    seen = []
    for base in (backend.url, farm.proxy.url):
        async with pinned(farm.proxy.url, backend.name, others), ComfyClient(base) as onlooker, \
                ComfyClient(base) as poster:
            await onlooker.connect()
            await onlooker.wait_for(lambda f: f.type == "status")
            body: dict[str, Any] = {"prompt": image_chain(fresh_color())}
            if poster_client_id is not None:
                body["client_id"] = poster_client_id
            status, answer = await poster.post("/prompt", body)
            assert status == 200, answer
            if poster_client_id is None:  # progress_state of a prompt without client_id goes to every socket
                await onlooker.wait_for(lambda f: f.type == "progress_state", RUN_TIMEOUT_S)
            prompt_id = answer["prompt_id"]

            async def stored(prompt_id: str = prompt_id) -> bool:  # polled, as a script without a socket does
                return prompt_id in (await poster.get(f"/history/{prompt_id}"))[1]
            await wait_until(stored, RUN_TIMEOUT_S, "the history entry")
            # ComfyUI's last broadcast, status 0, goes out as the entry is stored
            with contextlib.suppress(TimeoutError):
                await onlooker.wait_for(lambda f: f.type == "status" and f.text is not None
                                        and f.text["data"]["status"]["exec_info"]["queue_remaining"] == 0
                                        and f is not onlooker.frames[0], 2)
            seen.append(normalized([f.text for f in onlooker.frames if f.type == "status"]))
    assert seen[1] == seen[0]
