"""`bench scale`: one proxy replica, Redis, in front of hundreds of simulated backends that one process
runs (`comfy-proxy sim --count N`), on this machine.

Phases, each with a fresh Redis and proxy in front of the same simulators:
1. four backends: the idle RSS, and `prompts_per_second` (prompts carried to their end, the backends
   taking everything they are sent, as `bench admission` does);
2. all N: the idle RSS (`rss_kib_per_backend` = the difference ÷ the backends added), the same load
   (`prompts_per_second_redis`, and its ratio to phase 1), `dispatch_decision_p99_us` (the proxy's own
   histogram of choosing a backend for one prompt, every backend scored), then an idle window:
   `poll_requests_per_backend_per_min_idle` (requests the simulators answered for `/system_stats`,
   `/prompt` and `/object_info`, per backend and minute);
3. churn on the same proxy: a steady stream of prompts while backends leave (`DELETE`, drained) and
   others join (`POST`) at 50 a minute each; `lost_under_churn` counts prompts that did not finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import yaml

from proxy.bench.overhead import tiny_prompt
from proxy.bench.procs import Proc, proxy, redis_server, spawn
from proxy.bench.result import BenchResult

SLOTS = 1024                  # backends take everything they are sent: the proxy's pace
CHURN_PER_MIN = 50            # backends leaving, and as many joining, per minute
RAM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None


@contextlib.asynccontextmanager
async def sim_farm(count: int) -> AsyncIterator[list[str]]:
    """`count` fast simulators in one process, each on a free port it picked (read from what it prints)."""
    with tempfile.TemporaryDirectory(dir=RAM_DIR) as files:
        listing = Path(files) / "listening.txt"
        with listing.open("wb") as out:
            farm = Proc(spawn(["sim", "--count", str(count), "--port", "0", "--step-ms", "0", "--node-ms", "0",
                               "--model-load-ms", "0", "--no-previews", "--base-dir", files], stdout=out), "")
        try:
            yield await _listening(listing, count, farm)
        finally:
            farm.stop()


async def _listening(listing: Path, count: int, farm: Proc) -> list[str]:
    """The simulators' URLs, once all `count` have said where they listen."""
    deadline = time.monotonic() + 120
    while True:
        urls = re.findall(r" on (http://\S+)$", await asyncio.to_thread(listing.read_text), re.M)
        if len(urls) >= count:
            return urls
        if farm.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the simulators did not start: {len(urls)} of {count} listening")
        await asyncio.sleep(0.2)


def _config(folder: str, urls: list[str], redis_url: str, name: str) -> str:
    path = Path(folder) / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "backends": [{"name": f"b{url.rsplit(':', 1)[1]}", "url": url, "max_inflight": SLOTS} for url in urls],
        "redis": {"url": redis_url}, "store": {"finished_ttl_s": 600},
        # one simulator process answers every backend's first polls (object_info) at once
        "scheduler": {"backend_timeout_s": 30.0}}))
    return str(path)


async def run(quick: bool = False) -> BenchResult:
    backends = 100 if quick else 500
    prompts = 300 if quick else 2000
    idle_s = 35.0 if quick else 65.0
    churn_s = 20.0 if quick else 60.0
    result = BenchResult("scale", params={"backends": backends, "prompts": prompts, "idle_window_s": idle_s,
                                          "churn_s": churn_s, "churn_per_min": CHURN_PER_MIN})
    async with sim_farm(backends) as urls, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64)) as s:
        with tempfile.TemporaryDirectory() as tmp:
            async with redis_server() as redis_url, \
                    proxy([], config=_config(tmp, urls[:4], redis_url, "four"), ready_s=300) as front:
                await _settle(s, front.url, 4)
                rss_four = front.rss_kib()
                four = await _throughput(s, front.url, prompts)
            async with redis_server() as redis_url, \
                    proxy([], config=_config(tmp, urls[:-CHURN_PER_MIN], redis_url, "all"), ready_s=300) as front:
                active = len(urls) - CHURN_PER_MIN
                await _settle(s, front.url, active)
                rss_all = front.rss_kib()
                many = await _throughput(s, front.url, prompts)
                decision = await _decision_p99_us(s, front.url)
                polls = await _idle_polls(s, urls[:active], idle_s)
                lost = await _churn(s, front.url, urls, active, churn_s)
    result.add("backends", backends, "backends")
    result.add("prompts_per_second_redis_4", four, "prompts/s")
    result.add("prompts_per_second_redis", many, "prompts/s")
    result.add("prompts_per_second_ratio", many / four, "ratio")
    result.add("dispatch_decision_p99_us", decision, "µs")
    result.add("poll_requests_per_backend_per_min_idle", polls, "requests/min")
    result.add("rss_kib_per_backend", (rss_all - rss_four) / (active - 4), "KiB")
    result.add("lost_under_churn", lost, "prompts")
    return result


async def _settle(s: aiohttp.ClientSession, base: str, count: int) -> None:
    """Until every backend is available (polled, its socket open)."""
    deadline = time.monotonic() + 300
    while True:
        async with s.get(base + "/proxy/backends") as resp:
            body = await resp.json()
        up = sum(1 for b in body["backends"] if b["available"])
        if up >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{up} of {count} backends came up")
        await asyncio.sleep(0.5)


async def _post(s: aiohttp.ClientSession, base: str, seed: int) -> str:
    async with s.post(base + "/prompt", json={"prompt": tiny_prompt(seed)}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"POST /prompt answered {resp.status}: {await resp.text()}")
        return str((await resp.json())["prompt_id"])


async def _drained(s: aiohttp.ClientSession, base: str) -> None:
    while True:
        async with s.get(base + "/prompt") as resp:
            if (await resp.json())["exec_info"]["queue_remaining"] == 0:
                return
        await asyncio.sleep(0.05)


async def _throughput(s: aiohttp.ClientSession, base: str, total: int) -> float:
    """Prompts carried to their end per second, 32 at a time being posted."""
    seeds = iter(range(total))
    start = time.perf_counter()

    async def submit() -> None:
        for seed in seeds:
            await _post(s, base, seed)
    await asyncio.gather(*(submit() for _ in range(32)))
    await _drained(s, base)
    return total / (time.perf_counter() - start)


async def _decision_p99_us(s: aiohttp.ClientSession, base: str) -> float:
    """The 99th percentile of `comfy_proxy_dispatch_decision_seconds`, interpolated in its bucket."""
    async with s.get(base + "/metrics") as resp:
        text = await resp.text()
    buckets = sorted((float("inf") if le == "+Inf" else float(le), float(n)) for le, n in re.findall(
        r'^comfy_proxy_dispatch_decision_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M))
    total = buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= 0.99 * total:
            if le == float("inf"):
                return lower * 1e6
            share = (0.99 * total - below) / max(count - below, 1.0)
            return (lower + (le - lower) * share) * 1e6
        lower, below = le, count
    return float("nan")


async def _polled(s: aiohttp.ClientSession, urls: list[str]) -> int:
    async def one(url: str) -> int:
        async with s.get(url + "/sim/stats") as resp:
            return int((await resp.json())["polled"])
    return sum(await asyncio.gather(*(one(url) for url in urls)))


async def _idle_polls(s: aiohttp.ClientSession, urls: list[str], window_s: float) -> float:
    """Requests a backend answers for the proxy's polls per minute, while nothing happens."""
    await asyncio.sleep(5)   # the load's last polls
    before = await _polled(s, urls)
    await asyncio.sleep(window_s)
    after = await _polled(s, urls)
    return (after - before) / len(urls) / (window_s / 60)


def _url_of(name: str) -> str:
    """The simulator a backend name stands for (`b<port>` from the config, `127.0.0.1-<port>` once joined)."""
    return f"http://127.0.0.1:{re.sub(r'^(b|127.0.0.1-)', '', name)}"


async def _churn(s: aiohttp.ClientSession, base: str, urls: list[str], active: int, seconds: float) -> int:
    """Prompts at a steady pace while backends leave and join; how many did not finish successfully."""
    members = [f"b{url.rsplit(':', 1)[1]}" for url in urls[:active]]
    spares = list(urls[active:])
    pids: list[str] = []
    stop = time.monotonic() + seconds

    async def load() -> None:
        seed = 100_000
        while time.monotonic() < stop:
            pids.append(await _post(s, base, seed))
            seed += 1
            await asyncio.sleep(0.05)   # the stream's pace, not a synchronisation

    async def churn() -> None:
        every = 60.0 / CHURN_PER_MIN
        while time.monotonic() < stop:
            leaving = members.pop(0)
            async with s.delete(f"{base}/proxy/backends/{leaving}") as resp:
                if resp.status != 202:
                    raise RuntimeError(f"DELETE answered {resp.status}")
            joining = spares.pop(0)
            async with s.post(base + "/proxy/backends", json={"url": joining, "max_inflight": SLOTS}) as resp:
                if resp.status not in (200, 201):
                    raise RuntimeError(f"POST /proxy/backends answered {resp.status}: {await resp.text()}")
                members.append(str((await resp.json())["name"]))
            spares.append(_url_of(leaving))
            await asyncio.sleep(every)

    await asyncio.gather(load(), churn())
    await asyncio.wait_for(_drained(s, base), 120)
    finished = 0
    for i in range(0, len(pids), 200):
        batch = pids[i:i + 200]
        for pid in batch:
            async with s.get(f"{base}/history/{pid}") as resp:
                entry = (await resp.json()).get(pid)
            finished += bool(entry and entry["status"]["status_str"] == "success")
    return len(pids) - finished
