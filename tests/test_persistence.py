"""Redis with AOF, as the compose file and the Kubernetes base run it (`--appendonly yes`): a Redis SIGKILLed
and started again from its append-only file gives the proxy back its queued prompts, the history of those
that ended and their file references; the queued ones then run."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from proxy.app import create_app
from proxy.config import BackendConfig, Config, SchedulerConfig, StoreConfig
from tests.client import ComfyClient, start_proxy, txt2img
from tests.conftest import TEARDOWN_S, wait_until
from tests.test_bus import RedisServer


def output_of(history: dict[str, Any]) -> dict[str, str]:
    image = next(iter(history["outputs"].values()))["images"][0]
    return {k: image[k] for k in ("filename", "subfolder", "type")}


async def test_an_aof_redis_killed_and_started_again_keeps_the_queue_history_and_files(
        sims: Any, tmp_path: Path) -> None:
    # `always` fsyncs each write before it is acknowledged; the deploy files keep Redis's `everysec`, which
    # may lose the last second of writes, so the test syncs on every write instead of on the clock.
    redis = RedisServer(tmp_path, "--appendonly", "yes", "--appendfsync", "always")
    await redis.start()
    alpha = await sims("alpha")
    config = Config(backends=(BackendConfig(name="alpha", url=alpha.url),),
                    store=StoreConfig(redis_url=redis.url, key_prefix=f"aof-{uuid.uuid4().hex[:8]}"),
                    scheduler=SchedulerConfig(poll_interval_s=0.2))
    proxy = await start_proxy(create_app(config))
    try:
        async with ComfyClient(proxy.url) as client:
            await client.connect()
            done = [await client.queue_prompt(txt2img(seed)) for seed in (1, 2)]
            for prompt_id in done:
                await client.wait_done(prompt_id)
            histories = {p: (await client.get(f"/history/{p}"))[1][p] for p in done}
            images = {p: await client.get_bytes("/view", **output_of(h)) for p, h in histories.items()}
            assert all(status == 200 and body.startswith(b"\x89PNG") for status, body in images.values())
            assert (await client.post("/proxy/backends/alpha/drain", {}))[0] == 200
            queued = [await client.queue_prompt(txt2img(seed)) for seed in (3, 4, 5)]

            redis.kill()
            await redis.start()

            async def store_back() -> bool:   # (readyz stays 503: the only backend is drained)
                return (await client.get("/queue"))[0] == 200
            await wait_until(store_back, timeout=20, what="the proxy to find Redis again")
            pending = (await client.get("/queue"))[1]["queue_pending"]
            assert sorted(item[1] for item in pending) == sorted(queued)
            for prompt_id, history in histories.items():
                assert (await client.get(f"/history/{prompt_id}"))[1][prompt_id]["outputs"] == history["outputs"]
                assert await client.get_bytes("/view", **output_of(history)) == images[prompt_id]
            assert (await client.post("/proxy/backends/alpha/undrain", {}))[0] == 200
            for prompt_id in queued:
                await client.wait_done(prompt_id, timeout=30)
    finally:
        await asyncio.wait_for(proxy.close(), TEARDOWN_S)
        redis.kill()
