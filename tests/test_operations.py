"""Operators' actions under load: draining a backend, reloading the config, request ids in logs."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import aiohttp
import yaml

from proxy.app import create_app
from proxy.backends import Farm, SharedFlags
from proxy.config import BackendConfig, load_config
from tests.client import ComfyClient, start_proxy, txt2img
from tests.conftest import TEARDOWN_S, wait_until


async def test_drain_under_load_sends_nothing_new_and_loses_nothing(sims, proxies) -> None:
    a, b = await sims("alpha", step_ms=10), await sims("beta", step_ms=10)
    proxy = await proxies([a, b])
    async with ComfyClient(proxy.url) as client:
        await client.connect()
        first = [await client.queue_prompt(txt2img(seed=i, steps=6)) for i in range(8)]
        status, state = await client.post("/proxy/backends/alpha/drain", {})
        assert status == 200 and state["draining"] is True and state["available"] is False
        later = [await client.queue_prompt(txt2img(seed=100 + i, steps=6)) for i in range(8)]
        await asyncio.gather(*(client.wait_done(pid, timeout=30) for pid in first + later))
        records = await proxy.services.store.get_many(first + later)
        assert all(r.outcome == "success" for r in records)  # nothing lost
        assert {r.backend for r in records if r.prompt_id in later} == {"beta"}  # nothing new went there
        assert any(r.backend == "alpha" for r in records if r.prompt_id in first)  # it was in use before
        status, body = await client.get("/proxy/backends")
        alpha = next(b for b in body["backends"] if b["name"] == "alpha")
        assert alpha["draining"] is True and alpha["inflight"] == 0  # drained, then idle
        await client.post("/proxy/backends/alpha/undrain", {})
        await wait_until(lambda: _available(client, "alpha"), what="alpha back in service")


async def test_a_poll_that_read_the_flags_before_a_drain_does_not_undo_it(sims) -> None:
    """The poller reads the shared drain flags with an await in between; an operator's drain landing in
    that gap is newer than what the poll read, and must survive until the next poll reads it back."""
    alpha = await sims("alpha")
    reading, release = asyncio.Event(), asyncio.Event()

    async def drained_before_the_operator() -> set[str]:
        reading.set()
        await release.wait()
        return set()

    async def no_holders() -> dict[str, str]:
        return {}

    async with aiohttp.ClientSession() as session:
        farm = Farm(backends=(BackendConfig(name="alpha", url=alpha.url),), session=session)
        farm.follow_shared_flags(SharedFlags(drained_before_the_operator, no_holders, str, "me"))
        poll = asyncio.create_task(farm.poll_once())
        await asyncio.wait_for(reading.wait(), 5)
        farm.set_draining("alpha", True)
        release.set()
        await asyncio.wait_for(poll, 5)
        state = farm.get("alpha")
        assert state is not None and state.draining


async def _available(client: ComfyClient, name: str) -> bool:
    _, body = await client.get("/proxy/backends")
    return any(b["name"] == name and b["available"] for b in body["backends"])


async def test_reload_adds_and_removes_backends_without_losing_prompts(sims, store_config, tmp_path: Path) -> None:
    a, b = await sims("alpha", step_ms=10), await sims("beta", step_ms=10)
    path = tmp_path / "proxy.yaml"

    def write(*backends) -> None:  # type: ignore[no-untyped-def]
        path.write_text(yaml.safe_dump({
            "backends": [{"name": s.name, "url": s.url} for s in backends],
            "scheduler": {"poll_interval_s": 0.5},
            "store": {"key_prefix": store_config.key_prefix},
            **({"redis": {"url": store_config.redis_url}} if store_config.redis_url else {}),
        }))

    write(a)
    handle = await start_proxy(create_app(load_config(path), config_path=str(path)))
    try:
        async with ComfyClient(handle.url) as client:
            await client.connect()
            running = [await client.queue_prompt(txt2img(seed=i, steps=10)) for i in range(4)]
            write(b)  # alpha removed, beta added
            status, body = await client.post("/proxy/reload", {})
            assert status == 200 and body == {"added": ["beta"], "removed": ["alpha"], "changed": [],
                                              "workflows": []}
            # It takes prompts within two poll intervals of the reload.
            await wait_until(lambda: _available(client, "beta"), timeout=2 * 0.5, what="beta available")
            later = [await client.queue_prompt(txt2img(seed=50 + i)) for i in range(4)]
            await asyncio.gather(*(client.wait_done(pid, timeout=30) for pid in running + later))
            records = await handle.services.store.get_many(running + later)
            assert all(r.outcome == "success" for r in records)
            assert Counter(r.backend for r in records if r.prompt_id in later) == {"beta": 4}
            await wait_until(lambda: _gone(client, "alpha"), what="alpha retired")
            path.write_text("backends: [{url: 'nope'}]")
            status, body = await client.post("/proxy/reload", {})
            assert status == 400 and body["error"]["type"] == "invalid_config"
    finally:
        await asyncio.wait_for(handle.close(), TEARDOWN_S)


async def _gone(client: ComfyClient, name: str) -> bool:
    _, body = await client.get("/proxy/backends")
    return all(b["name"] != name for b in body["backends"])


async def test_request_ids_and_prompt_context_in_logs(sims, proxies) -> None:
    import structlog

    proxy = await proxies([await sims("alpha")])
    async with ComfyClient(proxy.url, headers={"X-Request-Id": "trace-123"}) as client:
        await client.connect()
        with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
            assert client.session is not None
            async with client.session.post(client.base + "/prompt",
                                           json={"prompt": txt2img(1), "client_id": client.client_id}) as resp:
                assert resp.headers["X-Request-Id"] == "trace-123"
                pid = (await resp.json())["prompt_id"]
            await client.wait_done(pid)
        async with client.session.get(client.base + "/queue", headers={"X-Request-Id": "bad id;<x>"}) as resp:
            assert resp.headers["X-Request-Id"] != "bad id;<x>" and len(resp.headers["X-Request-Id"]) == 32
    admitted = next(e for e in logs if e["event"] == "prompt_admitted")
    assert admitted["request_id"] == "trace-123" and admitted["prompt_id"] == pid
    for event in ("prompt_dispatched", "prompt_finished"):
        line = next(e for e in logs if e["event"] == event)
        assert line["prompt_id"] == pid and line["backend"] == "alpha" and "tenant" in line
