"""Trouble that happens every day: Redis going away and coming back, bodies over the limit, forged refs."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from proxy.app import create_app
from proxy.config import BackendConfig, Config, SchedulerConfig, ServerConfig, StoreConfig
from tests import tools
from tests.client import ComfyClient, start_proxy, txt2img
from tests.conftest import TEARDOWN_S, free_port, listening, wait_until


def _redis(port: int, workdir: Path, persist: bool = False) -> subprocess.Popen[bytes]:
    binary = tools.tool("redis-server")
    durability = ["--appendonly", "yes", "--appendfsync", "always"] if persist else ["--appendonly", "no"]
    return subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *durability,
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _proxy_on(sim: Any, redis_port: int) -> Any:
    """A proxy on its own redis-server (these tests stop and start it)."""
    config = Config(backends=(BackendConfig(name="alpha", url=sim.url),),
                    store=StoreConfig(redis_url=f"redis://127.0.0.1:{redis_port}/0", key_prefix=uuid.uuid4().hex[:8]),
                    scheduler=SchedulerConfig(poll_interval_s=0.2))
    await wait_until(lambda: listening(redis_port), what="redis-server to listen")
    return await start_proxy(create_app(config))


async def test_redis_down_gives_503_then_recovers_by_itself(sims, tmp_path: Path) -> None:
    port = free_port()
    redis = _redis(port, tmp_path)
    handle = await _proxy_on(await sims("alpha"), port)
    try:
        async with ComfyClient(handle.url) as client:
            await client.connect()
            await client.wait_done(await client.queue_prompt(txt2img(1)))
            redis.terminate()
            redis.wait(timeout=10)
            start = time.monotonic()
            status, body = await client.post("/prompt", {"prompt": txt2img(2)})
            assert status == 503 and body["error"]["type"] == "store_unavailable"
            assert time.monotonic() - start < 1.0
            assert (await client.get("/proxy/readyz"))[0] == 503
            redis = _redis(port, tmp_path)

            async def admits() -> bool:
                return (await client.post("/prompt", {"prompt": txt2img(3), "client_id": client.client_id}))[0] == 200
            await wait_until(admits, timeout=15, what="admission after Redis came back")
    finally:
        await asyncio.wait_for(handle.close(), TEARDOWN_S)
        redis.terminate()
        redis.wait(timeout=10)


async def test_body_over_the_limit_is_413_in_comfyui_shape(sims) -> None:
    sim = await sims("alpha")
    config = Config(backends=(BackendConfig(name="alpha", url=sim.url),), server=ServerConfig(max_body_mb=1))
    handle = await start_proxy(create_app(config))
    try:
        async with ComfyClient(handle.url) as client:
            status, body = await client.post("/prompt", raw=b"{" + b" " * (2 * 1024 * 1024) + b"}")
            assert status == 413 and body["error"]["type"] == "payload_too_large"
    finally:
        await asyncio.wait_for(handle.close(), TEARDOWN_S)


@pytest.mark.parametrize("name", ["ComfyUI_00001_~aaaaaaaaaaaaaaaaaaaa.png", "ComfyUI_00001_.png",
                                  "x~abcdefghijklmnopqrst.png [output]"])
async def test_forged_references_find_nothing(sims, proxies, name: str) -> None:
    proxy = await proxies([await sims("alpha")])
    async with ComfyClient(proxy.url) as client:
        await client.connect()
        await client.wait_done(await client.queue_prompt(txt2img(1)))
        assert (await client.get_bytes("/view", filename=name, type="output"))[0] == 404


async def test_backend_dying_mid_run_loses_nothing(sims, proxies) -> None:
    a, b, c = await sims("alpha", step_ms=15), await sims("beta", step_ms=15), await sims("gamma", step_ms=15)
    proxy = await proxies([a, b, c], failover_after_s=0.5)
    async with ComfyClient(proxy.url) as client:
        await client.connect()
        ids = [await client.queue_prompt(txt2img(seed=i, steps=30)) for i in range(12)]

        async def alpha_running() -> bool:
            return any(r.backend == "alpha" and r.state == "running"
                       for r in await proxy.services.store.get_many(ids))
        await wait_until(alpha_running, what="a prompt running on alpha")
        on_alpha = [r.prompt_id for r in await proxy.services.store.get_many(ids) if r.backend == "alpha"]
        await client.post_to(a.url, "/sim/die", {})  # like SIGKILL: sockets cut, the running prompt gone
        await asyncio.gather(*(client.wait_done(pid, timeout=30) for pid in ids))
    records = await proxy.services.store.get_many(ids)
    assert all(r.outcome == "success" for r in records), [(r.prompt_id, r.outcome) for r in records]
    moved = [r for r in records if r.prompt_id in on_alpha]
    assert moved and all(r.backend in ("beta", "gamma") and r.attempts >= 2 for r in moved)
    retried = {m["data"]["prompt_id"] for m in client.messages_of_type("proxy_retry")}
    assert retried and retried <= set(on_alpha)


async def test_events_keep_flowing_while_redis_is_down(sims, tmp_path: Path) -> None:
    """Redis with AOF goes away mid-run and comes back with its data (a restart without persistence
    loses the queue and records: see README, "Several replicas")."""
    port = free_port()
    redis = _redis(port, tmp_path, persist=True)
    handle = await _proxy_on(await sims("alpha", step_ms=25), port)
    try:
        async with ComfyClient(handle.url) as client:
            await client.connect()
            pid = await client.queue_prompt(txt2img(1, steps=60))
            await client.wait_for(lambda f: f.type == "progress")
            redis.terminate()
            redis.wait(timeout=10)
            seen = len(client.messages_of_type("progress"))
            # The replica that holds the backend's socket keeps relaying without its store.
            await client.wait_for(lambda f: f.type == "progress" and f.text["data"]["value"] > seen + 5)
            redis = _redis(port, tmp_path, persist=True)
            await client.wait_done(pid, timeout=30)

            async def in_history() -> bool:
                status, body = await client.get(f"/history/{pid}")
                return status == 200 and pid in body
            await wait_until(in_history, timeout=20, what="the prompt's history after Redis came back")
    finally:
        await asyncio.wait_for(handle.close(), TEARDOWN_S)
        redis.terminate()
        redis.wait(timeout=10)


async def test_a_prompt_claimed_by_a_replica_that_died_is_sent_again(sims, proxies, monkeypatch) -> None:
    """A replica SIGKILLed between claiming a prompt and sending it leaves it pinned to a backend that never
    heard of it; the backend's upstream owner gives it back to the queue once that replica's presence
    lease is gone, and it runs. A claim by a live replica is left alone."""
    from proxy.relay import upstream

    monkeypatch.setattr(upstream, "ORPHAN_GRACE_S", 0.0)
    proxy = await proxies([await sims("alpha")])
    svc = proxy.services
    async with ComfyClient(proxy.url) as client:
        await client.connect()
        assert (await client.post("/proxy/backends/alpha/drain", {}))[0] == 200
        ghost, alive = await client.queue_prompt(txt2img(1)), await client.queue_prompt(txt2img(2))
        # A drained backend takes no claim (the store refuses it): lift the flag for these two claims only;
        # this replica's farm keeps alpha drained until its next poll, so its dispatcher claims nothing.
        await svc.store.set_drained("alpha", False)
        assert await svc.store.claim(ghost, "alpha", 4, by="replica-that-died")
        assert await svc.store.claim(alive, "alpha", 4, by=svc.dispatcher.replica)
        await svc.store.set_drained("alpha", True)
        await svc.upstreams["alpha"].sweep_orphans()
        ghost_rec, alive_rec = await svc.store.get_many([ghost, alive])
        assert ghost_rec.state == "queued" and ghost_rec.backend is None
        assert alive_rec.state == "dispatched" and alive_rec.backend == "alpha"
        assert (await client.post("/proxy/backends/alpha/undrain", {}))[0] == 200
        await client.wait_done(ghost, timeout=20)
    assert (await svc.store.get(ghost)).outcome == "success"
