"""Several proxy replicas sharing Redis: one holds each backend's upstream socket, events cross replicas,
and a replica that stops hands its sockets over."""

from __future__ import annotations

import asyncio
import subprocess
import sys

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
    assert {n for n in holders if n.startswith("upstream:")} == {"upstream:alpha", "upstream:beta"}
    assert {n for n in holders if n.startswith("replica:")} == {f"replica:{_replica_of(p)}" for p in (first, second)}


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


async def test_sigterm_closes_clients_and_hands_over(redis_only, sims, store_config) -> None:
    """A replica told to stop (SIGTERM, as Kubernetes does) closes client sockets with 1001 (going away),
    gives its upstream leases back at once, and exits cleanly."""
    import signal

    import aiohttp

    from proxy.store import RedisStore
    from tests.conftest import free_port, serving

    sim = await sims("alpha")
    port = free_port()
    assert store_config.redis_url is not None
    proc = _serve(port, sim.url, store_config.redis_url)
    store = RedisStore(store_config.redis_url, "comfy-proxy")  # the CLI's default key prefix
    try:
        url = f"http://127.0.0.1:{port}"
        await serving(url, timeout=20)
        held = set(await store.lease_holders())
        assert {n for n in held if n.startswith("upstream:")} == {"upstream:127.0.0.1-" + sim.url.rsplit(":", 1)[1]}
        assert len([n for n in held if n.startswith("replica:")]) == 1   # its dispatcher's presence
        async with aiohttp.ClientSession() as s, s.ws_connect(url.replace("http", "ws") + "/ws?clientId=x") as ws:
            await ws.receive()  # status
            proc.send_signal(signal.SIGTERM)
            closing = await ws.receive(timeout=10)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED) and ws.close_code == 1001
        assert await asyncio.to_thread(proc.wait, 20) == 0
        assert await store.lease_holders() == {}
    finally:
        if proc.poll() is None:
            proc.kill()
        await store.close()


def _serve(port: int, backend: str, redis_url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "proxy.cli", "--log-level", "warning", "serve", "--port", str(port),
                             "--backend", backend, "--redis", redis_url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
