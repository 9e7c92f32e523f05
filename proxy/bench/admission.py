"""`bench admission`: prompts admitted and carried to the end per second, Redis store, one proxy process,
fast simulated backends. Every prompt must end, so the figure counts dispatch and event handling too."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from proxy.bench import BenchResult
from proxy.bench.load import session
from proxy.bench.overhead import tiny_prompt
from proxy.bench.procs import proxy, redis_server, sim

BACKENDS = 4
MAX_INFLIGHT = 8   # fast backends finish in milliseconds: more slots keep them busy between events


async def run(quick: bool = False) -> BenchResult:
    total = 400 if quick else 3000
    concurrency = 32
    result = BenchResult("admission", params={"prompts": total, "concurrency": concurrency, "backends": BACKENDS,
                                              "max_inflight": MAX_INFLIGHT})
    fast = ("--step-ms", "0", "--no-previews")
    async with redis_server() as redis_url, sim("a", *fast) as a, sim("b", *fast) as b, sim("c", *fast) as c, \
            sim("d", *fast) as d:
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "admission.yaml"
            config.write_text(yaml.safe_dump({"backends": [{"name": p.url.rsplit(":", 1)[1], "url": p.url,
                                                            "max_inflight": MAX_INFLIGHT} for p in (a, b, c, d)]}))
            async with proxy([], "--redis", redis_url, config=str(config)) as front, session(concurrency) as s:
                await _drive(result, front.url, s, total, concurrency)
    return result


async def _drive(result: BenchResult, base: str, s: Any, total: int, concurrency: int) -> None:
    """Submit `total` prompts over `concurrency` connections; time admission and the last prompt's end."""
    counter = iter(range(total))
    start = time.perf_counter()

    async def submit() -> None:
        for i in counter:
            async with s.post(base + "/prompt", json={"prompt": tiny_prompt(i)}) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"POST /prompt answered {resp.status}")

    await asyncio.gather(*(submit() for _ in range(concurrency)))
    admitted = time.perf_counter() - start
    while True:
        async with s.get(base + "/prompt") as resp:
            if (await resp.json())["exec_info"]["queue_remaining"] == 0:
                break
        await asyncio.sleep(0.05)
    ended = time.perf_counter() - start
    result.add("admitted_per_second_redis", total / admitted, "prompts/s")
    result.add("prompts_per_second_redis", total / ended, "prompts/s")
