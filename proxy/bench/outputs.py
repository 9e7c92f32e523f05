"""`bench outputs`: what the file store (`outputs.store: dir`) costs and gives, against leaving files on
their backend (`outputs.store: backend`), two proxies in front of one simulated backend, in one run.

- `view_throughput_ratio_dir`: `/view` of a ~1 MiB image at 8 connections through the proxy that serves
  its copy ÷ through the proxy that streams it from the backend (goal ≥ 0.9).
- `copy_added_ms_p50` / `_p99`: how much later a client's `executing` null comes after the backend's own
  end of the prompt (the terminal message's timestamp in the backend's history), with copies ÷ without,
  for a prompt saving a ~1 MiB image, the two proxies taking turns (goals ≤ 5 ms and ≤ 50 ms).
"""

from __future__ import annotations

import asyncio
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

from proxy.bench.load import for_duration, get_body, percentile, session
from proxy.bench.overhead import image_prompt
from proxy.bench.procs import Proc, proxy, sim
from proxy.bench.result import BenchResult

SIDE = 688   # the simulator's noise stops compressing from about here: a ~1 MiB PNG
TERMINAL = ("execution_success", "execution_error", "execution_interrupted")


@contextlib.asynccontextmanager
async def proxy_with(backend: str, outputs: dict[str, Any]) -> AsyncIterator[Proc]:
    """A proxy of its own in front of `backend`: its own key prefix, so its own upstream client id (two
    proxies under one id would each get the other's events)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "outputs.yaml"
        config.write_text(yaml.safe_dump({"backends": [backend], "outputs": outputs,
                                          "store": {"key_prefix": f"bench-{outputs['store']}"}}))
        async with proxy([], config=str(config)) as front:
            yield front


async def end_delay(s: aiohttp.ClientSession, base: str, backend: str, seed: int) -> tuple[str, float]:
    """Run one prompt; (its id, seconds from the backend's end to this client's `executing` null)."""
    client_id = uuid.uuid4().hex
    async with s.ws_connect(f"{base.replace('http', 'ws', 1)}/ws?clientId={client_id}", max_msg_size=0) as ws:
        async with s.post(base + "/prompt", json={"prompt": image_prompt(seed, SIDE), "client_id": client_id}) as r:
            prompt_id = (await r.json())["prompt_id"]
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if (data["type"] == "executing" and data["data"].get("node") is None
                    and data["data"].get("prompt_id") == prompt_id):
                told = time.time()
                break
        else:
            raise RuntimeError("websocket closed before the prompt ended")
    async with s.get(f"{backend}/history/{prompt_id}") as resp:
        history = (await resp.json())[prompt_id]
    ended = next(d["timestamp"] for event, d in history["status"]["messages"] if event in TERMINAL) / 1000
    return prompt_id, told - ended


async def run(quick: bool = False) -> BenchResult:
    prompts = 20 if quick else 100
    seconds = 1.0 if quick else 3.0
    result = BenchResult("outputs", params={"prompts_each": prompts, "image_side": SIDE, "view_connections": 8,
                                            "seconds_per_rate_run": seconds})
    with tempfile.TemporaryDirectory() as folder:
        async with sim("bench", "--step-ms", "0", "--model-load-ms", "0") as backend, \
                proxy_with(backend.url, {"store": "dir", "dir": folder}) as kept, \
                proxy_with(backend.url, {"store": "backend"}) as left, session(16) as s:
            delays: dict[str, list[float]] = {kept.url: [], left.url: []}
            for i in range(prompts):
                for base in (kept.url, left.url) if i % 2 else (left.url, kept.url):
                    delays[base].append((await end_delay(s, base, backend.url, 1000 + i))[1])
            for q in (50, 99):
                added = percentile(delays[kept.url], q) - percentile(delays[left.url], q)
                result.add(f"copy_added_ms_p{q}", 1000 * added, "ms")
            result.add("end_to_client_ms_p50_dir", 1000 * percentile(delays[kept.url], 50), "ms")
            result.add("end_to_client_ms_p50_backend", 1000 * percentile(delays[left.url], 50), "ms")
            await _view_throughput(result, s, (kept.url, left.url, backend.url), seconds, prompts + 1)
    return result


async def _view_throughput(result: BenchResult, s: aiohttp.ClientSession, urls: tuple[str, str, str],
                           seconds: float, copies: int) -> None:
    """`copies`: files the kept proxy will have copied by the end of this (every prompt saves one)."""
    kept, left, backend = urls
    images: dict[str, dict[str, str]] = {}
    for base in (kept, left):
        prompt_id, _ = await end_delay(s, base, backend, 7)
        async with s.get(f"{base}/history/{prompt_id}") as resp:
            images[base] = (await resp.json())[prompt_id]["outputs"]["9"]["images"][0]
    await _wait_copied(s, kept, copies)
    throughput: dict[str, list[float]] = {kept: [], left: []}
    for base in (left, kept, left, kept):
        view = functools.partial(get_body, s, base + "/view", images[base])
        _, nbytes, elapsed = await for_duration(view, 8, seconds)
        throughput[base].append(nbytes / elapsed)
    result.params["view_bytes"] = await get_body(s, kept + "/view", images[kept])
    result.add("view_mb_per_s_dir", sum(throughput[kept]) / 2 / 1e6, "MB/s")
    result.add("view_mb_per_s_backend", sum(throughput[left]) / 2 / 1e6, "MB/s")
    result.add("view_throughput_ratio_dir", sum(throughput[kept]) / sum(throughput[left]), "ratio")


async def _wait_copied(s: aiohttp.ClientSession, base: str, files: int, timeout_s: float = 60.0) -> None:
    """Until the proxy has copied `files` files (its own counter): `/view` then serves copies only."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        async with s.get(base + "/metrics") as resp:
            text = await resp.text()
        copied = [line for line in text.splitlines() if line.startswith("comfy_proxy_output_copied_files_total ")]
        if copied and float(copied[0].split()[1]) >= files:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{files} files were not copied within {timeout_s} s")
