"""An elastic farm (proxy.membership): backends added, changed and removed at runtime through the API and
by `comfy-proxy join` agents, shared by every replica through the store; a farm scaled to zero admits
prompts from its kept catalogue and runs them when a backend comes."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from proxy.config import AuthConfig, DiscoveryConfig, DnsConfig, DnsDiscovery, TenantConfig
from tests.client import ComfyClient, txt2img
from tests.conftest import free_port, wait_until
from tests.webhooks import DnsServer

ADMIN = {"X-API-Key": "ops-key"}
TENANTS = (TenantConfig(name="ops", api_keys=("ops-key",), role="admin"),)
JOIN_TOKEN = "join-token-for-tests"


async def ran_on(client: ComfyClient, sim: Any, pid: str) -> bool:
    """The backend's own history holds the prompt (the proxy submits under the client's prompt_id)."""
    status, history = await client.get_from(sim.url, f"/history/{pid}")
    return status == 200 and pid in history


async def finished(client: ComfyClient, pid: str) -> bool:
    status, history = await client.get(f"/history/{pid}")
    return status == 200 and pid in history and history[pid]["status"]["status_str"] == "success"


async def backend_names(client: ComfyClient, available: bool = True) -> set[str]:
    _, body = await client.get("/proxy/backends")
    return {b["name"] for b in body["backends"] if b["available"] or not available}


async def test_a_backend_added_on_one_replica_takes_prompts_posted_to_another(sims, proxies, store_kind) -> None:
    alpha, beta = await sims("alpha", step_ms=20), await sims("beta", step_ms=20)
    a = await proxies([alpha], tenants=TENANTS)
    b = await proxies([alpha], tenants=TENANTS) if store_kind == "redis" else a
    async with ComfyClient(a.url, headers=ADMIN) as on_a, ComfyClient(b.url, headers=ADMIN) as on_b:
        assert (await on_a.post("/proxy/backends/alpha/drain", {}))[0] == 200
        status, added = await on_a.post("/proxy/backends", {"url": beta.url, "name": "beta", "labels": ["x"]})
        assert status == 201 and added["source"] == "api" and added["labels"] == ["x"]
        assert (await on_a.post("/proxy/backends", {"url": alpha.url, "name": "beta"}))[0] == 400   # taken

        async def b_has_beta() -> bool:
            return "beta" in await backend_names(on_b)
        await wait_until(b_has_beta, what="replica B to take beta on")
        pid = await on_b.queue_prompt(txt2img(seed=1))
        await wait_until(lambda: finished(on_b, pid), what="the prompt posted to B")
        assert await ran_on(on_b, beta, pid)

        # DELETE drains first: the prompt running there finishes, new ones go elsewhere, then it is gone
        assert (await on_a.post("/proxy/backends/alpha/undrain", {}))[0] == 200
        long = await on_b.queue_prompt(txt2img(seed=2, steps=60))
        await wait_until(lambda: ran_or_running(on_b, beta, long), what="a long prompt on beta")
        status, leaving = await on_a.request("DELETE", "/proxy/backends/beta")
        assert status == 202 and leaving["leaving"] is True
        after = await on_b.queue_prompt(txt2img(seed=3))
        await wait_until(lambda: finished(on_b, after), what="a prompt while beta drains")
        assert await ran_on(on_b, alpha, after) and not await ran_on(on_b, beta, after)
        await wait_until(lambda: finished(on_b, long), timeout=20, what="the prompt beta was running")

        async def forgotten() -> bool:
            for c in (on_a, on_b):
                if (await c.get("/proxy/backends/beta"))[0] != 404 or "beta" in await backend_names(c, False):
                    return False
            return True
        await wait_until(forgotten, what="beta forgotten on both replicas")


async def ran_or_running(client: ComfyClient, sim: Any, pid: str) -> bool:
    status, queue = await client.get_from(sim.url, "/queue")
    return any(item[1] == pid for item in queue["queue_running"]) or await ran_on(client, sim, pid)


async def test_a_forced_delete_moves_its_prompts_elsewhere_with_nothing_lost(sims, proxies, store_kind) -> None:
    alpha, beta = await sims("alpha", step_ms=20), await sims("beta", step_ms=20)
    proxy = await proxies([alpha, beta], tenants=TENANTS)
    async with ComfyClient(proxy.url, headers=ADMIN) as client:
        assert (await client.post("/proxy/backends/alpha/drain", {}))[0] == 200
        pids = [await client.queue_prompt(txt2img(seed=10 + i, steps=100)) for i in range(3)]
        await wait_until(lambda: ran_or_running(client, beta, pids[0]), what="beta running the first")
        assert (await client.post("/proxy/backends/alpha/undrain", {}))[0] == 200
        status, gone = await client.request("DELETE", "/proxy/backends/beta?force=1")
        assert status == 200 and gone["leaving"] is False
        assert (await client.get("/proxy/backends/beta"))[0] == 404
        for pid in pids:   # the one running on beta, the one waiting there, the one in the proxy's queue
            await wait_until(lambda pid=pid: finished(client, pid), timeout=30, what=f"{pid} on alpha")
            assert await ran_on(client, alpha, pid)
        assert (await client.get("/proxy/backends/nope"))[0] == 404


def _join(proxy_url: str, backend_url: str, name: str, lease_s: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "proxy.cli", "--log-level", "warning", "join", "--proxy",
                             proxy_url, "--token", JOIN_TOKEN, "--backend", backend_url, "--name", name,
                             "--lease-s", str(lease_s)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def test_join_agents_register_leave_gracefully_and_lapse_when_killed(sims, proxies) -> None:
    alpha, gpu1, gpu2 = [await sims(n, step_ms=20) for n in ("alpha", "gpu1", "gpu2")]
    proxy = await proxies([alpha], tenants=TENANTS, auth=AuthConfig(required=True, join_tokens=(JOIN_TOKEN,)))
    agents: list[subprocess.Popen[bytes]] = []
    try:
        async with ComfyClient(proxy.url, headers=ADMIN) as client, \
                ComfyClient(proxy.url, headers={"Authorization": f"Bearer {JOIN_TOKEN}"}) as joiner:
            assert (await joiner.get("/queue"))[0] == 403   # a join token reaches nothing else
            assert (await joiner.request("DELETE", "/proxy/backends/alpha"))[0] == 403   # nor others' backends
            assert (await client.post("/proxy/backends/alpha/drain", {}))[0] == 200
            agents.append(_join(proxy.url, gpu1.url, "gpu1", 3.0))

            async def joined() -> bool:
                status, body = await client.get("/proxy/backends/gpu1")
                return status == 200 and body["source"] == "join" and body.get("state", {}).get("available")
            await wait_until(joined, timeout=20, what="gpu1 to join")
            running = await client.queue_prompt(txt2img(seed=20, steps=80))
            await wait_until(lambda: ran_or_running(client, gpu1, running), what="gpu1 running a prompt")
            agents[0].send_signal(signal.SIGTERM)   # drains, waits for the running prompt, leaves
            assert await asyncio.to_thread(agents[0].wait, 30) == 0
            assert await finished(client, running) and await ran_on(client, gpu1, running)
            assert (await client.get("/proxy/backends/gpu1"))[0] == 404

            agents.append(_join(proxy.url, gpu2.url, "gpu2", 2.0))

            async def gpu2_joined() -> bool:
                return "gpu2" in await backend_names(client)
            await wait_until(gpu2_joined, timeout=20, what="gpu2 to join")
            stranded = await client.queue_prompt(txt2img(seed=21, steps=200))
            await wait_until(lambda: ran_or_running(client, gpu2, stranded), what="gpu2 running a prompt")
            agents[1].send_signal(signal.SIGKILL)   # nobody renews its lease: gpu2 is dead to the farm
            await asyncio.to_thread(agents[1].wait, 10)
            assert (await client.post("/proxy/backends/alpha/undrain", {}))[0] == 200

            async def moved() -> bool:
                return (await client.get("/proxy/backends/gpu2"))[0] == 404 and await finished(client, stranded)
            await wait_until(moved, timeout=30, what="gpu2's prompt to complete elsewhere")
            assert await ran_on(client, alpha, stranded)
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()


async def test_a_farm_scaled_to_zero_admits_from_its_catalogue_and_runs_when_a_backend_comes(
        sims, proxies, store_kind) -> None:
    alpha = await sims("alpha", step_ms=5)
    first = await proxies([alpha])
    await alpha.close()   # the farm scales to zero
    front = await proxies([]) if store_kind == "redis" else first   # a replica that never saw a backend
    async with ComfyClient(front.url) as client:
        async def waiting() -> bool:
            status, body = await client.get("/proxy/readyz")
            return status == 200 and body["status"] == "waiting" and body["backends_available"] == []
        await wait_until(waiting, what="readyz: ready, waiting for a backend")
        await client.connect()
        pids = [await client.queue_prompt(txt2img(seed=30 + i)) for i in range(3)]
        status, body = await client.post("/prompt", {"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}})
        assert status == 400 and body["error"]["type"] == "invalid_prompt" and "node_errors" in body
        status, body = await client.post("/prompt", {"prompt": txt2img(seed=1, ckpt="missing.safetensors")})
        assert status == 400 and body["node_errors"]   # models are in the catalogue too
        _, queue = await client.get("/queue")
        assert sorted(item[1] for item in queue["queue_pending"]) == sorted(pids)
        beta = await sims("beta", step_ms=5)
        status, _ = await client.post("/proxy/backends", {"url": beta.url, "name": "beta"})
        assert status == 201
        for pid in pids:
            await client.wait_done(pid, timeout=20)
            assert await finished(client, pid)


async def test_dns_discovery_follows_the_records_and_loses_nothing(sims, proxies, tmp_path: Path) -> None:
    """A/AAAA records from a real DNS server (dnsmasq) the test rewrites: each address is a backend at the
    configured port; one whose record goes is drained, finishes what it runs, and leaves."""
    server = DnsServer(tmp_path / "dns", free_port()).start()
    try:
        port = free_port()
        hosts = {name: await sims(name, host=f"127.0.0.{i}", port=port, step_ms=20)
                 for i, name in ((2, "one"), (3, "two"), (4, "three"))}
        await server.point("gpus.farm.test", "127.0.0.2", "127.0.0.3")
        source = DnsDiscovery(name="gpus.farm.test", port=port, interval_s=0.2, labels=("gpu",))
        proxy = await proxies([], dns=DnsConfig(nameservers=(server.nameserver,)),
                              discovery=DiscoveryConfig(dns=(source,)))
        name = {sim: f"gpus.farm.test-127.0.0.{i}-{port}" for sim, i in (("one", 2), ("two", 3), ("three", 4))}
        async with ComfyClient(proxy.url) as client:
            async def serving(*sims: str) -> bool:
                return await backend_names(client) == {name[s] for s in sims}
            await wait_until(lambda: serving("one", "two"), what="both discovered")
            _, listed = await client.get(f"/proxy/backends/{name['one']}")
            assert listed["source"] == "dns:gpus.farm.test" and listed["labels"] == ["gpu"]
            pids = [await client.queue_prompt(txt2img(seed=40 + i, steps=60)) for i in range(4)]
            async def two_busy() -> bool:
                return any([await ran_or_running(client, hosts["two"], pid) for pid in pids])
            await wait_until(two_busy, what="two running one")
            await server.point("gpus.farm.test", "127.0.0.2", "127.0.0.4")   # two goes, three comes

            async def followed() -> bool:
                return await backend_names(client, available=False) == {name["one"], name["three"]}
            await wait_until(followed, timeout=30, what="two drained and gone, three there")
            for pid in pids:
                await wait_until(lambda pid=pid: finished(client, pid), timeout=30, what=f"{pid} finished")
            await server.point("gpus.farm.test")   # no records: no backends (a Service scaled to zero)

            async def empty() -> bool:
                return await backend_names(client, available=False) == set()
            await wait_until(empty, timeout=30, what="every discovered backend gone")
    finally:
        server.stop()
