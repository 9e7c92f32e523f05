"""The web frontend's user data through the proxy: ComfyUI's answers, kept per tenant."""

from __future__ import annotations

from proxy.config import TenantConfig
from tests.client import ComfyClient

TENANTS = (TenantConfig("alice", api_keys=("ka",)), TenantConfig("bob", api_keys=("kb",)))


async def _flow(client: ComfyClient) -> list[tuple[int, object]]:
    """The same calls the frontend makes, recorded so a backend's and the proxy's answers compare."""
    assert client.session is not None
    out: list[tuple[int, object]] = [await client.get("/settings")]
    out.append(await client.post("/settings/Comfy.Theme", "dark"))
    out.append(await client.get("/settings/Comfy.Theme"))
    out.append(await client.post("/settings", {"Comfy.Locale": "en"}))
    out.append(await client.get("/settings"))
    async with client.session.post(client.base + "/userdata/workflows%2Fmine.json", data=b'{"nodes": []}') as r:
        out.append((r.status, await r.json()))
    async with client.session.post(client.base + "/userdata/workflows%2Fmine.json?overwrite=false", data=b"{}") as r:
        out.append((r.status, None))
    out.append(await client.get("/userdata", dir="workflows"))
    status, listing = await client.get("/v2/userdata")  # times differ between the two: names and kinds only
    out.append((status, [(entry["name"], entry["type"]) for entry in listing]))
    out.append(await client.get_bytes("/userdata/workflows%2Fmine.json"))
    async with client.session.post(client.base + "/userdata/workflows%2Fmine.json/move/workflows%2Fold.json") as r:
        out.append((r.status, await r.json()))
    async with client.session.delete(client.base + "/userdata/workflows%2Fold.json") as r:
        out.append((r.status, None))
    out.append(await client.get("/userdata", dir="workflows"))
    async with client.session.get(client.base + "/userdata/..%2F..%2Fetc%2Fpasswd") as r:
        out.append((r.status, None))
    return out


async def test_user_data_answers_like_a_backend(sims, proxies) -> None:
    sim = await sims("alpha")
    proxy = await proxies([sim])
    async with ComfyClient(sim.url) as direct, ComfyClient(proxy.url) as through:
        assert await _flow(through) == await _flow(direct)


async def test_user_data_is_per_tenant(sims, proxies) -> None:
    proxy = await proxies([await sims("alpha")], tenants=TENANTS)
    async with ComfyClient(proxy.url, headers={"X-API-Key": "ka"}) as alice, \
            ComfyClient(proxy.url, headers={"X-API-Key": "kb"}) as bob:
        await alice.post("/settings/Comfy.Theme", "dark")
        assert await alice.get("/settings") == (200, {"Comfy.Theme": "dark"})
        assert await bob.get("/settings") == (200, {})
        assert alice.session is not None
        async with alice.session.post(alice.base + "/userdata/workflows%2Fa.json", data=b"{}") as r:
            assert r.status == 200
        assert (await bob.get_bytes("/userdata/workflows%2Fa.json"))[0] == 404
        # His own folder, empty: ComfyUI makes the parent folder even on a GET.
        assert (await bob.get("/userdata", dir="workflows")) == (200, [])
