"""Outputs that outlive their backend (`proxy.files`, `proxy.keeping`): copies into a folder or a real S3
endpoint (moto's server over HTTP), `/view` from the copy, signed links, ranges and validators, an S3
outage, retention and the storage quota. Each behaviour runs for `dir` and `s3`, with both state stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from proxy.bench import procs
from proxy.config import OutputsConfig, Quota, S3Config, TenantConfig
from proxy.files import FileStore, open_files
from proxy.files.base import StoredFile
from proxy.outputs import ref_of
from proxy.store.base import OutputRef
from tests.client import ComfyClient, txt2img
from tests.conftest import wait_until
from tests.s3 import ACCESS, REGION, Gate, bucket_keys, s3_client
from tests.test_uploads import load_invert_save, png, upload

COPY_TIMEOUT_S = 30.0


@dataclass
class Files:
    """The file store a test's proxies use, and a way to list it that does not go through the proxy."""

    kind: str
    config: OutputsConfig
    folder: Path | None = None
    endpoint: str = ""
    bucket: str = ""

    async def keys(self) -> list[str]:
        """On a thread: boto3 blocks, and the S3 outage's gate runs on this event loop."""
        return await asyncio.to_thread(self._keys)

    def _keys(self) -> list[str]:
        if self.folder is not None:   # os.walk, not rglob: retention may remove a folder while it is listed
            return sorted(str((Path(root) / name).relative_to(self.folder))
                          for root, _, names in os.walk(self.folder) for name in names)
        return bucket_keys(self.endpoint, self.bucket)


def s3_files(endpoint: str, **outputs: Any) -> Files:
    bucket = f"outputs-{uuid.uuid4().hex[:12]}"
    s3 = S3Config(bucket=bucket, endpoint_url=endpoint, region=REGION, path_style=True, create_bucket=True,
                  access_key_id=ACCESS["aws_access_key_id"], secret_access_key=ACCESS["aws_secret_access_key"])
    return Files("s3", OutputsConfig(store="s3", s3=s3, **outputs), endpoint=endpoint, bucket=bucket)


@pytest.fixture(params=["dir", "s3"])
def files_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_files(files_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    def make(**outputs: Any) -> Files:
        if files_kind == "dir":
            folder = tmp_path / "outputs"
            return Files("dir", OutputsConfig(store="dir", dir=str(folder), **outputs), folder=folder)
        return s3_files(request.getfixturevalue("s3_endpoint"), **outputs)
    return make


@contextlib.asynccontextmanager
async def sim_process(name: str) -> AsyncIterator[Any]:
    """A simulated backend in a process of its own, so a test can SIGKILL it."""
    async with procs.sim(name, "--step-ms", "2") as proc:
        yield SimpleNamespace(name=name, url=proc.url, process=proc.process)


def images_of(history: dict[str, Any]) -> list[dict[str, Any]]:
    return [item for ui in history["outputs"].values() for item in ui.get("images", [])]


async def run(client: ComfyClient, seeds: range) -> list[dict[str, Any]]:
    """Run prompts; every image they made, as history shows it."""
    ids = [await client.queue_prompt(txt2img(seed=seed)) for seed in seeds]
    await asyncio.gather(*(client.wait_done(pid, timeout=30) for pid in ids))
    out = []
    for pid in ids:
        status, history = await client.get(f"/history/{pid}")
        assert status == 200
        out += images_of(history[pid])
    return out


async def copied(proxy: Any, images: list[dict[str, Any]], timeout: float = COPY_TIMEOUT_S) -> list[OutputRef]:
    """Wait until every image is in the file store; where each one is."""
    store = proxy.services.store

    async def all_stored() -> bool:
        refs = [await store.resolve_output(ref_of(image["filename"])) for image in images]
        return all(ref is not None and ref.stored for ref in refs)
    await wait_until(all_stored, timeout, "every output copied into the file store")
    return [await store.resolve_output(ref_of(image["filename"])) for image in images]


async def backend_bytes(session: aiohttp.ClientSession, backend_url: str, out: OutputRef) -> bytes:
    params = {"filename": out.filename, "subfolder": out.subfolder, "type": out.type}
    async with session.get(backend_url + "/view", params=params) as resp:
        assert resp.status == 200
        return await resp.read()


# --- acceptance 2: a backend SIGKILLed after its prompts finished --------------------------------------

async def test_outputs_are_served_after_their_backend_is_killed(make_files, proxies, store_kind) -> None:
    files = make_files()
    async with sim_process("alpha") as backend, aiohttp.ClientSession() as raw:
        proxy = await proxies([backend], outputs=files.config)
        async with ComfyClient(proxy.url) as client:
            await client.connect()
            images = await run(client, range(1, 4))
            # a name no file system would take whole (a long non-ASCII prefix) is copied all the same
            long_name = await client.queue_prompt(txt2img(seed=9, prefix="猫" * 60))
            await client.wait_done(long_name)
            images += images_of((await client.get(f"/history/{long_name}"))[1][long_name])
            refs = await copied(proxy, images)
            originals = [await backend_bytes(raw, backend.url, out) for out in refs]
            assert len(set(originals)) == 4
            backend.process.kill()
            backend.process.wait()
            for image, original in zip(images, originals, strict=True):
                assert await client.get_bytes("/view", **image) == (200, original)
        # the store's own listing: <tenant>/<prompt_id>/<name as clients know it>
        expected = {f"_/{out.prompt_id}/{image['filename']}" for out, image in zip(refs, images, strict=True)}
        assert {key for key in expected if "猫" not in key} <= set(await files.keys())   # that one's name is hashed
        assert {out.stored for out in refs} <= set(await files.keys())
        if store_kind == "redis":   # another replica, which copied nothing, serves them too
            other = await proxies([backend], outputs=files.config)
            async with ComfyClient(other.url) as client:
                for image, original in zip(images, originals, strict=True):
                    assert await client.get_bytes("/view", **image) == (200, original)


# --- acceptance 3: signed links, ranges and validators -------------------------------------------------

ALICE, BOB = "alice-key", "bob-key"
TENANTS = (TenantConfig("alice", api_keys=(ALICE,)), TenantConfig("bob", api_keys=(BOB,)))


async def tenant_image(proxy: Any, key: str, seed: int) -> tuple[str, dict[str, Any], bytes]:
    async with ComfyClient(proxy.url, headers={"X-API-Key": key}) as client:
        await client.connect()
        [image] = await run(client, range(seed, seed + 1))
        await copied(proxy, [image])
        status, data = await client.get_bytes("/view", **image)
        assert status == 200
        pid = (await proxy.services.store.resolve_output(ref_of(image["filename"]))).prompt_id
        return pid, image, data


async def fetch(session: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, bytes, Any]:
    async with session.get(url, headers=headers) as resp:
        return resp.status, await resp.read(), resp.headers.copy()


def flipped(signature: str) -> str:
    return signature[:-1] + ("A" if signature[-1] != "A" else "B")


def altered(link: str, **query: str) -> str:
    parts = urlsplit(link)
    params = {k: v[0] for k, v in parse_qs(parts.query).items()} | query
    return parts._replace(query="&".join(f"{k}={v}" for k, v in params.items())).geturl()


async def test_signed_links_work_without_a_key_and_refuse_any_change(make_files, sims, proxies) -> None:
    files = make_files(link_ttl_s=600)
    proxy = await proxies([await sims("alpha")], tenants=TENANTS, outputs=files.config)
    a_pid, a_image, a_bytes = await tenant_image(proxy, ALICE, 1)
    _, b_image, _ = await tenant_image(proxy, BOB, 2)
    async with aiohttp.ClientSession() as plain:   # no key anywhere
        async with plain.get(proxy.url + f"/proxy/jobs/{a_pid}", headers={"X-API-Key": ALICE}) as resp:
            job = await resp.json()
        [output] = job["outputs"]
        link = output["link"]
        assert (await fetch(plain, link))[:2] == (200, a_bytes)
        if files.kind == "s3":   # S3's own presigned GET of exactly that object, for link_ttl_s
            query = parse_qs(urlsplit(link).query)
            assert urlsplit(link).path == f"/{files.bucket}/alice/{a_pid}/{a_image['filename']}"
            assert query["X-Amz-Expires"] == ["600"] and query["X-Amz-Signature"]
        # The proxy's own signed link (dir and backend; for s3 the link of a file not yet copied).
        signer = proxy.services.links
        a_ref, b_ref = ref_of(a_image["filename"]), ref_of(b_image["filename"])
        mine = proxy.url + await signer.path(a_ref, a_image["filename"], "alice", 600)
        status, body, headers = await fetch(plain, mine)
        assert (status, body) == (200, a_bytes)
        assert headers["Content-Disposition"] == f'filename="{a_image["filename"]}"'
        query = parse_qs(urlsplit(mine).query)
        forged = [
            altered(mine, signature=flipped(query["signature"][0])),
            altered(mine, tenant="bob"),
            altered(mine, expires=str(int(query["expires"][0]) + 3600)),
            mine.replace(a_ref, b_ref).replace(a_image["filename"].split("~")[0], b_image["filename"].split("~")[0]),
            mine.replace(a_ref, b_ref),
            proxy.url + await signer.path(a_ref, a_image["filename"], "alice", 600, now=time.time() - 3600),  # expired
            proxy.url + await signer.path(b_ref, b_image["filename"], "alice", 600),   # bob's file, alice's name
        ]
        assert headers["Content-Security-Policy"] == "sandbox" and headers["X-Content-Type-Options"] == "nosniff"
        forged += [altered(mine, expires="²"), altered(mine, expires="9" * 5000), altered(mine, signature="é" * 43)]
        for url in forged:
            status, body, _ = await fetch(plain, url)
            assert status == 403, (url, status)
            assert b_image["filename"].encode() not in body
        # Ranges and validators (RFC 9110), on /view and on the link alike.
        size = len(a_bytes)
        view = proxy.url + "/view?" + "&".join(f"{k}={v}" for k, v in a_image.items())
        for url, headers in ((view, {"X-API-Key": ALICE}), (mine, {})):
            status, body, got = await fetch(plain, url, Range="bytes=10-19", **headers)
            assert (status, body, got["Content-Range"]) == (206, a_bytes[10:20], f"bytes 10-19/{size}")
            status, body, got = await fetch(plain, url, Range="bytes=-7", **headers)
            assert (status, body, got["Content-Range"]) == (206, a_bytes[-7:], f"bytes {size - 7}-{size - 1}/{size}")
            assert (await fetch(plain, url, Range=f"bytes={size + 5}-", **headers))[0] == 416
            status, _, got = await fetch(plain, url, **headers)
            etag = got["ETag"]
            assert status == 200 and etag
            assert (await fetch(plain, url, **{"If-None-Match": etag}, **headers))[:2] == (304, b"")
            assert (await fetch(plain, url, **{"If-None-Match": '"other"'}, **headers))[:2] == (200, a_bytes)
        # the type is the file's own, whatever extension the asked-for name has before the reference
        stem, _, rest = a_image["filename"].partition("~")
        retyped = {**a_image, "filename": f"x~{rest.rsplit('.', 1)[0]}.svg"}
        async with plain.get(proxy.url + "/view", params=retyped, headers={"X-API-Key": ALICE}) as resp:
            assert resp.status == 200 and resp.content_type == "image/png"
        # bob cannot /view alice's output, copied or not
        async with plain.get(view, headers={"X-API-Key": BOB}) as resp:
            assert resp.status == 404


# --- acceptance 4: the S3 server away for 20 s while prompts finish -------------------------------------

OUTAGE_S = 20.0


async def test_an_s3_outage_loses_nothing_and_the_backlog_drains(s3_endpoint, sims, proxies) -> None:
    gate = Gate(int(urlsplit(s3_endpoint).port or 0))
    await gate.open()
    files = s3_files(gate.url)
    backend = await sims("alpha")
    proxy = await proxies([backend], outputs=files.config)
    try:
        async with ComfyClient(proxy.url) as client, aiohttp.ClientSession() as raw:
            await client.connect()
            await gate.shut()
            down_at = time.monotonic()
            images = await run(client, range(1, 5))
            store = proxy.services.store
            for image in images:   # served from the backend meanwhile
                out = await store.resolve_output(ref_of(image["filename"]))
                assert out is not None and not out.stored
                assert await client.get_bytes("/view", **image) == (200, await backend_bytes(raw, backend.url, out))

            async def degraded() -> bool:
                status, body = await client.get("/proxy/readyz")
                return status == 200 and body["status"] == "degraded" and not body["file_store"]["ok"]
            await wait_until(degraded, 10, "readyz saying the file store is degraded")
            status, _ = await client.post("/prompt", {"prompt": txt2img(seed=9)})
            assert status == 200   # admission goes on
            await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
            assert await store.copy_backlog() >= len(images)   # waiting, not dropped
            await gate.open()
            refs = await copied(proxy, images, timeout=90)
            assert {out.stored for out in refs} <= set(await files.keys())   # the bucket's own listing

            async def drained() -> bool:
                return await store.copy_backlog() == 0
            await wait_until(drained, 60, "the copy backlog drained")
            for image in images:
                out = await store.resolve_output(ref_of(image["filename"]))
                assert await client.get_bytes("/view", **image) == (200, await backend_bytes(raw, backend.url, out))

            async def ready() -> bool:
                return (await client.get("/proxy/readyz"))[1]["status"] == "ok"
            await wait_until(ready, 15, "readyz ok again")
    finally:
        await gate.shut()


# --- acceptance 5: retention and the storage quota -----------------------------------------------------

async def test_retention_removes_copies_and_their_view(make_files, sims, proxies) -> None:
    files = make_files(ttl_s=3600)
    tenants = (TenantConfig("alice", api_keys=(ALICE,), outputs_ttl_s=1), TenantConfig("bob", api_keys=(BOB,)))
    proxy = await proxies([await sims("alpha")], tenants=tenants, outputs=files.config)
    _, a_image, _ = await tenant_image(proxy, ALICE, 1)
    _, b_image, b_bytes = await tenant_image(proxy, BOB, 2)

    async def listed(image: dict[str, Any]) -> bool:
        return any(key.endswith("/" + image["filename"]) for key in await files.keys())

    async def alice_swept() -> bool:
        return not await listed(a_image)
    assert await listed(b_image)
    await wait_until(alice_swept, 15, "alice's copy removed after 1 s")
    async with ComfyClient(proxy.url, headers={"X-API-Key": ALICE}) as alice:
        assert (await alice.get_bytes("/view", **a_image))[0] == 404
    async with ComfyClient(proxy.url, headers={"X-API-Key": BOB}) as bob:
        assert await bob.get_bytes("/view", **b_image) == (200, b_bytes)
    assert await listed(b_image)
    assert "alice" not in await proxy.services.store.storage_used()


async def test_a_tenant_over_its_storage_quota_gets_429(make_files, sims, proxies) -> None:
    files = make_files()
    tenants = (TenantConfig("alice", api_keys=(ALICE,), quota=Quota(storage_mb=0.001)),
               TenantConfig("bob", api_keys=(BOB,), quota=Quota(storage_mb=100)))
    proxy = await proxies([await sims("alpha")], tenants=tenants, outputs=files.config)
    await tenant_image(proxy, ALICE, 1)   # a 64×64 PNG: over 1 kB
    used = await proxy.services.store.storage_used()
    assert used["alice"] > 1024
    async with ComfyClient(proxy.url, headers={"X-API-Key": ALICE}) as alice:
        status, body = await alice.post("/prompt", {"prompt": txt2img(seed=5)})
        assert status == 429
        assert body["error"]["type"] == "quota_exceeded" and body["error"]["extra_info"]["limit"] == "storage_mb"
    async with ComfyClient(proxy.url, headers={"X-API-Key": BOB}) as bob:
        assert (await bob.post("/prompt", {"prompt": txt2img(seed=6)}))[0] == 200


# --- uploads live in the file store too --------------------------------------------------------------

async def test_uploads_live_in_the_file_store_and_serve_every_replica(make_files, sims, proxies, store_kind) -> None:
    """Replicas share uploads through the file store, not a shared uploads folder (each has its own)."""
    files = make_files()
    backend = await sims("alpha")
    first = await proxies([backend], outputs=files.config)
    second = await proxies([backend], outputs=files.config) if store_kind == "redis" else first
    assert second is first or first.services.uploads.root != second.services.uploads.root
    async with ComfyClient(first.url) as one, ComfyClient(second.url) as two:
        assert await upload(one, png(1), name="cat.png") == (200, {"name": "cat.png", "subfolder": "", "type": "input"})
        assert ".uploads/anonymous/input/cat.png" in await files.keys()
        assert await two.get_bytes("/view", filename="cat.png", type="input") == (200, png(1))
        assert (await two.get("/internal/files/input"))[1] == ["cat.png"]
        await two.connect()
        pid = await two.queue_prompt(load_invert_save("cat.png"))
        done = await two.wait_done(pid)
        assert done.text is not None
        assert (await two.get(f"/history/{pid}"))[1][pid]["status"]["status_str"] == "success"
        # ComfyUI's naming across replicas: the same bytes keep the name, other bytes get the next one
        assert (await upload(two, png(1), name="cat.png"))[1]["name"] == "cat.png"
        assert (await upload(two, png(2), name="cat.png"))[1]["name"] == "cat (1).png"
        assert (await upload(one, png(3), name="cat.png"))[1]["name"] == "cat (2).png"
        assert await one.get_bytes("/view", filename="cat (1).png", type="input") == (200, png(2))
        # pasted images all arrive as image.png: at once on one replica, each gets its own name
        answers = await asyncio.gather(*(upload(one, png(10 + i), name="image.png") for i in range(3)))
        assert sorted(body["name"] for _, body in answers) == ["image (1).png", "image (2).png", "image.png"]


# --- the stores themselves -----------------------------------------------------------------------------

async def chunks_of(data: bytes, size: int = 1 << 20) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def test_each_store_keeps_a_streamed_file_whole(make_files) -> None:
    """Puts stream (S3: a multipart upload past 8 MiB), reads, lists, links and deletes."""
    files = make_files()
    store: FileStore | None = open_files(files.config)
    assert store is not None
    await store.start()
    try:
        big = os.urandom(9 * 1024 * 1024 + 123)
        assert await store.put("t/p/big.bin", chunks_of(big), "application/octet-stream") == StoredFile(
            "t/p/big.bin", len(big))
        assert await store.put("t/p/small.png", chunks_of(b"png"), "image/png") == StoredFile("t/p/small.png", 3)
        assert await store.read("t/p/big.bin", len(big)) == big
        with pytest.raises(ValueError):
            await store.read("t/p/big.bin", 1024)
        assert await store.read("t/p/none.png", 10) is None
        assert await store.keys("t/") == ["t/p/big.bin", "t/p/small.png"] == await files.keys()
        link = await store.link("t/p/small.png", 60, "small.png")
        if files.kind == "s3":
            async with aiohttp.ClientSession() as plain, plain.get(link) as resp:
                assert (resp.status, await resp.read()) == (200, b"png")
            # clients that reach S3 at another address get links that name it
            public = replace(files.config, s3=replace(files.config.s3, public_endpoint_url="https://files.example"))
            other = open_files(public)
            assert other is not None
            await other.start()
            try:
                link = await other.link("t/p/small.png", 60, "small.png")
                assert link is not None and link.startswith(f"https://files.example/{files.bucket}/t/p/small.png?")
            finally:
                await other.close()
        else:
            assert link is None   # the proxy signs its own
        await store.delete(["t/p/big.bin", "t/p/small.png", "t/p/none.png"])
        assert await store.keys("t/") == [] == await files.keys()
    finally:
        await store.close()


def test_s3_client_sees_the_same_bucket(s3_endpoint) -> None:
    """The tests' own S3 client (boto3) and the endpoint agree: a bucket made by one is listed by the other."""
    client = s3_client(s3_endpoint)
    name = f"probe-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=name)
    client.put_object(Bucket=name, Key="a/b.txt", Body=b"x")
    assert bucket_keys(s3_endpoint, name) == ["a/b.txt"]
