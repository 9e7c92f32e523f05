"""The picker over snapshots: only available backends with a free slot and the prompt's node classes."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

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
    a: dict[str, Any] = {"Loader": {"input": {"required": {"ckpt": [["x.safetensors"], {}]}}}, "OnlyA": {"input": {}}}
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
    # A swap costs a load and what it evicts (a few prompts' worth): a long enough queue still loses to it.
    busy_xl = replace(has_xl, queue_remaining=8)
    assert s.pick([Candidate(has_15, 0), Candidate(busy_xl, 0)], wants_xl).state.name == "a"  # type: ignore[union-attr]
    # Values that are not model files (sampler names, …) do not count.
    plain = Demand(node_classes=frozenset({"KSampler"}),
                   combo_values=frozenset({("KSampler", "sampler_name", "euler")}))
    assert plain.models == frozenset()


# --- policies, capability, affinity and speed (issue 5) ------------------------------------------------

XL, V15 = "sd_xl_base_1.0.safetensors", "v1-5-pruned-emaonly.safetensors"
BOTH = {("CheckpointLoaderSimple", "ckpt_name"): frozenset({XL, V15})}


def wants(ckpt: str, steps: int = 20) -> Demand:
    return Demand(node_classes=frozenset({"KSampler"}), steps=steps,
                  combo_values=frozenset({("CheckpointLoaderSimple", "ckpt_name", ckpt)}))


def test_sampling_steps_of_a_graph() -> None:
    from proxy.speed import sampling_steps
    from tests.client import txt2img

    assert sampling_steps(txt2img(1, steps=7)) == 7
    advanced = {"1": {"class_type": "KSamplerAdvanced", "inputs": {"steps": 30, "start_at_step": 10,
                                                                   "end_at_step": 10000}},
                "2": {"class_type": "KSampler", "inputs": {"steps": ["9", 0]}}}   # a link is not a count
    assert sampling_steps(advanced) == 20
    assert sampling_steps({"1": {"class_type": "EmptyImage", "inputs": {"width": 8}}}) == 0


def test_speed_estimator_learns_per_step_from_weight_prior() -> None:
    from proxy.speed import PRIOR_LOAD_STEPS, PRIOR_SECONDS_PER_STEP, SpeedEstimator

    est = SpeedEstimator()
    # Nothing observed: the weight is the prior (a weight-2 backend is twice as fast).
    assert est.seconds_per_step("a", 1.0) == PRIOR_SECONDS_PER_STEP
    assert est.seconds_per_step("b", 2.0) == PRIOR_SECONDS_PER_STEP / 2
    assert est.load_seconds("a", 1.0) == PRIOR_SECONDS_PER_STEP * PRIOR_LOAD_STEPS
    # A prompt that loaded a model says nothing about steps before the step time is known.
    est.observe("a", 1.0, 20, 9.0, loaded_model=True)
    assert not est.observed("a")
    est.observe("a", 1.0, 20, 1.0, loaded_model=False)          # 0.05 s per step
    assert est.seconds_per_step("a", 1.0) == 0.05
    # Unobserved backends follow the observed ones, scaled by their weight.
    assert est.seconds_per_step("b", 2.0) == 0.025
    for _ in range(30):                                          # the EWMA follows a change of speed
        est.observe("a", 1.0, 10, 1.0, loaded_model=False)
    assert abs(est.seconds_per_step("a", 1.0) - 0.1) < 0.001
    # A run that loaded a model teaches the load: what it took beyond its steps.
    est.observe("a", 1.0, 10, 3.0, loaded_model=True)
    assert abs(est.load_seconds("a", 1.0) - 2.0) < 0.01
    assert abs(est.load_seconds("c", 1.0) - 2.0) < 0.01           # others: the same in their own steps


async def test_replicas_share_what_they_learn_of_backend_speeds(make_store) -> None:
    """Only the replica holding a backend's socket sees its prompts run: the others take up its figures
    through the store, and keep their own where they have some."""
    from proxy.speed import PRIOR_SECONDS_PER_STEP, SHARED_MAX_AGE_S, SpeedEstimator, share

    one, two = SpeedEstimator(), SpeedEstimator()
    first, second = make_store(), make_store()
    one.observe("gpu-a", 1.0, 10, 0.5, loaded_model=False)        # 0.05 s per step, seen by replica one
    one.observe("gpu-a", 1.0, 10, 2.5, loaded_model=True)         # a load adds 2 s there
    two.observe("gpu-b", 1.0, 10, 2.0, loaded_model=False)        # 0.2 s per step, seen by replica two
    await share(one, first, 1000.0)
    await share(two, second, 1000.0)
    await share(one, first, 1001.0)
    assert two.seconds_per_step("gpu-a", 1.0) == 0.05 and abs(two.load_seconds("gpu-a", 1.0) - 2.0) < 1e-9
    assert one.seconds_per_step("gpu-b", 1.0) == 0.2
    assert one.seconds_per_step("gpu-a", 1.0) == two.seconds_per_step("gpu-a", 1.0)
    # Its own observations win over what is shared; figures nobody renewed age out to the prior.
    two.observe("gpu-a", 1.0, 10, 1.0, loaded_model=False)
    await share(two, second, 1002.0)
    assert two.seconds_per_step("gpu-a", 1.0) == 0.1
    fresh = SpeedEstimator()
    await share(fresh, make_store(), 1002.0 + SHARED_MAX_AGE_S + 1)
    assert fresh.seconds_per_step("gpu-c", 1.0) == PRIOR_SECONDS_PER_STEP


def test_least_loaded_minimises_expected_completion_with_learned_speeds() -> None:
    s = Scheduler(clock=lambda: 1000.0)
    fast, slow = state("fast", max_inflight=1), state("slow", max_inflight=1)
    s.speed.observe("fast", 1.0, 10, 1.0, loaded_model=False)     # 0.1 s per step
    s.speed.observe("slow", 1.0, 10, 5.0, loaded_model=False)     # 0.5 s per step
    s.placed(Candidate(fast, 0), "p1", Demand(NEEDS.node_classes, steps=20))
    s.prompt_started("fast", "p1", 999.0)                         # 1 s of its 2 s left
    # fast frees in 1 s and takes 2 s; slow would take 10 s: the prompt waits for fast.
    s.begin_round({"fast": ["p1"]})
    assert s.pick([Candidate(fast, 1), Candidate(slow, 0)], Demand(NEEDS.node_classes, steps=20)) is None
    # Only a little slower: no waiting.
    for _ in range(20):
        s.speed.observe("slow", 1.0, 10, 1.2, loaded_model=False)
    s.begin_round({"fast": ["p1"]})
    picked = s.pick([Candidate(fast, 1), Candidate(slow, 0)], Demand(NEEDS.node_classes, steps=20))
    assert picked is not None and picked.state.name == "slow"


def test_model_affinity_is_updated_at_dispatch() -> None:
    """A burst for a checkpoint nobody has loaded goes where the first of them went, until that
    backend's queue outweighs a swap elsewhere, instead of swapping on every backend at once."""
    from dataclasses import replace

    s = Scheduler(clock=lambda: 1000.0)
    a, b = (replace(state(n, max_inflight=8), combos=BOTH, loaded=frozenset({V15})) for n in ("a", "b"))
    inflight = {"a": 0, "b": 0}
    went = []
    for i in range(3):
        picked = s.pick([Candidate(a, inflight["a"]), Candidate(b, inflight["b"])], wants(XL))
        assert picked is not None
        s.placed(picked, f"p{i}", wants(XL))
        inflight[picked.state.name] += 1
        went.append(picked.state.name)
        assert s.models_after(picked) == frozenset({XL})
    assert went == ["a", "a", "a"]
    # A prompt for the other checkpoint does not evict XL from the backend that has the burst queued.
    picked = s.pick([Candidate(a, inflight["a"]), Candidate(b, inflight["b"])], wants(V15))
    assert picked is not None and picked.state.name == "b"


def test_a_swap_costs_most_where_it_evicts_the_last_copy_and_nothing_where_the_backend_idles() -> None:
    from dataclasses import replace

    ds = "dreamshaper_8.safetensors"
    three = {("CheckpointLoaderSimple", "ckpt_name"): frozenset({XL, V15, ds})}
    s = Scheduler(clock=lambda: 1000.0)
    a, b, c = (replace(state(n), combos=three, loaded=frozenset({m})) for n, m in (("a", V15), ("b", V15), ("c", XL)))
    picked = s.pick([Candidate(c, 0), Candidate(a, 0), Candidate(b, 0)], wants(ds))
    assert picked is not None and picked.state.name == "a"      # V15 stays on b; XL's only copy stays on c
    s.placed(Candidate(c, 0), "old", wants(XL))
    s.prompt_ended("c", "old", "success", 0.0)                   # c has been idle since: its XL is cold
    picked = s.pick([Candidate(c, 0), Candidate(a, 0), Candidate(b, 0)], wants(ds))
    assert picked is not None and picked.state.name == "c"


def test_backlog_forgets_prompts_no_longer_in_flight() -> None:
    s = Scheduler()
    c = Candidate(state("a"), 0)
    s.placed(c, "p1", wants(XL))
    s.placed(c, "p2", wants(XL))
    s.begin_round({"a": ["p2"]})          # p1 ended on another replica or was requeued
    assert [p.models for p in s.backlog.pending("a")] == [frozenset({XL})]
    s.prompt_ended("a", "p2", "success", 5.0)
    assert s.backlog.pending("a") == []


def test_speeds_are_learned_from_the_backends_own_timestamps() -> None:
    """The proxy reads a prompt's start late when its upstream reader was busy (it fetches the previous
    prompt's history inline); the backend's timestamps in the history entry are what it really ran."""
    import json

    from proxy.relay.router import run_seconds
    from tests.conftest import TRACES

    entry, = json.loads((TRACES / "run_normal.json").read_text())["history"]["body"].values()
    assert run_seconds(entry) == pytest.approx(0.008)          # 1795361218586 - 1795361218578 ms
    assert run_seconds({"status": {"messages": []}}) is None   # an entry the proxy made up (backend gone)
    s = Scheduler()
    c = Candidate(state("a"), 0)
    for pid in ("load", "run"):
        s.placed(c, pid, wants(XL))
        s.prompt_started("a", pid, 100.0)
    s.prompt_ended("a", "load", "success", 101.0, ran_s=1.0)   # the first run loads the model: not a step time
    s.prompt_ended("a", "run", "success", 160.0, ran_s=2.0)    # read a minute late, ran 2 s
    assert s.speed.seconds_per_step("a", 1.0) == pytest.approx(2.0 / wants(XL).steps)


def test_vram_floor_keeps_prompts_off_a_backend_short_of_memory() -> None:
    from dataclasses import replace

    floor = BackendConfig(name="tight", url="http://tight", min_vram_free_mb=4096)
    tight = replace(state("tight"), config=floor, vram_free=2048 * 1024 ** 2, vram_total=24 * 1024 ** 3)
    roomy = replace(tight, config=replace(floor, name="roomy", url="http://roomy"), vram_free=8192 * 1024 ** 2)
    for policy in ("least_loaded", "round_robin", "random", "least_connections"):
        s = Scheduler(policy)
        assert s.pick([Candidate(tight, 0)], NEEDS) is None
        assert {s.pick([Candidate(tight, 0), Candidate(roomy, 0)], NEEDS).state.name  # type: ignore[union-attr]
                for _ in range(6)} == {"roomy"}
    assert Scheduler().pick([Candidate(replace(tight, config=replace(floor, min_vram_free_mb=0)), 0)], NEEDS)


def test_random_policy_picks_only_ready_backends() -> None:
    import random as random_module

    s = Scheduler("random", rng=random_module.Random(1))
    cands = [Candidate(state("a"), 0), Candidate(state("b"), 0), Candidate(state("full"), 2),
             Candidate(state("down", ok=False), 0)]
    assert Counter(s.pick(cands, NEEDS).state.name for _ in range(200)).keys() == {"a", "b"}  # type: ignore[union-attr]


def with_invert(prompt: dict[str, Any]) -> dict[str, Any]:
    prompt["10"] = {"class_type": "ImageInvert", "inputs": {"image": ["8", 0]}}
    prompt["9"]["inputs"]["images"] = ["10", 0]
    return prompt


@pytest.mark.parametrize("policy", ["least_loaded", "round_robin", "random", "least_connections"])
async def test_every_policy_respects_capabilities(sims, proxies, policy: str) -> None:
    """Whatever the policy: a prompt naming a model only one backend has runs there, a prompt using a node
    class one backend lacks never runs there, and a prompt no single backend can run is refused."""
    from tests.client import ComfyClient, txt2img

    full = await sims("full", checkpoints=(XL,), loras=("add_detail.safetensors",))
    plain = await sims("plain", checkpoints=(XL, V15), without_nodes=("ImageInvert",),
                       loras=("lcm_lora_sdxl.safetensors",))
    proxy = await proxies([full, plain], policy=policy)
    assert proxy.services.dispatcher.scheduler.policy == policy
    async with ComfyClient(proxy.url) as client:
        await client.connect()
        only_plain = [await client.queue_prompt(txt2img(i, ckpt=V15)) for i in range(3)]
        needs_invert = [await client.queue_prompt(with_invert(txt2img(10 + i, ckpt=XL))) for i in range(3)]
        anywhere = [await client.queue_prompt(txt2img(20 + i, ckpt=XL)) for i in range(4)]
        await asyncio.gather(*(client.wait_done(p) for p in only_plain + needs_invert + anywhere))
        records = {r.prompt_id: r for r in await proxy.services.store.get_many(only_plain + needs_invert + anywhere)}
        assert {records[p].backend for p in only_plain} == {"plain"}
        assert {records[p].backend for p in needs_invert} == {"full"}
        assert all(r.outcome == "success" for r in records.values())
        # v1.5 only on `plain`, the LoRA only on `full`: each backend refuses it on one input.
        lora = txt2img(99, ckpt=V15)
        lora["11"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name":
                      "add_detail.safetensors", "strength_model": 1.0, "strength_clip": 1.0}}
        lora["3"]["inputs"]["model"] = ["11", 0]
        status, body = await client.post("/prompt", {"prompt": lora})
        assert status == 400 and body["error"]["type"] == "prompt_outputs_failed_validation"
        errors = [e for node in body["node_errors"].values() for e in node["errors"]]
        assert errors and {e["type"] for e in errors} == {"value_not_in_list"}


async def test_the_scheduler_learns_backend_speeds_from_prompts_it_runs(sims, proxies) -> None:
    from tests.client import ComfyClient, txt2img

    fast = await sims("fast", speed=1.0)
    slow = await sims("slow", speed=0.25)
    proxy = await proxies([fast, slow], policy="round_robin")   # both get prompts; every policy learns
    scheduler = proxy.services.dispatcher.scheduler
    async with ComfyClient(proxy.url) as client:
        await client.connect()
        ids = [await client.queue_prompt(txt2img(i, steps=10)) for i in range(8)]
        await asyncio.gather(*(client.wait_done(p, timeout=30) for p in ids))
    assert scheduler.speed.observed("fast") and scheduler.speed.observed("slow")
    ratio = scheduler.speed.seconds_per_step("slow", 1.0) / scheduler.speed.seconds_per_step("fast", 1.0)
    assert ratio > 2.0   # 4 in the simulators' terms; node overheads and timers blur it a little
    assert scheduler.backlog.pending("fast") == scheduler.backlog.pending("slow") == []


async def test_simulator_reports_the_work_it_did(sims) -> None:
    """`GET /sim/stats`: the simulated GPU's own count of prompts, steps, loads and swaps (bench schedule)."""
    from tests.client import ComfyClient, txt2img

    sim = await sims("gpu", model_load_ms=30)
    async with ComfyClient(sim.url) as client:
        await client.connect()
        for i, ckpt in enumerate((XL, XL, V15)):
            await client.wait_done(await client.queue_prompt(txt2img(i, steps=3, ckpt=ckpt)))
        status, stats = await client.get("/sim/stats")
    assert status == 200
    assert (stats["prompts"], stats["sampling_steps"], stats["model_loads"], stats["model_swaps"]) == (3, 9, 2, 1)
    assert stats["loaded"] == V15 and abs(stats["load_s"] - 0.06) < 1e-9 and stats["busy_s"] > stats["load_s"]


def test_vram_floor_is_configured_per_backend() -> None:
    from proxy.config import ConfigError, parse_config

    config = parse_config({"backends": [{"url": "http://a:1", "min_vram_free_mb": 2048}, {"url": "http://b:1"}]})
    assert [b.min_vram_free_mb for b in config.backends] == [2048, 0]
    with pytest.raises(ConfigError) as refused:
        parse_config({"backends": [{"url": "http://a:1", "min_vram_free_mb": -1}]})
    assert refused.value.problems == ["backends[0].min_vram_free_mb: must be >= 0"]


def _scoring_all(s: Scheduler, states: list[BackendState], inflight: dict[str, int], demand: Demand
                 ) -> tuple[str | None, bool]:
    """The least-loaded choice made the plain way, every backend scored: (the backend, whether it is held)."""
    from proxy.scheduler import HOLD_MARGIN, TIE_MARGIN, can_run, has_free_slot, has_vram_floor, vram_free_fraction

    rnd = s._round
    cands = [Candidate(st, inflight.get(st.name, 0)) for st in states]
    scores = {c.state.name: s._score(c, demand, 1000.0, rnd.rates[c.state.name], rnd) for c in cands
              if can_run(c, demand) and has_vram_floor(c, demand)}
    ready = [c for c in cands if c.state.name in scores and has_free_slot(c, demand)]
    full = [c for c in cands if c.state.name in scores and not has_free_slot(c, demand)]
    if not ready:
        return None, False

    def key(c: Candidate) -> tuple[float, float, str]:
        return scores[c.state.name], vram_free_fraction(c), c.state.name
    best = min(ready, key=key)
    best = min((c for c in ready if scores[c.state.name] <= scores[best.state.name] * (1 + TIE_MARGIN)),
               key=lambda c: (c.inflight, *key(c)))
    held = min(full, key=key, default=None)
    if held is not None and scores[held.state.name] < scores[best.state.name] * (1 - HOLD_MARGIN):
        return held.state.name, True
    return best.state.name, False


def test_a_decision_scores_a_few_backends_and_chooses_what_scoring_all_would() -> None:
    """Random farms (speeds, loads, models, queues and VRAM drawn from small sets, so ties abound): the
    scan in lower-bound order picks, or holds for, the backend that scoring every one picks."""
    import random
    from dataclasses import replace

    rng = random.Random(11)
    for trial in range(300):
        s = Scheduler(clock=lambda: 1000.0)
        states = []
        for i in range(rng.randint(1, 30)):
            st = replace(state(f"b{i:02d}", queue=rng.choice((0, 0, 1, 3)), vram_free=rng.choice((5, 10, 15)),
                               max_inflight=rng.choice((1, 2, 4)), weight=rng.choice((1.0, 1.0, 2.0))),
                         combos=BOTH, loaded=frozenset(rng.choice(((), (XL,), (V15,)))))
            states.append(st)
            if rng.random() < 0.6:
                s.speed.observe(st.name, st.config.weight, 10, rng.choice((1.0, 1.0, 2.0, 3.0)), loaded_model=False)
        inflight: dict[str, int] = {}
        for n in range(rng.randint(0, 20)):
            st = rng.choice(states)
            s.placed(Candidate(st, inflight.get(st.name, 0)), f"p{n}", wants(rng.choice((XL, V15))))
            inflight[st.name] = inflight.get(st.name, 0) + 1
            if rng.random() < 0.5:
                s.prompt_started(st.name, f"p{n}", 1000.0 - rng.choice((0.5, 2.0)))
        s.begin_round(None, states)
        demand = rng.choice((NEEDS, Demand(NEEDS.node_classes, steps=rng.choice((1, 20))), wants(XL), wants(V15, 8)))
        want, hold = _scoring_all(s, states, inflight, demand)
        got = s.choose(demand, inflight)
        assert (got.state.name if got else None) == (None if hold else want), f"trial {trial}"
        if hold:
            assert any(p.backend == want for p in s._held.get(want, [])), f"trial {trial}"


def test_an_idle_farm_of_hundreds_is_decided_after_scoring_a_few() -> None:
    s = Scheduler()
    states = [state(f"b{i:03d}", max_inflight=4) for i in range(500)]
    scored = []
    real = s._score
    s._score = lambda c, *a: scored.append(c.state.name) or real(c, *a)   # type: ignore[method-assign]
    s.begin_round(None, states)
    inflight: dict[str, int] = {}
    for n in range(50):
        picked = s.choose(Demand(NEEDS.node_classes, steps=20), inflight)
        assert picked is not None
        s.placed(picked, f"p{n}", Demand(NEEDS.node_classes, steps=20))
        inflight[picked.state.name] = inflight.get(picked.state.name, 0) + 1
    assert len(set(inflight)) == 50                 # spread, one each: the busy ones score more
    assert len(scored) < 50 * 60, len(scored)       # not 50 × 500
