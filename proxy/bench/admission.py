"""`bench admission`: prompts admitted and dispatched per second, Redis store, one proxy process, four
fast simulated backends (no sampling time, no node time, no previews).

`prompts_per_second_redis` (the issue's figure) is the admission and dispatch rate: from the first
`POST /prompt` until a backend has accepted every prompt (`comfy_proxy_prompts_dispatched_total`), with
`MAX_INFLIGHT` slots per backend, so dispatch keeps pace with the backends as late binding does in
production. `completed_per_second_redis` carries every prompt to its end as well. On a two-core machine
both are bounded by CPU: the four simulators share the cores with the proxy and Redis and each spends
about 3.4 ms of CPU per prompt (validation, execution, history, events), the proxy about 4 ms.
Deeper backend queues (`max_inflight` in the hundreds) were measured and are slower: the simulators'
queue handling and status broadcasts then take more of the shared CPU.
"""

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
FAST = ("--step-ms", "0", "--node-ms", "0", "--no-previews")
POLL_S = 0.02   # polls of GET /prompt (cheap), not synchronisation sleeps
METRICS_POLL_S = 0.1   # /metrics renders every series: polled less often, at most 0.1 s late


async def run(quick: bool = False) -> BenchResult:
    total = 500 if quick else 3000
    concurrency = 32
    result = BenchResult("admission", params={"prompts": total, "concurrency": concurrency, "backends": BACKENDS,
                                              "max_inflight": MAX_INFLIGHT})
    async with redis_server() as redis_url, sim("a", *FAST) as a, sim("b", *FAST) as b, sim("c", *FAST) as c, \
            sim("d", *FAST) as d:
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "admission.yaml"
            config.write_text(yaml.safe_dump({"backends": [{"name": p.url.rsplit(":", 1)[1], "url": p.url,
                                                            "max_inflight": MAX_INFLIGHT}
                                                           for p in (a, b, c, d)]}))
            async with proxy([], "--redis", redis_url, config=str(config)) as front, session(concurrency) as s:
                await _drive(result, front.url, s, total, concurrency)
    return result


async def _drive(result: BenchResult, base: str, s: Any, total: int, concurrency: int) -> None:
    """Submit `total` prompts over `concurrency` connections; time admission, dispatch and the end."""
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
    while await _dispatched(s, base) < total:  # noqa: ASYNC110 (another process's counter: polled)
        await asyncio.sleep(METRICS_POLL_S)
    dispatched = time.perf_counter() - start
    while True:
        async with s.get(base + "/prompt") as resp:
            if (await resp.json())["exec_info"]["queue_remaining"] == 0:
                break
        await asyncio.sleep(POLL_S)
    ended = time.perf_counter() - start
    result.add("admitted_per_second_redis", total / admitted, "prompts/s")
    result.add("prompts_per_second_redis", total / dispatched, "prompts/s")
    result.add("completed_per_second_redis", total / ended, "prompts/s")


async def _dispatched(s: Any, base: str) -> float:
    async with s.get(base + "/metrics") as resp:
        text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("comfy_proxy_prompts_dispatched_total{"))
