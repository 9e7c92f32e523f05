"""The flow every ComfyUI client uses, through the proxy over simulated backends, on both stores:
open /ws, POST /prompt, wait for `executing` null, GET /history/{id}, GET /view."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import aiohttp
import pytest

from proxy.config import OutputsConfig
from tests.client import ComfyClient, txt2img
from tests.conftest import TRACES, wait_until

# The order of a normal run (traces/run_normal.json), per prompt, for messages carrying its prompt_id.
FINAL = ["execution_success", "executing"]


def _types(msgs: list[dict[str, Any]]) -> list[str]:
    return [m["type"] for m in msgs]


def _assert_comfy_order(client: ComfyClient, prompt_id: str) -> None:
    types = _types(client.messages_of(prompt_id))
    assert types[:2] == ["execution_start", "execution_cached"], types
    assert types[-2:] == FINAL, types
    assert client.messages_of(prompt_id)[-1]["data"]["node"] is None
    assert "executed" in types and "progress" in types and "progress_state" in types
    # A status with the client's queue count comes right before `executing` null, as in the trace.
    texts = [f.text for f in client.frames if f.text is not None]
    last = max(i for i, t in enumerate(texts) if t["data"].get("prompt_id") == prompt_id)
    assert texts[last - 1]["type"] == "status"


async def test_two_clients_five_prompts_each_spread_and_isolated(sims, proxies) -> None:
    a, b = await sims("alpha"), await sims("beta")
    proxy = await proxies([a, b])
    async with ComfyClient(proxy.url) as c1, ComfyClient(proxy.url) as c2:
        await c1.connect()
        await c2.connect()
        ids1, ids2 = await asyncio.gather(
            asyncio.gather(*(c1.queue_prompt(txt2img(seed=i)) for i in range(5))),
            asyncio.gather(*(c2.queue_prompt(txt2img(seed=100 + i)) for i in range(5))))
        await asyncio.gather(*(c1.wait_done(p, timeout=30) for p in ids1),
                             *(c2.wait_done(p, timeout=30) for p in ids2))
        for pid in ids1:
            _assert_comfy_order(c1, pid)
        for pid in ids2:
            _assert_comfy_order(c2, pid)
        seen1 = {f.text["data"].get("prompt_id") for f in c1.frames if f.text} - {None}
        seen2 = {f.text["data"].get("prompt_id") for f in c2.frames if f.text} - {None}
        assert seen1 == set(ids1) and seen2 == set(ids2)
    records = await proxy.services.store.get_many(ids1 + ids2)
    spread = Counter(r.backend for r in records)
    assert set(spread) == {"alpha", "beta"} and all(3 <= n <= 7 for n in spread.values()), spread
    assert all(r.outcome == "success" for r in records)


async def test_view_returns_the_bytes_each_backend_made(sims, proxies) -> None:
    a, b = await sims("alpha"), await sims("beta")
    proxy = await proxies([a, b])
    async with ComfyClient(proxy.url) as client:
        await client.connect()
        # The same graph on each backend (the other one drained: which backend runs what is the scheduler's
        # business, tested elsewhere): only the backend name makes the pixels differ.
        ids = []
        for other in ("beta", "alpha"):
            assert (await client.post(f"/proxy/backends/{other}/drain", {}))[0] == 200
            ids.append(await client.queue_prompt(txt2img(seed=7)))
            await client.wait_done(ids[-1])
            assert (await client.post(f"/proxy/backends/{other}/undrain", {}))[0] == 200
        direct = {}
        for pid in ids:
            rec = await proxy.services.store.get(pid)
            assert rec is not None and rec.backend is not None
            url = {"alpha": a.url, "beta": b.url}[rec.backend]
            backend_client = ComfyClient(url)
            async with backend_client:
                status, data = await backend_client.get_bytes(
                    "/view", filename="ComfyUI_00001_.png", subfolder="", type="output")
            assert status == 200
            direct[pid] = data
        assert len({r.backend for r in await proxy.services.store.get_many(ids)}) == 2
        assert direct[ids[0]] != direct[ids[1]]
        for pid in ids:
            status, hist = await client.get(f"/history/{pid}")
            assert status == 200 and list(hist) == [pid]
            image = hist[pid]["outputs"]["9"]["images"][0]
            assert image["filename"] != "ComfyUI_00001_.png" and image["filename"].endswith(".png")
            status, data = await client.get_bytes("/view", filename=image["filename"],
                                                  subfolder=image["subfolder"], type=image["type"])
            assert status == 200 and data == direct[pid]
            # The quick-reference snippet passes the file name alone.
            status, data = await client.get_bytes("/view", filename=image["filename"], type="output")
            assert status == 200 and data == direct[pid]
            executed = [m for m in client.messages_of(pid) if m["type"] == "executed"][0]
            assert executed["data"]["output"]["images"][0] == image


async def test_history_shape_and_client_id_restored(sims, proxies) -> None:
    proxy = await proxies([await sims("alpha")])
    trace = json.loads((TRACES / "run_normal.json").read_text())["history"]["body"]
    trace_entry = next(iter(trace.values()))
    async with ComfyClient(proxy.url) as client:
        await client.connect()
        pid = await client.queue_prompt(txt2img(seed=1), prompt_id="my-own-id")
        assert pid == "my-own-id"
        await client.wait_done(pid)
        status, hist = await client.get(f"/history/{pid}")
        entry = hist[pid]
        assert set(entry) == set(trace_entry)
        assert entry["prompt"][1] == pid and entry["prompt"][3]["client_id"] == client.client_id
        assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
        assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached",
                                                                "execution_success"]
        status, all_hist = await client.get("/history", max_items="1")
        assert list(all_hist) == [pid]
        assert await client.get("/history/unknown") == (200, {})


async def test_invalid_bodies_get_comfyui_400s(sims, proxies) -> None:
    proxy = await proxies([await sims("alpha")])
    traces = json.loads((TRACES / "validation_errors.json").read_text())
    async with ComfyClient(proxy.url) as client:
        status, body = await client.post("/prompt", raw=b"{not json")
        assert status == 400 and body["error"]["type"] == "invalid_prompt" and body["node_errors"] == {}
        for case in ("no_prompt", "unknown_class", "missing_input", "no_output", "out_of_range"):
            status, body = await client.post("/prompt", traces[case]["request"]["json"])
            assert (status, body) == (400, traces[case]["body"]), case
        status, body = await client.post("/prompt", traces["bad_link"]["request"]["json"])
        assert status == 400 and body["error"]["type"] == "prompt_outputs_failed_validation"
        errors = body["node_errors"]["2"]["errors"]
        assert errors[0]["type"] == "exception_during_validation" and errors[0]["details"] == "'99'"
        status, body = await client.post("/api/prompt", {"prompt": txt2img(1, ckpt="nowhere.safetensors")})
        assert status == 400 and body["node_errors"]["4"]["errors"][0]["type"] == "value_not_in_list"
        assert await client.get("/queue") == (200, {"queue_running": [], "queue_pending": []})


async def test_backend_killed_while_idle_is_skipped(sims, proxies) -> None:
    a, b = await sims("alpha"), await sims("beta")
    proxy = await proxies([a, b])
    await a.close()
    async with ComfyClient(proxy.url) as client:
        await client.connect()
        ids = [await client.queue_prompt(txt2img(seed=i)) for i in range(4)]
        await asyncio.gather(*(client.wait_done(p) for p in ids))
    records = await proxy.services.store.get_many(ids)
    assert {r.backend for r in records} == {"beta"} and all(r.outcome == "success" for r in records)


async def test_backend_400_at_dispatch_becomes_execution_error(sims, proxies) -> None:
    a = await sims("alpha")
    proxy = await proxies([a])
    async with ComfyClient(proxy.url) as client:
        await client.connect()
        await client.post_to(a.url, "/sim/faults", {"reject_prompts": True})
        pid = await client.queue_prompt(txt2img(seed=3))
        await client.wait_done(pid)
        types = _types(client.messages_of(pid))
        assert types == ["execution_error", "executing"], types
        error = client.messages_of(pid)[0]["data"]
        assert error["prompt_id"] == pid and error["exception_message"]
        status, hist = await client.get(f"/history/{pid}")
        assert hist[pid]["status"]["status_str"] == "error"
        assert hist[pid]["status"]["messages"][0][0] == "execution_error"
        await client.post_to(a.url, "/sim/faults", {"reject_prompts": False})
        pid2 = await client.queue_prompt(txt2img(seed=4))
        await client.wait_done(pid2)
        assert _types(client.messages_of(pid2))[-2:] == FINAL


async def test_restarted_proxy_answers_history_and_view(sims, proxies, store_kind) -> None:
    if store_kind != "redis":
        pytest.skip("an in-process store does not outlive its process")
    a = await sims("alpha")
    first = await proxies([a])
    async with ComfyClient(first.url) as client:
        await client.connect()
        pid = await client.queue_prompt(txt2img(seed=5))
        await client.wait_done(pid)
    await first.close()
    second = await proxies([a])
    async with ComfyClient(second.url) as client:
        status, hist = await client.get(f"/history/{pid}")
        assert status == 200 and hist[pid]["status"]["status_str"] == "success"
        image = hist[pid]["outputs"]["9"]["images"][0]
        status, data = await client.get_bytes("/view", filename=image["filename"], type="output")
        assert status == 200 and data[:8] == b"\x89PNG\r\n\x1a\n"


async def test_readyz_and_backends(sims, proxies) -> None:
    a = await sims("alpha")
    proxy = await proxies([a])
    async with ComfyClient(proxy.url) as client:
        status, body = await client.get("/proxy/readyz")
        assert status == 200 and body["backends_available"] == ["alpha"], body
        await a.close()
        # still ready (it admits against the kept catalogue: prompts wait for a backend), but says so
        await wait_until(lambda: _waiting(client), what="readyz to say it is waiting for a backend")
        status, body = await client.get("/proxy/backends")
        assert body["backends"][0]["name"] == "alpha" and body["backends"][0]["available"] is False


async def _waiting(client: ComfyClient) -> bool:
    status, body = await client.get("/proxy/readyz")
    return status == 200 and body["status"] == "waiting" and body["backends_available"] == []


async def test_prompt_without_client_id_broadcasts_like_comfyui(sims, proxies) -> None:
    proxy = await proxies([await sims("alpha")])
    async with ComfyClient(proxy.url) as watcher:
        await watcher.connect()
        status, body = await watcher.post("/prompt", {"prompt": txt2img(seed=11)})
        assert status == 200
        pid = body["prompt_id"]

        async def finished() -> bool:
            return pid in (await watcher.get(f"/history/{pid}"))[1]
        await wait_until(finished, what="the prompt to reach history")
        await watcher.wait_for(lambda f: f.type == "progress_state"
                               and all(n["state"] == "finished" for n in f.text["data"]["nodes"].values())
                               and len(f.text["data"]["nodes"]) == 7)
        seen = {m["type"] for m in watcher.messages_of(pid)}
        # protocol §8 and a live 0.3.75: progress, progress_state and previews go to every socket; the rest
        # (execution_start, executing, executed, execution_success) to nobody.
        assert {"progress", "progress_state"} <= seen
        assert not seen & {"execution_start", "executing", "executed", "execution_success"}, seen
        assert any(f.binary for f in watcher.frames)


async def test_queue_delete_and_interrupt_with_more_prompts_than_slots(sims, proxies) -> None:
    """Two backends, two slots each, eight slow prompts: `/queue` splits running from pending; deleting a
    pending prompt (one in the proxy's queue, one waiting at a backend) means it never runs anywhere;
    interrupting by prompt_id ends exactly that prompt with `execution_interrupted`."""
    a, b = await sims("alpha", step_ms=20), await sims("beta", step_ms=20)
    proxy = await proxies([a, b])
    async with ComfyClient(proxy.url) as client:
        await client.connect()
        ids = [await client.queue_prompt(txt2img(seed=i, steps=40)) for i in range(8)]

        async def two_running() -> bool:
            queue = (await client.get("/queue"))[1]
            return len(queue["queue_running"]) == 2
        await wait_until(two_running, what="a prompt running on each backend")
        queue = (await client.get("/queue"))[1]
        running = [item[1] for item in queue["queue_running"]]
        pending = [item[1] for item in queue["queue_pending"]]
        assert sorted(running + pending) == sorted(ids) and len(pending) == 6
        records = {r.prompt_id: r for r in await proxy.services.store.get_many(pending)}
        at_backend = next(pid for pid in pending if records[pid].state == "dispatched")
        in_proxy = next(pid for pid in reversed(pending) if records[pid].state == "queued")
        assert (await client.post("/queue", {"delete": [at_backend, in_proxy]}))[0] == 200
        assert not {at_backend, in_proxy} & {item[1] for item in (await client.get("/queue"))[1]["queue_pending"]}

        victim, survivor = running
        assert (await client.post("/interrupt", {"prompt_id": victim}))[0] == 200
        rest = [pid for pid in ids if pid not in (at_backend, in_proxy)]
        await asyncio.gather(*(client.wait_done(pid, timeout=30) for pid in rest))
        for gone in (at_backend, in_proxy):
            assert (await client.get(f"/history/{gone}"))[1] == {}
            for backend in (a, b):
                assert (await client.get_from(backend.url, f"/history/{gone}"))[1] == {}

    interrupted = {m["data"]["prompt_id"] for m in client.messages_of_type("execution_interrupted")}
    assert interrupted == {victim}
    started = {m["data"]["prompt_id"] for m in client.messages_of_type("execution_start")}
    assert at_backend not in started and in_proxy not in started
    outcomes = {r.prompt_id: r.outcome for r in await proxy.services.store.get_many(rest)}
    assert outcomes[victim] == "interrupted" and outcomes[survivor] == "success"
    assert all(outcomes[pid] == "success" for pid in rest if pid != victim)


async def test_view_answers_ranges_and_validators_as_the_backend_does(sims, proxies) -> None:
    """ComfyUI's /view is aiohttp's file response (RFC 9110 ranges, ETag and Last-Modified): through the
    proxy a slice is the same 206 with the same bytes and Content-Range, a revalidation the same 304."""
    a = await sims("alpha")
    proxy = await proxies([a], outputs=OutputsConfig(store="backend"))  # the file store: test_file_store.py
    async with ComfyClient(proxy.url) as client, aiohttp.ClientSession() as raw:
        await client.connect()
        pid = await client.queue_prompt(txt2img(seed=11))
        await client.wait_done(pid)
        image = (await client.get(f"/history/{pid}"))[1][pid]["outputs"]["9"]["images"][0]
        through = (proxy.url, {**image})
        direct = (a.url, {**image, "filename": "ComfyUI_00001_.png"})

        async def ask(where: tuple[str, dict[str, str]], **headers: str) -> tuple[int, Any, bytes]:
            async with raw.get(where[0] + "/view", params=where[1], headers=headers) as resp:
                return resp.status, resp.headers.copy(), await resp.read()   # names in any case
        whole = await ask(direct)
        size = len(whole[2])
        for headers in ({"Range": "bytes=10-19"}, {"Range": f"bytes={size - 5}-"}, {"Range": "bytes=-7"},
                        {"Range": f"bytes={size + 10}-"}, {"If-None-Match": whole[1]["ETag"]},
                        {"If-Modified-Since": whole[1]["Last-Modified"]},
                        {"If-None-Match": '"other"', "Range": "bytes=0-3"}):
            mine, theirs = await ask(through, **headers), await ask(direct, **headers)
            assert mine[0] == theirs[0] and mine[2] == theirs[2], (headers, mine[0], theirs[0])
            for name in ("Content-Range", "ETag", "Last-Modified", "Content-Length"):
                assert mine[1].get(name) == theirs[1].get(name), (headers, name)
        assert (await ask(through, Range="bytes=10-19"))[0] == 206
        assert (await ask(through, **{"If-None-Match": whole[1]["ETag"]}))[0] == 304
