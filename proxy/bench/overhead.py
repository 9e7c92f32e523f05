"""`bench overhead`: the same simulated backend, direct and through the proxy (in-process store),
measured in one run and interleaved, so the ratios compare like with like.

The websocket stream is measured once more across two replicas sharing Redis, for each event bus
(`redis.events`): the client is on the replica that does not hold the backend's socket, so every event
crosses the bus (`ws_relay_ratio_streams`, `ws_relay_ratio_pubsub`, and their quotient
`ws_relay_streams_vs_pubsub`), the buses taking turns."""

from __future__ import annotations

import contextlib
import functools
import json
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from proxy.bench.load import for_duration, get_body, percentile, session, timed
from proxy.bench.procs import proxy, redis_server, sim
from proxy.bench.result import BenchResult


def tiny_prompt(seed: int) -> dict[str, Any]:
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": seed}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}


def image_prompt(seed: int, side: int, steps: int = 1, ckpt: str = "v1-5-pruned-emaonly.safetensors",
                 prefix: str = "bench") -> dict[str, Any]:
    """ComfyUI's default text-to-image graph at `side` pixels."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": side, "height": side, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "bench", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                                   "positive": ["6", 0], "negative": ["6", 0],
                                                   "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    }


async def run_to_end(s: aiohttp.ClientSession, base: str, prompt: dict[str, Any]) -> tuple[str, int, float]:
    """Queue a prompt with a websocket open; returns (prompt_id, frames received, seconds of the stream)."""
    client_id = uuid.uuid4().hex
    async with s.ws_connect(f"{base.replace('http', 'ws', 1)}/ws?clientId={client_id}", max_msg_size=0) as ws:
        async with s.post(base + "/prompt", json={"prompt": prompt, "client_id": client_id}) as resp:
            prompt_id = (await resp.json())["prompt_id"]
        frames, first = 0, 0.0
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                data = json.loads(msg.data)
                if data["type"] == "execution_start":
                    first = time.perf_counter()
                frames += 1
                if (data["type"] == "executing" and data["data"].get("node") is None
                        and data["data"].get("prompt_id") == prompt_id):
                    return prompt_id, frames, time.perf_counter() - first
            else:
                frames += 1
    raise RuntimeError("websocket closed before the prompt ended")


async def first_message(s: aiohttp.ClientSession, base: str) -> float:
    start = time.perf_counter()
    async with s.ws_connect(f"{base.replace('http', 'ws', 1)}/ws?clientId={uuid.uuid4().hex}") as ws:
        await ws.receive()
    return time.perf_counter() - start


async def run(quick: bool = False) -> BenchResult:
    n = 100 if quick else 400
    seconds = 1.0 if quick else 3.0
    result = BenchResult("overhead", params={"prompt_posts": n, "seconds_per_rate_run": seconds,
                                             "history_connections": 32, "view_connections": 8})
    async with sim("bench", "--step-ms", "0", "--model-load-ms", "0", "--preview-kib", "64") as backend, \
            proxy([backend.url]) as front, session(64) as s:
        # Prompt admission latency at one connection, interleaved.
        direct_lat: list[float] = []
        proxy_lat: list[float] = []
        for i in range(n):
            for base, sink in ((backend.url, direct_lat), (front.url, proxy_lat)):
                sink.append(await timed(functools.partial(_post, s, base + "/prompt", {"prompt": tiny_prompt(i)})))
        result.add("prompt_added_latency_p50_ms", 1000 * (percentile(proxy_lat, 50) - percentile(direct_lat, 50)), "ms")
        result.add("prompt_added_latency_p99_ms", 1000 * (percentile(proxy_lat, 99) - percentile(direct_lat, 99)), "ms")

        # History of one finished prompt at 32 connections.
        prompt_id, _, _ = await run_to_end(s, front.url, tiny_prompt(10_000))
        rates: dict[str, list[float]] = {}
        for base in (backend.url, front.url, backend.url, front.url):
            url = f"{base}/history/{prompt_id}"
            count, _, elapsed = await for_duration(functools.partial(get_body, s, url), 32, seconds)
            rates.setdefault(base, []).append(count / elapsed)
        result.add("history_rps_direct", sum(rates[backend.url]) / 2, "req/s")
        result.add("history_rps_ratio", sum(rates[front.url]) / sum(rates[backend.url]), "ratio")

        # A ~1 MiB image at 8 connections (the simulator's noise stops compressing from about 688 px).
        big_id, _, _ = await run_to_end(s, front.url, image_prompt(1, 688))
        async with s.get(f"{front.url}/history/{big_id}") as resp:
            image = (await resp.json())[big_id]["outputs"]["9"]["images"][0]
        async with s.get(f"{backend.url}/history/{big_id}") as resp:
            original = (await resp.json())[big_id]["outputs"]["9"]["images"][0]
        views = {backend.url: original, front.url: image}
        throughput: dict[str, list[float]] = {}
        size = 0
        for base in (backend.url, front.url, backend.url, front.url):
            params = {k: views[base][k] for k in ("filename", "subfolder", "type")}
            _, nbytes, elapsed = await for_duration(functools.partial(get_body, s, base + "/view", params), 8,
                                                    seconds)
            throughput.setdefault(base, []).append(nbytes / elapsed)
            size = await get_body(s, base + "/view", params)
        result.params["view_bytes"] = size
        result.add("view_mb_per_s_direct", sum(throughput[backend.url]) / 2 / 1e6, "MB/s")
        result.add("view_throughput_ratio", sum(throughput[front.url]) / sum(throughput[backend.url]), "ratio")

        # One prompt's stream of progress messages and previews.
        steps = 200 if quick else 1000
        stream: dict[str, float] = {backend.url: 0.0, front.url: 0.0}
        await run_to_end(s, backend.url, image_prompt(2, 512, steps=10))  # the checkpoint is loaded now
        for i, base in enumerate((backend.url, front.url, backend.url, front.url)):
            _, frames, elapsed = await run_to_end(s, base, image_prompt(3 + i, 512, steps=steps))
            stream[base] += frames / elapsed / 2
        result.params["stream_steps"] = steps
        result.params["preview_kib"] = 64
        result.add("ws_msgs_per_s_direct", stream[backend.url], "msg/s")
        result.add("ws_relay_ratio", stream[front.url] / stream[backend.url], "ratio")
        await _relay_across_replicas(result, s, backend.url, steps, rounds=1 if quick else 2)

        # Time to the first websocket message.
        firsts: dict[str, list[float]] = {backend.url: [], front.url: []}
        for _ in range(30 if quick else 100):
            for base in (backend.url, front.url):
                firsts[base].append(await first_message(s, base))
        result.add("ws_first_message_added_ms",
                   1000 * (percentile(firsts[front.url], 50) - percentile(firsts[backend.url], 50)), "ms")
    return result


async def _post(s: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> None:
    async with s.post(url, json=body) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"POST {url} answered {resp.status}")


async def _relay_across_replicas(result: BenchResult, s: aiohttp.ClientSession, backend: str, steps: int,
                                 rounds: int) -> None:
    """The stream through two replicas on one Redis, for each bus, in turns: direct, streams, pubsub,
    pubsub, streams, direct per round."""
    async with redis_server() as redis_url, replicas(backend, redis_url, "streams") as streams, \
            replicas(backend, redis_url, "pubsub") as pubsub:
        rates: dict[str, list[float]] = {backend: [], streams: [], pubsub: []}
        for i, base in enumerate((backend, streams, pubsub, pubsub, streams, backend) * rounds):
            _, frames, elapsed = await run_to_end(s, base, image_prompt(100 + i, 512, steps=steps))
            rates[base].append(frames / elapsed)
    direct = sum(rates[backend]) / len(rates[backend])
    across = {bus: sum(rates[url]) / len(rates[url]) for bus, url in (("streams", streams), ("pubsub", pubsub))}
    result.add("ws_relay_ratio_streams", across["streams"] / direct, "ratio")
    result.add("ws_relay_ratio_pubsub", across["pubsub"] / direct, "ratio")
    result.add("ws_relay_streams_vs_pubsub", across["streams"] / across["pubsub"], "ratio")


@contextlib.asynccontextmanager
async def replicas(backend: str, redis_url: str, events: str) -> AsyncIterator[str]:
    """Two proxy replicas on one Redis with `events` as their bus; yields the URL of the second. The
    first holds the backend's socket by the time it is ready, so events reach the second over the bus."""
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "replicas.yaml"
        config.write_text(yaml.safe_dump({"backends": [backend], "redis": {"url": redis_url, "events": events},
                                          "store": {"key_prefix": f"bench-{events}"}}))
        async with proxy([], config=str(config)), proxy([], config=str(config)) as second:
            yield second.url
