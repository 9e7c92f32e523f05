"""`bench admission`: prompts admitted and carried to the end per second, Redis store, one proxy process,
fast simulated backends. Every prompt must end, so the figure counts dispatch and event handling too."""

from __future__ import annotations

import asyncio
import time

from proxy.bench import BenchResult
from proxy.bench.load import session
from proxy.bench.overhead import tiny_prompt
from proxy.bench.procs import proxy, redis_server, sim

BACKENDS = 4


async def run(quick: bool = False) -> BenchResult:
    total = 400 if quick else 3000
    concurrency = 32
    result = BenchResult("admission", params={"prompts": total, "concurrency": concurrency, "backends": BACKENDS})
    async with redis_server() as redis_url, sim("a", "--step-ms", "0", "--no-previews") as a, \
            sim("b", "--step-ms", "0", "--no-previews") as b, sim("c", "--step-ms", "0", "--no-previews") as c, \
            sim("d", "--step-ms", "0", "--no-previews") as d, \
            proxy([a.url, b.url, c.url, d.url], "--redis", redis_url) as front, session(concurrency) as s:
        counter = iter(range(total))
        start = time.perf_counter()

        async def submit() -> None:
            for i in counter:
                async with s.post(front.url + "/prompt", json={"prompt": tiny_prompt(i)}) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"POST /prompt answered {resp.status}")

        await asyncio.gather(*(submit() for _ in range(concurrency)))
        admitted = time.perf_counter() - start
        while True:
            async with s.get(front.url + "/prompt") as resp:
                if (await resp.json())["exec_info"]["queue_remaining"] == 0:
                    break
            await asyncio.sleep(0.05)
        ended = time.perf_counter() - start
    result.add("admitted_per_second_redis", total / admitted, "prompts/s")
    result.add("prompts_per_second_redis", total / ended, "prompts/s")
    return result
