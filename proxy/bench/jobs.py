"""`bench jobs`: server-sent event streams (`GET /api/jobs/{id}/events`) held by one proxy process, and
what each costs in RSS: streams open on a job that waits in the proxy's queue (behind long prompts that
fill the backend's slots), so each is an idle stream, as most are most of the time.

Then webhook delivery latency: prompts run one after another, each naming a receiver in this process;
the latency is from the backend's end of the prompt (the job's `execution_end_time`, the backend's own
clock, on this machine) to the delivery's arrival, with the in-process store and with Redis."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from proxy.bench.load import open_many, percentile
from proxy.bench.overhead import image_prompt
from proxy.bench.procs import proxy, raise_fd_limit, redis_server, sim
from proxy.bench.result import BenchResult

BATCH = 250
SLOTS = 2   # the proxy's default max_inflight: this many long prompts keep the job queued


async def run(quick: bool = False) -> BenchResult:
    target = 2000 if quick else 10000
    limit = raise_fd_limit()
    result = BenchResult("jobs", params={"target": target, "fd_limit": limit})
    async with sim("busy", "--no-previews", "--step-ms", "1000") as backend, proxy([backend.url]) as front:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            for seed in range(SLOTS):
                await _post(s, front.url, image_prompt(seed, 64, steps=10_000))
            job = await _post(s, front.url, image_prompt(SLOTS, 64, steps=1))
            url = f"{front.url}/api/jobs/{job}/events"
            warm = await _open(s, url)   # the baseline includes what the first stream allocates
            await asyncio.sleep(0.5)
            before = front.rss_kib()
            streams = await open_many(lambda: _open(s, url), target, aiohttp.ClientResponse, result.params, BATCH)
            await asyncio.sleep(1.0)
            after = front.rss_kib()
            for resp in [*streams, warm]:
                resp.close()
    result.add("sse_streams_held", len(streams), "streams")
    result.add("kib_per_sse_stream", (after - before) / max(len(streams), 1), "KiB")
    hooks = 50 if quick else 300
    result.params["webhooks"] = hooks
    async with sim("hooks", "--no-previews", "--step-ms", "1") as backend:
        for kind in ("memory", "redis"):
            latencies = await _webhook_latencies(backend.url, kind, hooks)
            suffix = "" if kind == "memory" else "_redis"
            result.add(f"webhook_latency_ms_p50{suffix}", percentile(latencies, 50), "ms")
            result.add(f"webhook_latency_ms_p99{suffix}", percentile(latencies, 99), "ms")
    return result


@contextlib.asynccontextmanager
async def _receiver() -> AsyncIterator[tuple[str, asyncio.Queue[tuple[float, dict[str, Any]]]]]:
    """A webhook receiver in this process: (its URL, a queue of (arrival time, body))."""
    arrivals: asyncio.Queue[tuple[float, dict[str, Any]]] = asyncio.Queue()

    async def hook(request: web.Request) -> web.Response:
        arrived = time.time()
        arrivals.put_nowait((arrived, await request.json()))
        return web.Response()
    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]   # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/hook", arrivals
    finally:
        await runner.cleanup()


async def _webhook_latencies(backend: str, kind: str, count: int) -> list[float]:
    """Milliseconds from each prompt's end at its backend to its job.completed delivery."""
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    config: dict[str, Any] = {"backends": [backend], "store": {"key_prefix": f"bench-hooks-{kind}"},
                              "webhooks": {"secret": secret, "allow_cidrs": ["127.0.0.0/8"]}}
    async with contextlib.AsyncExitStack() as stack:
        if kind == "redis":
            config["redis"] = {"url": await stack.enter_async_context(redis_server())}
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        (folder / "hooks.yaml").write_text(yaml.safe_dump(config))
        front = await stack.enter_async_context(proxy([], config=str(folder / "hooks.yaml")))
        url, arrivals = await stack.enter_async_context(_receiver())
        s = await stack.enter_async_context(aiohttp.ClientSession())
        out: list[float] = []
        for seed in range(count + 5):   # the first few warm the proxy up
            body = {"prompt": image_prompt(seed, 64, steps=1),
                    "extra_data": {"webhook": {"url": url, "events": ["job.completed"]}}}
            async with s.post(front.url + "/prompt", json=body) as resp:
                assert resp.status == 200, await resp.text()
            arrived, delivery = await asyncio.wait_for(arrivals.get(), 30)
            if seed >= 5:
                out.append(arrived * 1000 - delivery["data"]["execution_end_time"])
        return out


async def _post(s: aiohttp.ClientSession, base: str, prompt: dict[str, object]) -> str:
    async with s.post(base + "/prompt", json={"prompt": prompt}) as resp:
        return str((await resp.json())["prompt_id"])


async def _open(s: aiohttp.ClientSession, url: str) -> aiohttp.ClientResponse:
    """A stream whose headers have come: the proxy holds it."""
    resp = await s.get(url, timeout=aiohttp.ClientTimeout(total=None, sock_connect=30))
    if resp.status != 200 or not resp.headers.get("Content-Type", "").startswith("text/event-stream"):
        resp.close()
        raise RuntimeError(f"GET {url} answered {resp.status}")
    return resp
