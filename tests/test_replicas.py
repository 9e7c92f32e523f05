"""Several proxy replicas sharing Redis: one holds each backend's upstream socket, events cross replicas,
and a replica that stops hands its sockets over."""

from __future__ import annotations

import asyncio

import pytest

from tests.client import ComfyClient, txt2img


@pytest.fixture
def redis_only(store_kind: str) -> None:
    if store_kind != "redis":
        pytest.skip("replicas share state through Redis")


async def test_events_reach_a_client_on_another_replica(redis_only, sims, proxies) -> None:
    a, b = await sims("alpha"), await sims("beta")
    first = await proxies([a, b])
    second = await proxies([a, b])
    async with ComfyClient(first.url) as watcher, ComfyClient(second.url) as poster:
        poster.client_id = watcher.client_id
        await watcher.connect()
        ids = [await poster.queue_prompt(txt2img(seed=i)) for i in range(6)]
        await asyncio.gather(*(watcher.wait_done(pid, timeout=30) for pid in ids))
        for pid in ids:
            types = [m["type"] for m in watcher.messages_of(pid)]
            assert types[0] == "execution_start" and types[-2:] == ["execution_success", "executing"], types
        assert any(f.binary for f in watcher.frames)  # previews crossed replicas too
        status, hist = await watcher.get(f"/history/{ids[0]}")
        assert hist[ids[0]]["status"]["status_str"] == "success"
    holders = await first.services.store.lease_holders()
    assert set(holders) == {"upstream:alpha", "upstream:beta"}


async def test_a_stopping_replica_hands_its_upstream_sockets_over(redis_only, sims, proxies) -> None:
    a = await sims("alpha")
    first = await proxies([a])
    second = await proxies([a])
    owner = (await first.services.store.lease_holders())["upstream:alpha"]
    survivor, leaving = (second, first) if owner == _replica_of(first) else (first, second)
    await leaving.close()
    async with ComfyClient(survivor.url) as client:
        await client.connect()
        pid = await client.queue_prompt(txt2img(seed=1))
        await client.wait_done(pid, timeout=20)
    assert (await survivor.services.store.lease_holders())["upstream:alpha"] == _replica_of(survivor)


def _replica_of(handle) -> str:  # type: ignore[no-untyped-def]
    return next(iter(handle.services.upstreams.values())).owner
