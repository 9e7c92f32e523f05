"""`bench soak --minutes M`: a steady mixed load for M minutes against two proxy replicas sharing a private
Redis, sampling what would creep if something leaked.

The load, all at once and all the time: four clients that keep a websocket open, each posting a prompt
(5 steps, a 64-pixel image) and waiting for its end before the next; short-lived websockets opened and
closed on either replica; `/history` (the list and single entries) and `/view` of finished outputs; and
`/upload/image` of small PNGs. Every `SAMPLE_S` each replica's RSS, open file descriptors and asyncio tasks
(its `comfy_proxy_asyncio_tasks` gauge) and Redis's `used_memory` are read. The first `WARMUP_FRACTION`
of the run is left out, then a least-squares line through the rest gives each slope, per 10 minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import os
import random
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
import yaml

from proxy.bench.overhead import image_prompt
from proxy.bench.procs import Proc, proxy, redis_server, sim
from proxy.bench.result import BenchResult
from proxy.sim.images import encode_png

SAMPLE_S = 10.0
QUICK_SAMPLE_S = 2.0
WARMUP_FRACTION = 0.2
CLIENTS = 4
STEPS = 5
PER_10_MIN = 600.0


@dataclass
class Samples:
    """One series per measured quantity: (seconds since start, value)."""

    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def add(self, name: str, at: float, value: float) -> None:
        self.series.setdefault(name, []).append((at, value))

    def slope(self, name: str, after: float) -> float:
        """Least-squares slope of the samples taken after `after` seconds, per 10 minutes."""
        points = [(t, v) for t, v in self.series.get(name, []) if t >= after]
        if len(points) < 2:
            return 0.0
        mean_t = sum(t for t, _ in points) / len(points)
        mean_v = sum(v for _, v in points) / len(points)
        spread = sum((t - mean_t) ** 2 for t, _ in points)
        return 0.0 if spread == 0 else sum((t - mean_t) * (v - mean_v) for t, v in points) / spread * PER_10_MIN

    def last(self, name: str) -> float:
        return self.series[name][-1][1] if self.series.get(name) else 0.0

    def peak(self, name: str) -> float:
        return max((v for _, v in self.series.get(name, [])), default=0.0)


@dataclass
class Tally:
    completed: int = 0
    failed: int = 0            # answers that were not what ComfyUI gives (a 5xx, a broken socket)
    reads: int = 0
    uploads: int = 0
    sockets: int = 0
    outputs: list[dict[str, str]] = field(default_factory=list)   # finished images to read back
    prompt_ids: list[str] = field(default_factory=list)


def _png() -> bytes:
    """A 1×1 PNG of a random colour, so uploads do not deduplicate."""
    return encode_png(1, 1, bytes(random.randrange(256) for _ in range(3)))


async def _prompter(s: aiohttp.ClientSession, base: str, seeds: itertools.count[int], tally: Tally) -> None:
    """One client with a websocket kept open: a prompt, its end, the next."""
    client_id = uuid.uuid4().hex
    async with s.ws_connect(f"{base.replace('http', 'ws', 1)}/ws?clientId={client_id}", max_msg_size=0) as ws:
        while True:
            async with s.post(base + "/prompt", json={"prompt": image_prompt(next(seeds), 64, STEPS),
                                                      "client_id": client_id}) as resp:
                if resp.status != 200:
                    tally.failed += 1
                    await asyncio.sleep(1)
                    continue
                prompt_id = (await resp.json())["prompt_id"]
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    data = msg.json()
                    body = data.get("data") or {}
                    if data["type"] == "executed" and body.get("prompt_id") == prompt_id:
                        tally.outputs.extend(body["output"].get("images", []))
                        del tally.outputs[:-200]
                    if data["type"] == "executing" and body.get("node") is None and body.get("prompt_id") == prompt_id:
                        tally.completed += 1
                        tally.prompt_ids.append(prompt_id)
                        del tally.prompt_ids[:-200]
                        break


async def _short_sockets(s: aiohttp.ClientSession, bases: list[str], tally: Tally) -> None:
    """Websockets that open, get their first `status`, and close: a browser tab that comes and goes."""
    while True:
        base = random.choice(bases)
        async with s.ws_connect(f"{base.replace('http', 'ws', 1)}/ws?clientId={uuid.uuid4().hex}") as ws:
            msg = await ws.receive(timeout=30)
            if msg.type != aiohttp.WSMsgType.TEXT:
                tally.failed += 1
        tally.sockets += 1
        await asyncio.sleep(0.2)


async def _reader(s: aiohttp.ClientSession, bases: list[str], tally: Tally) -> None:
    """History lists, single entries and images of finished prompts, from either replica."""
    while True:
        base = random.choice(bases)
        requests: list[tuple[str, dict[str, str]]] = [("/history", {"max_items": "20"})]
        if tally.prompt_ids:
            requests.append((f"/history/{random.choice(tally.prompt_ids)}", {}))
        if tally.outputs:
            image = random.choice(tally.outputs)
            requests.append(("/view", {k: image[k] for k in ("filename", "subfolder", "type")}))
        for path, params in requests:
            async with s.get(base + path, params=params) as resp:
                await resp.read()
                tally.failed += resp.status != 200
                tally.reads += 1
        await asyncio.sleep(0.1)


async def _uploader(s: aiohttp.ClientSession, bases: list[str], tally: Tally) -> None:
    while True:
        form = aiohttp.FormData()
        form.add_field("image", io.BytesIO(_png()), filename=f"soak-{uuid.uuid4().hex[:8]}.png",
                       content_type="image/png")
        async with s.post(random.choice(bases) + "/upload/image", data=form) as resp:
            await resp.read()
            tally.failed += resp.status != 200
            tally.uploads += 1
        await asyncio.sleep(1.0)


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _tasks_gauge(s: aiohttp.ClientSession, base: str) -> float:
    async with s.get(base + "/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith("comfy_proxy_asyncio_tasks "):
                return float(line.split()[-1])
    return 0.0


async def _sample(s: aiohttp.ClientSession, replicas: list[Proc], redis: Any, samples: Samples, at: float) -> None:
    for i, replica in enumerate(replicas, 1):
        samples.add(f"rss_mib_{i}", at, replica.rss_kib() / 1024)
        samples.add(f"fds_{i}", at, _open_fds(replica.pid))
        samples.add(f"tasks_{i}", at, await _tasks_gauge(s, replica.url))
    samples.add("redis_mib", at, (await redis.info("memory"))["used_memory"] / 2**20)


async def run(quick: bool = False, minutes: float | None = None) -> BenchResult:
    minutes = minutes if minutes is not None else (1.0 if quick else 30.0)
    every = QUICK_SAMPLE_S if minutes < 5 else SAMPLE_S
    result = BenchResult("soak", params={"minutes": minutes, "sample_s": every, "warmup_fraction": WARMUP_FRACTION,
                                         "clients": CLIENTS, "steps": STEPS})
    samples, tally = Samples(), Tally()
    with tempfile.TemporaryDirectory() as work:
        async with redis_server() as redis_url, sim("soak-a", "--step-ms", "20") as a, \
                sim("soak-b", "--step-ms", "20") as b:
            config = Path(work) / "proxy.yaml"
            config.write_text(yaml.safe_dump({
                "backends": [{"name": "a", "url": a.url}, {"name": "b", "url": b.url}],
                "redis": {"url": redis_url}, "store": {"key_prefix": "soak", "finished_ttl_s": 120}}))
            async with proxy([], config=str(config)) as one, proxy([], config=str(config)) as two:
                await _drive([one, two], redis_url, minutes * 60, every=every, samples=samples, tally=tally)
    warm = minutes * 60 * WARMUP_FRACTION
    for i in (1, 2):
        result.add(f"rss_slope_mib_per_10min_{i}", samples.slope(f"rss_mib_{i}", warm), "MiB/10 min")
        result.add(f"fds_slope_per_10min_{i}", samples.slope(f"fds_{i}", warm), "fds/10 min")
        result.add(f"tasks_slope_per_10min_{i}", samples.slope(f"tasks_{i}", warm), "tasks/10 min")
        result.add(f"rss_mib_{i}", samples.last(f"rss_mib_{i}"), "MiB")
        result.add(f"fds_{i}", samples.last(f"fds_{i}"), "fds")
        result.add(f"tasks_{i}", samples.last(f"tasks_{i}"), "tasks")
    result.add("redis_memory_slope_mib_per_10min", samples.slope("redis_mib", warm), "MiB/10 min")
    result.add("redis_memory_peak_mib", samples.peak("redis_mib"), "MiB")
    result.add("prompts_completed", tally.completed, "prompts")
    result.add("reads", tally.reads, "requests")
    result.add("uploads", tally.uploads, "files")
    result.add("short_sockets", tally.sockets, "sockets")
    result.add("failed", tally.failed, "requests")
    result.add("samples", len(samples.series.get("rss_mib_1", [])), "samples")
    result.params["series"] = {name: [[round(t), round(v, 2)] for t, v in points]
                               for name, points in samples.series.items()}
    return result


async def _drive(replicas: list[Proc], redis_url: str, seconds: float, *, every: float, samples: Samples,
                 tally: Tally) -> None:
    bases = [r.url for r in replicas]
    seeds = itertools.count()
    redis = aioredis.from_url(redis_url)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as s:
        load = [asyncio.create_task(_prompter(s, bases[i % 2], seeds, tally)) for i in range(CLIENTS)]
        load += [asyncio.create_task(coro) for coro in (_short_sockets(s, bases, tally), _reader(s, bases, tally),
                                                         _uploader(s, bases, tally))]
        started = time.monotonic()
        try:
            while (at := time.monotonic() - started) < seconds:
                await _sample(s, replicas, redis, samples, at)
                for task in load:
                    if task.done():   # a load task that broke is a finding, not something to hide
                        task.result()
                await asyncio.sleep(every)
        finally:
            for task in load:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await asyncio.gather(*load, return_exceptions=True)
            await redis.aclose()
