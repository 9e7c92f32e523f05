"""`bench fairness`: a light tenant's queue wait while a heavy tenant floods the farm, against its wait on
the same farm without the flood.

The light tenant is light: it sends a batch of `BURST` prompts, waits for them, then thinks for
`THINK_S` before the next, so it asks for less than its fair share. A prompt's wait is from its POST
to its `execution_start` on the client's websocket. Backends take one prompt at a time (`max_inflight:
1`), so the flood cannot park prompts at a backend ahead of the light tenant's. The figure
`light_tenant_wait_ratio` is p95(with flood) / p95(without).

No scheduler that does not preempt can bring the ratio to 1: under the flood every backend is busy, so a
light batch first waits for running heavy prompts to end (up to one prompt each). With a batch as small
as the number of backends that residual alone is as long as the whole baseline wait, and the ratio
cannot go much below 1.7; a batch of four prompts per backend measures what the queue order does.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import yaml

from proxy.bench.load import percentile
from proxy.bench.overhead import image_prompt
from proxy.bench.procs import proxy, sim
from proxy.bench.result import BenchResult

BURST = 8
THINK_S = 1.0   # the light tenant's pause between batches: workload, not synchronisation
HEAVY, LIGHT = "heavy-key-0000000000", "light-key-0000000000"


async def light_waits(base: str, rounds: int, steps: int) -> list[float]:
    waits: list[float] = []
    headers = {"Authorization": f"Bearer {LIGHT}"}
    client_id = uuid.uuid4().hex
    async with aiohttp.ClientSession(headers=headers) as s, \
            s.ws_connect(f"{base.replace('http', 'ws', 1)}/ws?clientId={client_id}") as ws:
        for r in range(rounds):
            await asyncio.sleep(THINK_S)
            posted: dict[str, float] = {}
            for i in range(BURST):
                t = time.perf_counter()
                async with s.post(base + "/prompt", json={"prompt": image_prompt(1000 * r + i, 64, steps),
                                                          "client_id": client_id}) as resp:
                    posted[(await resp.json())["prompt_id"]] = t
            pending = set(posted)
            while pending:
                msg = await ws.receive(timeout=120)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                pid = data["data"].get("prompt_id") if isinstance(data.get("data"), dict) else None
                if data["type"] == "execution_start" and pid in posted:
                    waits.append(time.perf_counter() - posted[pid])
                if data["type"] == "executing" and data["data"].get("node") is None and pid in pending:
                    pending.discard(pid)
    return waits


async def flood(base: str, count: int, steps: int) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {HEAVY}"}) as s:
        for i in range(count):
            async with s.post(base + "/prompt", json={"prompt": image_prompt(50_000 + i, 64, steps)}) as resp:
                await resp.read()


def _config(backends: list[str], path: Path) -> None:
    path.write_text(yaml.safe_dump({
        "backends": [{"name": f"gpu-{i}", "url": url, "max_inflight": 1} for i, url in enumerate(backends)],
        "tenants": [{"name": "heavy", "api_keys": [HEAVY]}, {"name": "light", "api_keys": [LIGHT]}],
    }))


async def run(quick: bool = False) -> BenchResult:
    rounds, steps, flood_size = (2, 5, 60) if quick else (5, 10, 200)
    result = BenchResult("fairness", params={"burst": BURST, "think_s": THINK_S, "rounds": rounds, "steps": steps,
                                             "step_ms": 20, "flood": flood_size, "backends": 2, "max_inflight": 1})
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "fair.yaml"
        common = ("--step-ms", "20", "--no-previews", "--model-load-ms", "0")
        async with sim("a", *common) as a, sim("b", *common) as b:
            _config([a.url, b.url], config)
            async with proxy([], config=str(config)) as front:
                baseline = await light_waits(front.url, rounds, steps)
                await flood(front.url, flood_size, steps)
                flooded = await light_waits(front.url, rounds, steps)
    base95, flood95 = percentile(baseline, 95), percentile(flooded, 95)
    result.add("light_wait_p95_s_baseline", base95, "s")
    result.add("light_wait_p95_s_flooded", flood95, "s")
    result.add("light_tenant_wait_ratio", flood95 / base95, "ratio")
    return result



