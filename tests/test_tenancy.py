"""Tenants: keys, quotas, isolation on every route, and what backends are told."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import AuthConfig, Quota, TenantConfig
from tests.client import ComfyClient, txt2img
from tests.conftest import free_port

ALICE, BOB, ROOT = "alice-key-0123456789", "bob-key-0123456789", "root-key-0123456789"
TENANTS = (
    TenantConfig("alice", api_keys=(ALICE,)),
    TenantConfig("bob", api_keys=("sha256:" + hashlib.sha256(BOB.encode()).hexdigest(),)),
    TenantConfig("root", api_keys=(ROOT,), role="admin"),
)


def as_(key: str, url: str) -> ComfyClient:
    return ComfyClient(url, headers={"Authorization": f"Bearer {key}"})


async def test_keys_are_required_and_every_form_works(sims, proxies) -> None:
    proxy = await proxies([await sims("alpha")], tenants=TENANTS)
    async with ComfyClient(proxy.url) as anon, \
            ComfyClient(proxy.url, headers={"Authorization": "Bearer wrong"}) as wrong:
        for client in (anon, wrong):
            status, body = await client.post("/prompt", {"prompt": txt2img(1)})
            assert status == 401 and body["error"]["type"] == "unauthorized"
            status, body = await client.get("/history")
            assert status == 401 and body["error"]["type"] == "unauthorized"
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await client.connect()
            assert refused.value.status == 401
        assert (await anon.get("/proxy/healthz"))[0] == 200
    async with ComfyClient(proxy.url, headers={"X-API-Key": ALICE}) as by_header, as_(BOB, proxy.url) as bearer, \
            ComfyClient(proxy.url) as by_token:
        await by_header.connect()
        await bearer.connect()
        await by_token.connect(query=f"&token={ALICE}")
        for client in (by_header, bearer):
            pid = await client.queue_prompt(txt2img(2))
            await client.wait_done(pid)
        assert (await by_token.get("/history"))[0] == 401  # ?token= is for websockets only


async def test_max_queued_refuses_then_frees(sims, proxies) -> None:
    limited = (TenantConfig("alice", api_keys=(ALICE,), quota=Quota(max_queued=2)),)
    proxy = await proxies([await sims("alpha", step_ms=40)], tenants=limited)
    async with as_(ALICE, proxy.url) as client:
        await client.connect()
        results = [await client.post("/prompt", {"prompt": txt2img(i, steps=10), "client_id": client.client_id})
                   for i in range(3)]
        assert [status for status, _ in results] == [200, 200, 429]
        body = results[2][1]
        assert body["error"]["type"] == "quota_exceeded" and "max_queued" in body["error"]["message"]
        await client.wait_done(results[0][1]["prompt_id"])
        status, body = await client.post("/prompt", {"prompt": txt2img(9)})
        assert status == 200, body


async def test_max_queued_holds_across_two_replicas(sims, proxies, store_kind) -> None:
    if store_kind != "redis":
        pytest.skip("replicas share state through Redis")
    limited = (TenantConfig("alice", api_keys=(ALICE,), quota=Quota(max_queued=2)),)
    sim = await sims("alpha", step_ms=50)
    first = await proxies([sim], tenants=limited)
    second = await proxies([sim], tenants=limited)
    async with as_(ALICE, first.url) as a, as_(ALICE, second.url) as b:
        results = await asyncio.gather(*(c.post("/prompt", {"prompt": txt2img(i, steps=20)})
                                         for i, c in enumerate([a, b] * 4)))
    assert sorted(status for status, _ in results) == [200, 200] + [429] * 6


async def test_tenants_are_isolated_and_admins_see_all(sims, proxies) -> None:
    sim = await sims("alpha", step_ms=30)
    proxy = await proxies([sim], tenants=TENANTS)
    async with as_(ALICE, proxy.url) as alice, as_(BOB, proxy.url) as bob, as_(ROOT, proxy.url) as root:
        bob.client_id = alice.client_id  # the same clientId in two tenants
        await alice.connect()
        await bob.connect()
        a_done = await alice.queue_prompt(txt2img(1))
        await alice.wait_done(a_done)
        a_slow = await alice.queue_prompt(txt2img(2, steps=200))
        a_queued = await alice.queue_prompt(txt2img(3, steps=200))
        a_pending = await alice.queue_prompt(txt2img(4, steps=200))
        await alice.wait_for(lambda f: f.type == "execution_start" and f.text["data"]["prompt_id"] == a_slow)
        # Bob sees nothing of Alice's.
        assert (await bob.get(f"/history/{a_done}")) == (200, {})
        assert (await bob.get("/history"))[1] == {}
        assert (await bob.get("/queue"))[1] == {"queue_running": [], "queue_pending": []}
        image = (await alice.get(f"/history/{a_done}"))[1][a_done]["outputs"]["9"]["images"][0]
        assert (await bob.get_bytes("/view", **image))[0] == 404
        assert (await alice.get_bytes("/view", **image))[0] == 200
        # Bob cannot interrupt, delete or clear Alice's prompts.
        await bob.post("/interrupt", {"prompt_id": a_slow})
        await bob.post("/interrupt", {})
        await bob.post("/queue", {"delete": [a_queued]})
        await bob.post("/queue", {"clear": True})
        await bob.post("/history", {"delete": [a_done]})
        await bob.post("/history", {"clear": True})
        queue = (await alice.get("/queue"))[1]
        assert [item[1] for item in queue["queue_running"]] == [a_slow]
        assert {item[1] for item in queue["queue_pending"]} == {a_queued, a_pending}
        assert a_done in (await alice.get("/history"))[1]
        # The admin sees and manages everything.
        assert a_done in (await root.get("/history"))[1]
        await root.post("/queue", {"delete": [a_pending]})
        await root.post("/interrupt", {"prompt_id": a_slow})
        await alice.wait_done(a_slow)
        assert "execution_interrupted" in [m["type"] for m in alice.messages_of(a_slow)]
        assert a_pending not in {item[1] for item in (await alice.get("/queue"))[1]["queue_pending"]}
        await alice.post("/queue", {"clear": True})
        await alice.post("/interrupt", {})
        ids = {a_done, a_slow, a_queued, a_pending}
        assert all(f.text is not None and f.text["data"].get("prompt_id") not in ids for f in bob.frames)


async def test_backends_are_told_the_tenant(sims, proxies) -> None:
    record, seen = comfy_user_recorder()
    sim = await recording_sim(record)
    proxy = await proxies([sim], tenants=TENANTS)
    async with ComfyClient(proxy.url, headers={"Authorization": f"Bearer {ALICE}", "comfy-user": "bob"}) as c:
        await c.connect()
        await c.wait_done(await c.queue_prompt(txt2img(1)))
    assert seen == ["alice"]
    trusting = await proxies([sim], auth=AuthConfig(trust_comfy_user_header=True))
    async with ComfyClient(trusting.url, headers={"comfy-user": "carol"}) as c:
        await c.connect()
        await c.wait_done(await c.queue_prompt(txt2img(2)))
    assert seen == ["alice", "carol"]
    await sim.close()


class _RecordingSim:
    def __init__(self, runner: web.AppRunner, url: str) -> None:
        self.runner, self.url, self.name = runner, url, "recorder"

    async def close(self) -> None:
        await self.runner.cleanup()


def comfy_user_recorder() -> tuple[Any, list[str | None]]:
    """A middleware recording the `comfy-user` header of each `POST /prompt` a backend gets, and the list."""
    seen: list[str | None] = []

    @web.middleware
    async def record(request: web.Request, handler):  # type: ignore[no-untyped-def]
        if request.method == "POST" and request.path == "/prompt":
            seen.append(request.headers.get("comfy-user"))
        return await handler(request)
    return record, seen


async def recording_sim(middleware) -> _RecordingSim:  # type: ignore[no-untyped-def]
    """A simulator with a request-recording middleware in front (backends' view of the proxy)."""
    from proxy.sim import SimOptions, create_sim_app

    app = create_sim_app(SimOptions(name="recorder", step_ms=2))
    app.middlewares.insert(0, middleware)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return _RecordingSim(runner, f"http://127.0.0.1:{port}")


async def test_admin_routes_need_the_admin_role(sims, proxies) -> None:
    proxy = await proxies([await sims("alpha")], tenants=TENANTS)
    async with as_(ALICE, proxy.url) as alice, as_(ROOT, proxy.url) as root:
        for method, path in (("GET", "/proxy/backends"), ("POST", "/proxy/backends/alpha/drain"),
                             ("POST", "/proxy/backends"), ("GET", "/proxy/backends/alpha"),
                             ("PATCH", "/proxy/backends/alpha"),
                             ("POST", "/proxy/reload"), ("GET", "/internal/logs"), ("GET", "/internal/logs/raw"),
                             ("PATCH", "/internal/logs/subscribe")):
            call = {"GET": lambda p: alice.get(p), "POST": lambda p: alice.post(p, {}),
                    "PATCH": lambda p: alice.patch(p, {"clientId": alice.client_id, "enabled": True})}[method]
            status, body = await call(path)
            assert status == 403 and body["error"]["type"] == "forbidden", path
        assert (await root.get("/proxy/backends"))[0] == 200
        assert (await root.get("/internal/logs/raw"))[0] == 200   # backend logs show every tenant's work
        async with ComfyClient(proxy.url) as anon:
            assert (await anon.get("/proxy/readyz"))[0] == 200  # probes stay open
            assert (await root.post("/proxy/backends/alpha/drain", {}))[0] == 200
            status, body = await anon.get("/proxy/readyz")   # its only backend is draining: prompts wait
            assert status == 200 and body["status"] == "waiting" and body["backends_available"] == []
        assert (await root.post("/proxy/backends/nope/drain", {}))[0] == 404
        status, body = await root.post("/proxy/reload", {})
        assert status == 400 and body["error"]["type"] == "no_config_file"
