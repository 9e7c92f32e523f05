"""Route by route, the proxy answers what a single backend answers for the same state (issue #3,
acceptance 1); where merging is the point, the merge is checked over two backends.

Covered elsewhere and not repeated here: `/upload/image` and `/upload/mask` (test_uploads.py, against the
traces and a backend), `POST /prompt`'s errors and `/history/{id}`'s shape (test_gateway.py, against the
traces), `/view` bytes (test_gateway.py), the user data routes (test_userdata.py), `/ws` (everywhere),
the page and its assets (test_frontend.py).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from proxy.api import COMFY_ROUTES, STATIC_ROUTES
from proxy.relay.hub import ClientEvent
from proxy.relay.router import EventRouter
from proxy.store import MemoryStore
from tests.client import ComfyClient, txt2img

PACK_JS = b"import { app } from '../../scripts/app.js';\napp.registerExtension({ name: 'demo.pack' });\n"


def custom_node_pack(base: Path, pack: str, word: str) -> Path:
    """A custom node pack as ComfyUI finds it in `custom_nodes/`: translations, an example workflow, a
    subgraph, and a web folder with an extension script."""
    root = base / "custom_nodes" / pack
    (root / "locales" / "en").mkdir(parents=True)
    (root / "locales" / "en" / "main.json").write_text(json.dumps({"nodeDefs": {pack: {"display_name": word}},
                                                                    "words": [word]}))
    (root / "locales" / "en" / "settings.json").write_text(json.dumps({pack + ".Setting": {"name": word}}))
    (root / "example_workflows").mkdir()
    (root / "example_workflows" / "demo.json").write_text('{"nodes": [], "links": []}')
    (root / "subgraphs").mkdir()
    (root / "subgraphs" / "blur.json").write_text('{"definitions": {}}')
    (root / "web" / "js").mkdir(parents=True)
    (root / "web" / "js" / "hello.js").write_bytes(PACK_JS)
    return base


async def _answer(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as r:
        body = await r.read()
        if r.content_type == "application/json":
            return r.status, json.loads(body)
        return r.status, body


INFO_PATHS = ["/object_info", "/object_info/KSampler", "/object_info/Nope", "/models", "/models/checkpoints",
              "/models/nope", "/models/..%2Fhistory", "/embeddings", "/extensions", "/features", "/users",
              "/view_metadata/checkpoints?filename=sd_xl_base_1.0.safetensors",
              "/view_metadata/checkpoints?filename=nope.safetensors", "/view_metadata/checkpoints",
              "/view_metadata/checkpoints?filename=sd_xl_base_1.0.ckpt", "/i18n", "/workflow_templates",
              "/global_subgraphs", "/global_subgraphs/nope", "/experiment/models", "/experiment/models/loras",
              "/experiment/models/nope", "/experiment/models/preview/checkpoints/0/sd_xl_base_1.0.safetensors"]
UNTWINNED = ["/extensions/mypack/js/hello.js", "/extensions/mypack/js/nope.js",
             "/api/workflow_templates/mypack/demo.json", "/templates/index.json", "/docs/KSampler/en.md",
             "/internal/folder_paths", "/internal/files/input", "/internal/files/nope"]


async def test_information_routes_answer_as_the_backend(sims, proxies, tmp_path: Path) -> None:
    base = custom_node_pack(tmp_path / "alpha", "mypack", "Hello")
    sim = await sims("alpha", base_dir=str(base))
    proxy = await proxies([sim])
    async with aiohttp.ClientSession() as session:
        for path in [*INFO_PATHS, *("/api" + p for p in INFO_PATHS), *UNTWINNED]:
            direct, through = await _answer(session, sim.url + path), await _answer(session, proxy.url + path)
            assert through == direct, path
        for url in (sim.url, proxy.url):  # the same state: one uploaded input file on each side
            form = aiohttp.FormData()
            form.add_field("image", b"\x89PNG-not-really", filename="in.png")
            async with session.post(url + "/upload/image", data=form) as r:
                assert r.status == 200
        for path in ("/internal/files/input", "/internal/files/output"):
            assert await _answer(session, proxy.url + path) == await _answer(session, sim.url + path), path
        assert (await _answer(session, proxy.url + "/internal/files/input"))[1] == ["in.png"]
        # A subgraph by its id (the backend's own), and what came through is what the backend sent.
        (entry_id,) = (await _answer(session, proxy.url + "/global_subgraphs"))[1]
        path = f"/api/global_subgraphs/{entry_id}"
        assert await _answer(session, proxy.url + path) == await _answer(session, sim.url + path)
        assert (await _answer(session, proxy.url + path))[1]["data"] == '{"definitions": {}}'
        # Merging is the point of /system_stats: the proxy's host, the backends' versions, devices by backend.
        (_, mine), (_, theirs) = (await _answer(session, proxy.url + "/system_stats"),
                                  await _answer(session, sim.url + "/system_stats"))
        assert list(mine["system"]) == list(theirs["system"])
        for key in ("comfyui_version", "required_frontend_version", "pytorch_version", "embedded_python"):
            assert mine["system"][key] == theirs["system"][key], key
        assert mine["devices"] == [{**theirs["devices"][0], "name": "alpha: " + theirs["devices"][0]["name"]}]
        # A decoded `../` in a relayed path never reaches another backend route.
        for path in ("/extensions/mypack/..%2F..%2Fhistory", "/templates/..%2Fhistory", "/docs/..%2F..%2Fqueue"):
            assert (await _answer(session, proxy.url + path))[0] == 404, path


async def test_frontend_listings_merge_over_backends(sims, proxies, tmp_path: Path) -> None:
    a = await sims("alpha", base_dir=str(custom_node_pack(tmp_path / "a", "packa", "Alpha")),
                   loras=("only-a.safetensors",))
    b = await sims("beta", base_dir=str(custom_node_pack(tmp_path / "b", "packb", "Beta")),
                   loras=("only-b.safetensors",), checkpoints=("beta-only.safetensors",))
    proxy = await proxies([a, b])
    async with aiohttp.ClientSession() as session:
        async def get(base: str, path: str) -> Any:
            status, body = await _answer(session, base + path)
            assert status == 200, path
            return body
        extensions = await get(proxy.url, "/api/extensions")
        assert {"/extensions/packa/js/hello.js", "/extensions/packb/js/hello.js"} <= set(extensions)
        assert len(extensions) == len(set(extensions))  # the frontend's own scripts once, not once per backend
        for pack in ("packa", "packb"):  # each script from the backend that has it
            assert await _answer(session, f"{proxy.url}/extensions/{pack}/js/hello.js") == (200, PACK_JS)
        i18n = await get(proxy.url, "/i18n")
        assert i18n["en"]["nodeDefs"] == {"packa": {"display_name": "Alpha"}, "packb": {"display_name": "Beta"}}
        assert i18n["en"]["words"] == ["Alpha", "Beta"]  # ComfyUI's merge concatenates lists
        assert await get(proxy.url, "/workflow_templates") == {"packa": ["demo"], "packb": ["demo"]}
        subgraphs = await get(proxy.url, "/global_subgraphs")
        assert sorted(e["info"]["node_pack"] for e in subgraphs.values()) == ["custom_nodes.packa",
                                                                              "custom_nodes.packb"]
        for entry_id, entry in subgraphs.items():
            assert (await get(proxy.url, f"/global_subgraphs/{entry_id}"))["name"] == entry["name"]
        loras = await get(proxy.url, "/experiment/models/loras")
        assert {e["name"] for e in loras} == {"only-a.safetensors", "only-b.safetensors"}
        folders = {e["name"]: e["folders"] for e in await get(proxy.url, "/experiment/models")}
        assert folders["loras"] == [str(tmp_path / p / "models" / "loras") for p in ("a", "b")]
        # view_metadata comes from the backend that has the file.
        meta = await get(proxy.url, "/view_metadata/checkpoints?filename=beta-only.safetensors")
        assert meta == await get(b.url, "/view_metadata/checkpoints?filename=beta-only.safetensors")
        assert meta["sim.backend"] == "beta"


def _queue_items(queue: dict[str, Any]) -> dict[str, list[Any]]:
    """A /queue answer without what is each server's own: queue numbers."""
    return {part: sorted([item[1], item[2], item[3].get("client_id"), item[4]] for item in queue[part])
            for part in ("queue_running", "queue_pending")}


def _history_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """A history entry without numbers, times and the proxy's file references."""
    status = entry["status"]
    number, prompt_id, graph, extra_data, outputs = entry["prompt"]
    extra = {k: v for k, v in extra_data.items() if k != "create_time"}
    return {"prompt": [prompt_id, graph, extra, outputs], "status": [status["status_str"], status["completed"],
                                                      [m[0] for m in status["messages"]]],
            "outputs": sorted(entry["outputs"]), "meta": sorted(entry["meta"])}


async def _control_flow(client: ComfyClient) -> list[Any]:
    """Three slow prompts on one backend: /prompt, /queue, delete, interrupt, /history and its delete and
    clear, /free; every answer recorded for comparison (normalised where numbers are each server's own)."""
    out: list[Any] = [await client.get("/prompt")]
    ids = [f"route-{i}" for i in range(3)]
    for i, pid in enumerate(ids):
        status, body = await client.post("/prompt", {"prompt": txt2img(seed=i, steps=30), "client_id":
                                                     client.client_id, "prompt_id": pid})
        out.append((status, sorted(body), body["prompt_id"], body["node_errors"]))
    await client.wait_for(lambda f: f.text is not None and f.text["type"] == "progress"
                          and f.text["data"]["prompt_id"] == ids[0])
    status, queue = await client.get("/queue")
    out.append((status, _queue_items(queue)))
    out.append(await client.post("/queue", {"delete": [ids[2]]}))
    out.append(_queue_items((await client.get("/api/queue"))[1]))
    out.append(await client.post("/interrupt", {"prompt_id": ids[0]}))
    await client.wait_for(lambda f: f.text is not None and f.text["type"] == "execution_interrupted")
    await client.wait_done(ids[1])
    out.append(await client.get("/prompt"))
    for pid in ids:
        status, history = await client.get(f"/history/{pid}")
        out.append((status, {k: _history_entry(v) for k, v in history.items()}))
    status, history = await client.get("/history", max_items="1")
    out.append((status, list(history)))
    out.append(await client.post("/history", {"delete": [ids[1]]}))
    out.append(await client.get(f"/api/history/{ids[1]}"))
    out.append(await client.post("/api/history", {"clear": True}))
    out.append(await client.get("/history"))
    out.append(await client.post("/free", {"unload_models": True, "free_memory": True}))
    out.append(await client.post("/queue", {"clear": True}))
    out.append(await client.get("/queue"))
    return out


async def test_prompt_queue_interrupt_history_free_answer_as_the_backend(sims, proxies) -> None:
    direct_sim, farm_sim = await sims("alpha", step_ms=20), await sims("alpha", step_ms=20)
    proxy = await proxies([farm_sim])
    client_id = "the-same-client"
    async with ComfyClient(direct_sim.url, client_id) as direct, ComfyClient(proxy.url, client_id) as through:
        await direct.connect()
        await through.connect()
        expected, got = await _control_flow(direct), await _control_flow(through)
        assert got == expected
        # The interrupted prompt: the same message sequence in both histories.
        assert expected[9][1]["route-0"]["status"][0] == "error"


async def test_console_logs_merge_by_backend_and_reach_a_subscribed_socket(sims, proxies) -> None:
    """`/internal/logs[/raw]`: every backend's console lines, each prefixed by its backend, as a backend
    answers them; a socket that subscribes gets the lines the backends write from then on."""
    a, b = await sims("alpha"), await sims("beta")
    proxy = await proxies([a, b])
    async with ComfyClient(proxy.url) as client:
        await client.connect()
        assert (await client.patch("/internal/logs/subscribe", {"clientId": client.client_id, "enabled": True}))[0] \
            == 200
        ids = [await client.queue_prompt(txt2img(seed=i)) for i in range(4)]
        for pid in ids:
            await client.wait_done(pid)
        status, raw = await client.get("/internal/logs/raw")
        assert status == 200 and set(raw) == {"entries", "size"} and set(raw["size"]) == {"cols", "rows"}
        for name, sim in (("alpha", a), ("beta", b)):
            direct = (await client.get_from(sim.url, "/internal/logs/raw"))[1]["entries"]
            ours = [{**e, "m": e["m"].removeprefix(f"[{name}] ")} for e in raw["entries"]
                    if e["m"].startswith(f"[{name}] ")]
            assert ours == direct and any(e["m"] == "got prompt\n" for e in direct)
        assert [e["t"] for e in raw["entries"]] == sorted(e["t"] for e in raw["entries"])
        status, text = await client.get("/internal/logs")
        assert status == 200 and text == "".join(f"{e['t']} - {e['m']}" for e in raw["entries"])
        # Live lines: "Prompt executed in …" of each prompt, from whichever backend ran it.
        executed = ("[alpha] Prompt executed", "[beta] Prompt executed")
        await client.wait_for(lambda f: f.type == "logs" and any(
            e["m"].startswith(executed) for e in f.text["data"]["entries"]))
        assert (await client.patch("/internal/logs/subscribe", {"clientId": client.client_id}))[0] == 400


async def test_a_log_subscription_outlives_a_backend_restart(sims, proxies) -> None:
    """A restarted backend has forgotten who wanted its console lines: the proxy asks it again when its
    upstream socket is back, so the logs panel keeps updating."""
    from proxy.sim import SimOptions, start_sim

    alpha = await sims("alpha")
    proxy = await proxies([alpha])
    port = int(alpha.url.rsplit(":", 1)[1])
    async with ComfyClient(proxy.url) as client:
        await client.connect()
        assert (await client.patch("/internal/logs/subscribe", {"clientId": client.client_id, "enabled": True}))[0] \
            == 200
        await alpha.close()
        again = await start_sim(SimOptions(name="alpha", port=port, step_ms=5, model_load_ms=20))
        try:
            await client.wait_done(await client.queue_prompt(txt2img(seed=7)))   # runs once alpha is back
            await client.wait_for(lambda f: f.type == "logs" and any(
                e["m"].startswith("[alpha] Prompt executed") for e in f.text["data"]["entries"]))
        finally:
            await again.close()


def test_every_route_is_compared() -> None:
    """A route added to the table must be added to a comparison (here or in the files named above)."""
    covered = {"/prompt", "/queue", "/interrupt", "/free", "/history", "/history/{prompt_id}", "/view",
               "/upload/image", "/upload/mask", "/ws", "/users", "/settings", "/settings/{id}", "/userdata",
               "/v2/userdata", "/userdata/{file}", "/userdata/{file}/move/{dest}", "/", "/system_stats",
               "/object_info/{node_class}", "/models/{folder}", "/view_metadata/{folder}",
               "/global_subgraphs/{id}", "/experiment/models/{folder}", "/experiment/models/preview/{path:.+}",
               "/extensions/{path:.+}", "/templates/{path:.+}", "/docs/{path:.+}",
               "/api/workflow_templates/{path:.+}", "/internal/files/{directory_type}", "/internal/logs",
               "/internal/logs/raw", "/internal/logs/subscribe"}
    # later ComfyUI's Jobs API: no 0.3.75 to compare with; tests/test_jobs.py holds it to protocol §17
    covered |= {"/api/jobs", "/api/jobs/cancel", "/api/jobs/{job_id}", "/api/jobs/{job_id}/cancel",
                "/api/jobs/{job_id}/events"}
    covered |= {p.split("?")[0] for p in INFO_PATHS + UNTWINNED}
    assert {path for _, path, _ in COMFY_ROUTES + STATIC_ROUTES} <= covered


def test_console_lines_written_while_a_backend_socket_was_away_are_relayed_once() -> None:
    """A backend drops the subscription with its socket: the lines it wrote meanwhile come from its
    `/internal/logs/raw` when the socket is back, those after the last line relayed, each once."""
    sent: list[ClientEvent] = []
    router = EventRouter(store=MemoryStore(), client=None, publish=sent.append,  # type: ignore[arg-type]
                         backend_url=lambda name: None, on_slot_freed=lambda: None)
    line = {"type": "logs", "data": {"entries": [{"t": "2026-12-04T10:00:01", "m": "before\n"}],
                                     "size": {"cols": 80, "rows": 24}}}
    asyncio.run(router.on_text("alpha", json.dumps(line)))
    raw = [{"t": "2026-12-04T10:00:00", "m": "old\n"}, {"t": "2026-12-04T10:00:01", "m": "before\n"},
           {"t": "2026-12-04T10:00:05", "m": "Prompt executed in 0.1 seconds\n"}]
    answer = {"entries": raw, "size": {"cols": 120, "rows": 40}}   # /internal/logs/raw
    router.relay_missed_logs("alpha", answer, since="2026-12-04T10:00:03")
    router.relay_missed_logs("alpha", answer, since="2026-12-04T10:00:03")   # a second reconnect: nothing new
    relayed = [e["m"] for event in sent for e in json.loads(event.payload)["data"]["entries"]]
    assert relayed == ["[alpha] before\n", "[alpha] Prompt executed in 0.1 seconds\n"]
    router.relay_missed_logs("beta", answer, since="2026-12-04T10:00:03")   # never relayed from: since the drop
    assert json.loads(sent[-1].payload)["data"] == {"entries": [{"t": "2026-12-04T10:00:05",
                                                                 "m": "[beta] Prompt executed in 0.1 seconds\n"}],
                                                    "size": {"cols": 120, "rows": 40}}
