"""`bench jobs`: server-sent event streams (`GET /api/jobs/{id}/events`) held by one proxy process, and
what each costs in RSS: streams open on a job that waits in the proxy's queue (behind long prompts that
fill the backend's slots), so each is an idle stream, as most are most of the time."""

from __future__ import annotations

import asyncio

import aiohttp

from proxy.bench.load import open_many
from proxy.bench.overhead import image_prompt
from proxy.bench.procs import proxy, raise_fd_limit, sim
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
    return result


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
