"""`bench schedule`: one trace of prompts replayed under each scheduler policy on a heterogeneous farm.

Farm: six simulators, three at speed 1.0 and three at 0.5, all configured with `weight: 1.0` (the proxy
has to learn which are slow), two slots each, three checkpoints on every one of them; loading a
checkpoint costs `LOAD_STEPS` sampling steps. The trace (seeded, identical for every policy) is prompts
of 10, 20 or 30 steps on checkpoints drawn 50/30/20 %, in two phases:

- stream: Poisson arrivals at 85 % of the farm's capacity (sampling steps per second, loads excluded).
  A prompt's queue wait is from its `POST /prompt` to its `execution_start` (history timestamps).
- batch: then `batch` prompts at once. Makespan is from the first POST to the last prompt's end; its
  lower bound is the batch's work ÷ the farm's capacity, load costs excluded, the work being what the
  simulators measured (time inside prompts less load time, times their speed), so the simulator's own
  per-prompt overheads count as work and only idle time, swaps and a ragged end count against a policy.
  (A stream at 85 % load cannot end sooner than its arrivals, ~1/0.85 of its work ÷ capacity, hence the
  batch.) GPU idle fraction is 1 − time inside prompts ÷ (backends × makespan).

Model swaps (loads that replaced another checkpoint, both phases) and GPU time are the simulators' own
counts (`GET /sim/stats`). Simulators are reset between policies (`POST /free` unloads and clears
caches); each policy gets a fresh proxy, so least_loaded starts from its priors every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from proxy.bench.load import percentile
from proxy.bench.overhead import image_prompt
from proxy.bench.procs import Proc, proxy, sim
from proxy.bench.result import BenchResult
from proxy.config import POLICIES

SPEEDS = (1.0, 1.0, 1.0, 0.5, 0.5, 0.5)
CHECKPOINTS = ("sd_xl_base_1.0.safetensors", "v1-5-pruned-emaonly.safetensors", "dreamshaper_8.safetensors")
CHECKPOINT_SHARES = (0.5, 0.3, 0.2)
STEP_CHOICES = (10, 20, 30)
LOAD_STEPS = 10        # a checkpoint load costs this many sampling steps
LOAD = 0.85            # stream arrivals as a fraction of the farm's capacity
MAX_INFLIGHT = 2
SEED = 5


@dataclass(frozen=True)
class TracePrompt:
    steps: int
    ckpt: str
    at: float          # stream: seconds after the phase starts; batch: 0


@dataclass
class PhaseResult:
    waits: list[float]
    makespan: float
    stats: list[dict[str, Any]]   # per backend: /sim/stats deltas over the phase


def graph(seed: int, steps: int, ckpt: str) -> dict[str, Any]:
    return image_prompt(seed, 64, steps, ckpt, "sched")


def _kinds(rng: random.Random, count: int) -> list[tuple[int, str]]:
    return [(rng.choice(STEP_CHOICES), rng.choices(CHECKPOINTS, CHECKPOINT_SHARES)[0]) for _ in range(count)]


def make_trace(stream: int, batch: int, step_ms: float, seed: int = SEED
               ) -> tuple[list[TracePrompt], list[TracePrompt]]:
    """The stream (with Poisson arrival times) and the batch, each from its own seeded generator."""
    rng = random.Random(seed)
    kinds = _kinds(rng, stream)
    rate = LOAD * sum(SPEEDS) * 1000 / step_ms / (sum(steps for steps, _ in kinds) / stream)  # prompts/s
    at, streamed = 0.0, []
    for steps, ckpt in kinds:
        streamed.append(TracePrompt(steps, ckpt, at))
        at += rng.expovariate(rate)
    return streamed, [TracePrompt(steps, ckpt, 0.0) for steps, ckpt in _kinds(random.Random(seed + 1), batch)]


async def _stats(s: aiohttp.ClientSession, sims: list[Proc]) -> list[dict[str, Any]]:
    async def one(p: Proc) -> dict[str, Any]:
        async with s.get(p.url + "/sim/stats") as resp:
            return dict(await resp.json())
    return list(await asyncio.gather(*(one(p) for p in sims)))


def _delta(after: list[dict[str, Any]], before: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: a[k] - b[k] for k in a if isinstance(a[k], int | float)} for a, b in zip(after, before, strict=True)]


async def _reset(s: aiohttp.ClientSession, sims: list[Proc]) -> None:
    """Every simulator back to a cold GPU and an empty cache (ComfyUI's `POST /free`)."""
    for p in sims:
        async with s.post(p.url + "/free", json={"unload_models": True, "free_memory": True}) as resp:
            await resp.read()
    deadline = time.monotonic() + 10
    while any(st["loaded"] is not None for st in await _stats(s, sims)):
        if time.monotonic() > deadline:
            raise RuntimeError("simulators did not unload their models")
        await asyncio.sleep(0.02)


async def _run_phase(s: aiohttp.ClientSession, base: str, sims: list[Proc], trace: list[TracePrompt],
                     first_seed: int) -> PhaseResult:
    before = await _stats(s, sims)
    posted: dict[str, float] = {}

    async def submit(i: int, item: TracePrompt) -> None:
        prompt_id = uuid.uuid4().hex
        posted[prompt_id] = time.time()
        body = {"prompt": graph(first_seed + i, item.steps, item.ckpt), "prompt_id": prompt_id}
        async with s.post(base + "/prompt", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"POST /prompt answered {resp.status}: {await resp.text()}")

    loop = asyncio.get_running_loop()
    start = loop.time()
    async with asyncio.TaskGroup() as group:
        for i, item in enumerate(trace):
            delay = start + item.at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)   # the trace's arrival times
            group.create_task(submit(i, item))
    while True:
        async with s.get(base + "/prompt") as resp:
            if (await resp.json())["exec_info"]["queue_remaining"] == 0:
                break
        await asyncio.sleep(0.05)
    async with s.get(base + "/history") as resp:
        history = await resp.json()
    starts, ends = [], []
    for prompt_id, submitted in posted.items():
        events = {name: data for name, data in history[prompt_id]["status"]["messages"]}
        if "execution_success" not in events:
            raise RuntimeError(f"prompt {prompt_id} did not succeed: {history[prompt_id]['status']}")
        starts.append(events["execution_start"]["timestamp"] / 1000 - submitted)
        ends.append(events["execution_success"]["timestamp"] / 1000)
    return PhaseResult(starts, max(ends) - min(posted.values()), _delta(await _stats(s, sims), before))


def _config(sims: list[Proc], policy: str, path: Path) -> None:
    path.write_text(yaml.safe_dump({
        "backends": [{"name": f"gpu-{i}-x{speed}", "url": p.url, "max_inflight": MAX_INFLIGHT}
                     for i, (p, speed) in enumerate(zip(sims, SPEEDS, strict=True))],
        "scheduler": {"policy": policy, "poll_interval_s": 0.5},
    }))


@contextlib.asynccontextmanager
async def _farm(step_ms: float) -> AsyncIterator[list[Proc]]:
    async with contextlib.AsyncExitStack() as stack:
        common = ("--step-ms", str(step_ms), "--model-load-ms", str(LOAD_STEPS * step_ms), "--no-previews",
                  "--checkpoints", ",".join(CHECKPOINTS))
        yield list(await asyncio.gather(*(
            stack.enter_async_context(sim(f"gpu-{i}", "--speed", str(speed), *common))
            for i, speed in enumerate(SPEEDS))))


def _work_s(stats: list[dict[str, Any]]) -> float:
    """Work the simulators did, in seconds at speed 1.0, load time excluded."""
    return sum((st["busy_s"] - st["load_s"]) * speed for st, speed in zip(stats, SPEEDS, strict=True))


async def measure(policies: tuple[str, ...], step_ms: float, stream: list[TracePrompt], batch: list[TracePrompt]
                  ) -> dict[str, dict[str, float]]:
    """Replay the trace under each policy; figures per policy."""
    capacity = sum(SPEEDS)
    figures: dict[str, dict[str, float]] = {}
    async with _farm(step_ms) as sims, aiohttp.ClientSession() as s:
        with tempfile.TemporaryDirectory() as tmp:
            for policy in policies:
                await _reset(s, sims)
                config = Path(tmp) / f"{policy}.yaml"
                _config(sims, policy, config)
                async with proxy([], config=str(config)) as front:
                    streamed = await _run_phase(s, front.url, sims, stream, 0)
                    batched = await _run_phase(s, front.url, sims, batch, len(stream))
                bound = _work_s(batched.stats) / capacity
                figures[policy] = {
                    "wait_mean_s": sum(streamed.waits) / len(streamed.waits),
                    "wait_p95_s": percentile(streamed.waits, 95),
                    "makespan_s": batched.makespan,
                    "lower_bound_s": bound,
                    "makespan_over_lower_bound": batched.makespan / bound,
                    "gpu_idle_fraction": 1 - sum(st["busy_s"] for st in batched.stats) / (len(sims) * batched.makespan),
                    "model_swaps": sum(st["model_swaps"] for st in streamed.stats + batched.stats),
                }
    return figures


async def run(quick: bool = False) -> BenchResult:
    step_ms, stream_n, batch_n = (10.0, 40, 24) if quick else (20.0, 300, 180)
    stream, batch = make_trace(stream_n, batch_n, step_ms)
    result = BenchResult("schedule", params={
        "backends": len(SPEEDS), "speeds": list(SPEEDS), "weights": 1.0, "max_inflight": MAX_INFLIGHT,
        "checkpoints": dict(zip(CHECKPOINTS, CHECKPOINT_SHARES, strict=True)), "steps": list(STEP_CHOICES),
        "step_ms": step_ms, "load_steps": LOAD_STEPS, "stream_prompts": stream_n, "stream_load": LOAD,
        "batch_prompts": batch_n, "seed": SEED, "policies": list(POLICIES)})
    figures = await measure(POLICIES, step_ms, stream, batch)
    units = {"wait_mean_s": "s", "wait_p95_s": "s", "makespan_s": "s", "lower_bound_s": "s",
             "makespan_over_lower_bound": "ratio", "gpu_idle_fraction": "fraction", "model_swaps": "count"}
    for policy, values in figures.items():
        for name, value in values.items():
            result.add(f"{policy}_{name}", value, units[name])
    ll, rr, lc = figures["least_loaded"], figures["round_robin"], figures["least_connections"]
    result.add("lower_bound_nominal_s", sum(p.steps for p in batch) * step_ms / 1000 / sum(SPEEDS), "s")
    result.add("p95_wait_ratio_vs_round_robin", ll["wait_p95_s"] / rr["wait_p95_s"], "ratio")
    result.add("makespan_over_lower_bound", ll["makespan_over_lower_bound"], "ratio")
    result.add("model_swaps_ratio_vs_least_connections", ll["model_swaps"] / max(lc["model_swaps"], 1), "ratio")
    return result
