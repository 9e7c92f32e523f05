"""The picker over snapshots: only available backends with a free slot and the prompt's node classes."""

from __future__ import annotations

import asyncio
from collections import Counter

from proxy.backends import BackendState, merge_object_info
from proxy.config import BackendConfig
from proxy.scheduler import Candidate, Demand, Scheduler

NEEDS = Demand(node_classes=frozenset({"KSampler"}))


def state(name: str, *, queue: int = 0, vram_free: int = 10, ok: bool = True, classes: tuple[str, ...] = ("KSampler",),
          max_inflight: int = 2, weight: float = 1.0) -> BackendState:
    return BackendState(config=BackendConfig(name=name, url=f"http://{name}", max_inflight=max_inflight,
                                             weight=weight),
                        polled_ok=ok, upstream_connected=True, queue_remaining=queue, vram_total=20,
                        vram_free=vram_free, node_classes=frozenset(classes))


def test_least_loaded_prefers_short_queue_then_free_vram() -> None:
    s = Scheduler()
    picked = s.pick([Candidate(state("a", queue=3), 0), Candidate(state("b", queue=1), 0)], NEEDS)
    assert picked is not None and picked.state.name == "b"
    picked = s.pick([Candidate(state("a", vram_free=5), 0), Candidate(state("b", vram_free=15), 0)], NEEDS)
    assert picked is not None and picked.state.name == "b"
    picked = s.pick([Candidate(state("a", queue=2, weight=4), 0), Candidate(state("b", queue=1), 0)], NEEDS)
    assert picked is not None and picked.state.name == "a"


def test_filters_unavailable_full_and_incapable_backends() -> None:
    s = Scheduler()
    assert s.pick([Candidate(state("down", ok=False), 0)], NEEDS) is None
    assert s.pick([Candidate(state("full"), 2)], NEEDS) is None
    assert s.pick([Candidate(state("lacks", classes=("SaveImage",)), 0)], NEEDS) is None
    draining = Candidate(BackendState(config=state("d").config, polled_ok=True, upstream_connected=True,
                                      draining=True, node_classes=frozenset({"KSampler"})), 0)
    assert s.pick([draining], NEEDS) is None


def test_baseline_policies() -> None:
    cands = [Candidate(state("a"), 0), Candidate(state("b"), 1)]
    rr = Scheduler("round_robin")
    assert Counter(rr.pick(cands, NEEDS).state.name for _ in range(10)) == {"a": 5, "b": 5}  # type: ignore[union-attr]
    lc = Scheduler("least_connections")
    assert lc.pick(cands, NEEDS).state.name == "a"  # type: ignore[union-attr]


def test_merge_object_info_unions_classes_and_combos() -> None:
    a = {"Loader": {"input": {"required": {"ckpt": [["x.safetensors"], {}]}}}, "OnlyA": {"input": {}}}
    b = {"Loader": {"input": {"required": {"ckpt": [["y.safetensors", "x.safetensors"], {}]}}},
         "New": {"input": {"required": {"m": ["COMBO", {"options": ["p"]}]}}}}
    c = {"New": {"input": {"required": {"m": ["COMBO", {"options": ["q"]}]}}}}
    merged = merge_object_info([a, b, c])
    assert set(merged) == {"Loader", "OnlyA", "New"}
    assert merged["Loader"]["input"]["required"]["ckpt"][0] == ["x.safetensors", "y.safetensors"]
    assert merged["New"]["input"]["required"]["m"][1]["options"] == ["p", "q"]
    assert a["Loader"]["input"]["required"]["ckpt"][0] == ["x.safetensors"]


async def test_prompts_go_where_their_model_files_are(sims, proxies) -> None:
    from tests.client import ComfyClient, txt2img

    sdxl = await sims("sdxl-box", checkpoints=("sd_xl_base_1.0.safetensors",))
    sd15 = await sims("sd15-box", checkpoints=("v1-5-pruned-emaonly.safetensors",), without_nodes=("ImageInvert",))
    proxy = await proxies([sdxl, sd15])
    async with ComfyClient(proxy.url) as client:
        await client.connect()
        xl = [await client.queue_prompt(txt2img(i, ckpt="sd_xl_base_1.0.safetensors")) for i in range(3)]
        v15 = [await client.queue_prompt(txt2img(10 + i)) for i in range(3)]
        await asyncio.gather(*(client.wait_done(p) for p in xl + v15))
        records = {r.prompt_id: r for r in await proxy.services.store.get_many(xl + v15)}
        assert {records[p].backend for p in xl} == {"sdxl-box"} and {records[p].backend for p in v15} == {"sd15-box"}
        assert all(r.outcome == "success" for r in records.values())
        # The v1.5 checkpoint exists only where ImageInvert does not: no single backend can run this.
        prompt = txt2img(99)
        prompt["10"] = {"class_type": "ImageInvert", "inputs": {"image": ["8", 0]}}
        prompt["9"]["inputs"]["images"] = ["10", 0]
        status, body = await client.post("/prompt", {"prompt": prompt})
        assert status == 400 and body["error"]["type"] in ("prompt_outputs_failed_validation", "invalid_prompt")
        # A checkpoint that exists nowhere: ComfyUI's value_not_in_list.
        status, body = await client.post("/prompt", {"prompt": txt2img(1, ckpt="nowhere.safetensors")})
        assert status == 400 and body["node_errors"]["4"]["errors"][0]["type"] == "value_not_in_list"


def test_model_affinity_prefers_the_backend_with_the_model_loaded() -> None:
    from dataclasses import replace

    wants_xl = Demand(node_classes=frozenset({"KSampler"}),
                      combo_values=frozenset({("CheckpointLoaderSimple", "ckpt_name", "xl.safetensors")}))
    both = {("CheckpointLoaderSimple", "ckpt_name"): frozenset({"xl.safetensors", "v15.safetensors"})}
    has_xl = replace(state("b"), loaded=frozenset({"xl.safetensors"}), combos=both)
    has_15 = replace(state("a"), loaded=frozenset({"v15.safetensors"}), combos=both)
    s = Scheduler()
    assert s.pick([Candidate(has_15, 0), Candidate(has_xl, 0)], wants_xl).state.name == "b"  # type: ignore[union-attr]
    # A swap is worth one prompt of queue: a much shorter queue still wins.
    busy_xl = replace(has_xl, queue_remaining=3)
    assert s.pick([Candidate(has_15, 0), Candidate(busy_xl, 0)], wants_xl).state.name == "a"  # type: ignore[union-attr]
    # Values that are not model files (sampler names, …) do not count.
    plain = Demand(node_classes=frozenset({"KSampler"}),
                   combo_values=frozenset({("KSampler", "sampler_name", "euler")}))
    assert plain.models == frozenset()
