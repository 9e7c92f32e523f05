"""`bench admission`: prompts admitted and dispatched per second, Redis store, one proxy process, four
fast simulated backends (no sampling time, no node time, no previews), all on the same machine.

`prompts_per_second_redis` (the issue's figure) is the proxy's admission and dispatch capacity: from the
first `POST /prompt` until the backends have accepted every prompt (their `/sim/stats` `accepted`).
The backends take what they are sent (`max_inflight` 1024, more than the run sends to one), so the
figure is bounded by the proxy (admission, scheduling, claims, the `POST /prompt` to a backend) and by
the simulators answering, not by how fast the simulators finish; they still run every prompt meanwhile
and the proxy handles all of its events, so the CPU they take is in the figure.
`completed_per_second_redis` carries every prompt to its end.

The deep run is made with each event bus (`redis.events`), in turns (streams, pubsub, pubsub, streams),
and the figures are the means of each bus's two runs: the plain names are the default bus's (streams);
`prompts_per_second_redis_pubsub` and `proxy_cpu_ms_per_prompt_pubsub` are pub/sub's, and
`prompts_per_second_streams_vs_pubsub` their quotient.

`late_binding_prompts_per_second_redis` runs the same prompts with 8 slots per backend, the way a farm
is configured (PRODUCT.md, "Dispatch"): a prompt goes out only when a slot frees, so dispatch keeps the
pace of completion, which on two shared cores is set by everyone's CPU: each prompt costs the proxy
`proxy_cpu_ms_per_prompt` and its simulator `sim_cpu_ms_per_prompt` (both measured in the first run),
plus Redis and the load generator.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from proxy.bench.load import session
from proxy.bench.overhead import tiny_prompt
from proxy.bench.procs import proxy, redis_server, sim
from proxy.bench.result import BenchResult

BACKENDS = 4
DEEP_SLOTS = 1024        # backends take everything: the proxy's own pace
LATE_BINDING_SLOTS = 8   # a production-like farm: dispatch waits for free slots
FAST = ("--step-ms", "0", "--node-ms", "0", "--no-previews")
POLL_S = 0.02   # polls of GET /prompt (cheap), not synchronisation sleeps
RAM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None


async def run(quick: bool = False) -> BenchResult:
    total = 500 if quick else 3000
    concurrency = 32
    result = BenchResult("admission", params={"prompts": total, "concurrency": concurrency, "backends": BACKENDS,
                                              "max_inflight": DEEP_SLOTS,
                                              "late_binding_max_inflight": LATE_BINDING_SLOTS})
    runs: dict[str, list[dict[str, float]]] = {"streams": [], "pubsub": []}
    for events in ("streams", "pubsub", "pubsub", "streams"):
        runs[events].append(await _farm_run(total, concurrency, DEEP_SLOTS, events))
    deep, pubsub = _mean(runs["streams"]), _mean(runs["pubsub"])
    result.add("admitted_per_second_redis", deep["admitted"], "prompts/s")
    result.add("prompts_per_second_redis", deep["dispatched"], "prompts/s")
    result.add("completed_per_second_redis", deep["completed"], "prompts/s")
    result.add("proxy_cpu_ms_per_prompt", deep["proxy_cpu_ms"], "ms")
    result.add("sim_cpu_ms_per_prompt", deep["sim_cpu_ms"], "ms")
    result.add("prompts_per_second_redis_pubsub", pubsub["dispatched"], "prompts/s")
    result.add("proxy_cpu_ms_per_prompt_pubsub", pubsub["proxy_cpu_ms"], "ms")
    result.add("prompts_per_second_streams_vs_pubsub", deep["dispatched"] / pubsub["dispatched"], "ratio")
    late = await _farm_run(total, concurrency, LATE_BINDING_SLOTS, "streams")
    result.add("late_binding_prompts_per_second_redis", late["dispatched"], "prompts/s")
    return result


def _mean(runs: list[dict[str, float]]) -> dict[str, float]:
    return {name: sum(run[name] for run in runs) / len(runs) for name in runs[0]}


async def _farm_run(total: int, concurrency: int, max_inflight: int, events: str) -> dict[str, float]:
    """Fresh Redis, simulators and proxy; `total` prompts through them. The simulators keep their files
    (a PNG per prompt, as ComfyUI's PreviewImage writes) in RAM where there is a tmpfs: on this VM's disk
    creating a file costs more than the proxy's whole share of a prompt, and the disk is not what is
    measured."""
    with tempfile.TemporaryDirectory(dir=RAM_DIR) as files, tempfile.TemporaryDirectory() as tmp:
        dirs = {name: os.path.join(files, name) for name in "abcd"}
        async with redis_server() as redis_url, \
                sim("a", *FAST, "--base-dir", dirs["a"]) as a, sim("b", *FAST, "--base-dir", dirs["b"]) as b, \
                sim("c", *FAST, "--base-dir", dirs["c"]) as c, sim("d", *FAST, "--base-dir", dirs["d"]) as d:
            sims = (a, b, c, d)
            config = Path(tmp) / "admission.yaml"
            config.write_text(yaml.safe_dump({"backends": [{"name": p.url.rsplit(":", 1)[1], "url": p.url,
                                                            "max_inflight": max_inflight} for p in sims],
                                              "redis": {"events": events}}))
            async with proxy([], "--redis", redis_url, config=str(config)) as front, session(concurrency) as s:
                cpu = front.cpu_seconds(), sum(p.cpu_seconds() for p in sims)
                figures = await _drive(front.url, [p.url for p in sims], s, total, concurrency)
                figures["proxy_cpu_ms"] = 1000 * (front.cpu_seconds() - cpu[0]) / total
                figures["sim_cpu_ms"] = 1000 * (sum(p.cpu_seconds() for p in sims) - cpu[1]) / total
                return figures
    raise AssertionError("unreachable")


async def _drive(base: str, sims: list[str], s: Any, total: int, concurrency: int) -> dict[str, float]:
    """Submit `total` prompts over `concurrency` connections; time admission, dispatch and the end."""
    # Bodies are made before the clock starts: the load generator shares the two cores.
    bodies = iter([json.dumps({"prompt": tiny_prompt(i)}).encode() for i in range(total)])
    headers = {"Content-Type": "application/json"}
    start = time.perf_counter()

    async def submit() -> None:
        for body in bodies:
            async with s.post(base + "/prompt", data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"POST /prompt answered {resp.status}")

    await asyncio.gather(*(submit() for _ in range(concurrency)))
    admitted = time.perf_counter() - start
    while await _accepted(s, sims) < total:  # noqa: ASYNC110 (other processes' counters: polled)
        await asyncio.sleep(POLL_S)
    dispatched = time.perf_counter() - start
    while True:
        async with s.get(base + "/prompt") as resp:
            if (await resp.json())["exec_info"]["queue_remaining"] == 0:
                break
        await asyncio.sleep(POLL_S)
    ended = time.perf_counter() - start
    return {"admitted": total / admitted, "dispatched": total / dispatched, "completed": total / ended}


async def _accepted(s: Any, sims: list[str]) -> int:
    """Prompts the backends have queued: what the proxy counts as dispatched, seen from their side (and
    cheaper to ask than the proxy's /metrics, which renders every series)."""
    total = 0
    for url in sims:
        async with s.get(url + "/sim/stats") as resp:
            total += int((await resp.json())["accepted"])
    return total
