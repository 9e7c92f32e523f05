"""Uploads through the proxy: ComfyUI's answers and renaming, use by prompts on any backend, isolation."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import zlib
from typing import Any

import aiohttp
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from proxy.config import TenantConfig
from proxy.sim import api_files
from proxy.uploads import UploadCopier, UploadStore
from tests.client import ComfyClient
from tests.conftest import TRACES


def png(seed: int, size: int = 8) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + bytes((seed + x + y) % 256 for x in range(size * 3)) for y in range(size))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


async def upload(client: ComfyClient, data: bytes, name: str = "trace.png", **fields: str) -> tuple[int, object]:
    form = aiohttp.FormData()
    form.add_field("image", data, filename=name, content_type="image/png")
    for key, value in fields.items():
        form.add_field(key, value)
    assert client.session is not None
    async with client.session.post(client.base + "/upload/image", data=form) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text else None


async def raw_upload(client: ComfyClient, filename: str) -> int:
    """A multipart body written by hand: aiohttp's client would percent-encode the '/' of a hostile name."""
    boundary = "b0undary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + png(5) + f"\r\n--{boundary}--\r\n".encode()
    assert client.session is not None
    async with client.session.post(client.base + "/upload/image", data=body,
                                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}) as resp:
        return resp.status


def load_invert_save(image: str, prefix: str = "up") -> dict:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": image}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["2", 0]}}}


async def test_upload_answers_follow_comfyui(sims, proxies) -> None:
    proxy = await proxies([await sims("alpha")])
    trace = json.loads((TRACES / "upload.json").read_text())
    async with ComfyClient(proxy.url) as client:
        data = png(1)
        for step in trace:
            assert await upload(client, data, **step["fields"]) == (step["status"], step["body"])
        status, body = await upload(client, png(2))
        assert (status, body) == (200, {"name": "trace (1).png", "subfolder": "", "type": "input"})
        assert await raw_upload(client, "../escape.png") == 400
        assert await raw_upload(client, "/etc/escape.png") == 400
        assert (await upload(client, png(3), subfolder="../../x"))[0] == 400
        status, served = await client.get_bytes("/view", filename="trace.png", type="input", subfolder="")
        assert (status, served) == (200, data)
        assert (await client.get_bytes("/view", filename="../../etc/passwd", type="input"))[0] == 400
        assert (await client.get_bytes("/view", filename="nope.png", type="input"))[0] == 404


async def test_uploaded_image_runs_on_every_backend(sims, proxies) -> None:
    a, b = await sims("alpha"), await sims("beta")
    proxy = await proxies([a, b])
    async with ComfyClient(proxy.url) as client:
        await client.connect()
        assert (await upload(client, png(7), name="cat.png"))[0] == 200
        ids = await asyncio.gather(*(client.queue_prompt(load_invert_save("cat.png")) for _ in range(4)))
        await asyncio.gather(*(client.wait_done(pid) for pid in ids))
        records = await proxy.services.store.get_many(list(ids))
        assert {r.backend for r in records} == {"alpha", "beta"}
        assert all(r.outcome == "success" for r in records), [r.history["status"] for r in records]
        # History shows the client's own graph, not the backend copy's path.
        status, hist = await client.get(f"/history/{ids[0]}")
        assert hist[ids[0]]["prompt"][2]["1"]["inputs"]["image"] == "cat.png"


async def test_uploads_are_per_tenant(sims, proxies) -> None:
    tenants = (TenantConfig("alice", api_keys=("ka",)), TenantConfig("bob", api_keys=("kb",)))
    proxy = await proxies([await sims("alpha")], tenants=tenants)
    async with ComfyClient(proxy.url, headers={"X-API-Key": "ka"}) as alice, \
            ComfyClient(proxy.url, headers={"X-API-Key": "kb"}) as bob:
        assert (await upload(alice, png(1), name="secret.png"))[0] == 200
        assert (await bob.get_bytes("/view", filename="secret.png", type="input"))[0] == 404
        status, body = await bob.post("/prompt", {"prompt": load_invert_save("secret.png")})
        assert status == 400
        assert body["node_errors"]["1"]["errors"][0]["type"] == "custom_validation_failed"
        # Bob's own file of the same name is his, with his bytes.
        assert await upload(bob, png(2), name="secret.png") == (
            200, {"name": "secret.png", "subfolder": "", "type": "input"})
        assert (await bob.get_bytes("/view", filename="secret.png", type="input"))[1] == png(2)
        assert (await alice.get_bytes("/view", filename="secret.png", type="input"))[1] == png(1)


def rgb_png_with_workflow(seed: int, size: int = 8) -> bytes:
    """An RGB PNG carrying a `workflow` text chunk, as ComfyUI's outputs do."""
    image = Image.frombytes("RGB", (size, size), bytes((seed + i) % 256 for i in range(size * size * 3)))
    info = PngInfo()
    info.add_text("workflow", '{"nodes": []}')
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def alpha_mask(size: int = 8) -> bytes:
    """What the mask editor uploads: RGBA whose alpha is the mask (here a diagonal ramp)."""
    mask = Image.new("RGBA", (size, size))
    mask.putalpha(Image.frombytes("L", (size, size), bytes((x * 31 + y * 7) % 256 for y in range(size)
                                                           for x in range(size))))
    out = io.BytesIO()
    mask.save(out, format="PNG")
    return out.getvalue()


async def upload_mask(client: ComfyClient, data: bytes, name: str, original_ref: object) -> tuple[int, object]:
    form = aiohttp.FormData()
    form.add_field("image", data, filename=name, content_type="image/png")
    form.add_field("type", "input")
    form.add_field("original_ref", original_ref if isinstance(original_ref, str) else json.dumps(original_ref))
    assert client.session is not None
    async with client.session.post(client.base + "/upload/mask", data=form) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if resp.content_type == "application/json" else None


async def _mask_flow(client: ComfyClient) -> list[Any]:
    """The mask editor's calls: the original, then the mask onto it; what /view then serves."""
    original = rgb_png_with_workflow(3)
    out: list[Any] = [await upload(client, original, name="photo.png")]
    out.append(await upload_mask(client, alpha_mask(), "photo-mask.png",
                                 {"filename": "photo.png", "subfolder": "", "type": "input"}))
    out.append(await client.get_bytes("/view", filename="photo-mask.png", type="input", subfolder=""))
    for variant in ({"channel": "a"}, {"channel": "rgb"}, {"preview": "jpeg;80"}, {"preview": "webp;90"}):
        assert client.session is not None  # /view's re-encodings of the composed file, as ComfyUI makes them
        async with client.session.get(client.base + "/view", params={"filename": "photo-mask.png", "type": "input",
                                                                      **variant}) as r:
            out.append((r.status, r.content_type, await r.read()))
    # No such original: ComfyUI answers the name and writes nothing.
    out.append(await upload_mask(client, alpha_mask(), "lost-mask.png", {"filename": "nope.png", "type": "input"}))
    out.append((await client.get_bytes("/view", filename="lost-mask.png", type="input"))[0])
    out.append((await upload_mask(client, alpha_mask(), "up.png", {"filename": "../x.png", "type": "input"}))[0])
    return out


async def test_mask_upload_composes_the_alpha_onto_the_original_like_a_backend(sims, proxies) -> None:
    sim = await sims("alpha")
    proxy = await proxies([sim])
    async with ComfyClient(sim.url) as direct, ComfyClient(proxy.url) as through:
        flow = await _mask_flow(through)
        assert flow == await _mask_flow(direct)
        assert flow[1] == (200, {"name": "photo-mask.png", "subfolder": "", "type": "input"})
        assert [v[:2] for v in flow[3:7]] == [(200, "image/png"), (200, "image/png"), (200, "image/jpeg"),
                                              (200, "image/webp")]
        assert flow[7] == (200, {"name": "lost-mask.png", "subfolder": "", "type": "input"})
        assert flow[8] == 404 and flow[9] == 200
        status, composed = flow[2]
        assert status == 200
        with Image.open(io.BytesIO(composed)) as got, Image.open(io.BytesIO(rgb_png_with_workflow(3))) as original, \
                Image.open(io.BytesIO(alpha_mask())) as mask:
            assert got.mode == "RGBA" and got.info["workflow"] == '{"nodes": []}'
            assert got.convert("RGB").tobytes() == original.tobytes()
            assert got.getchannel("A").tobytes() == mask.getchannel("A").tobytes()
        # A mask that names no JSON object: ComfyUI fails with a bare 500, the proxy answers 400.
        assert (await upload_mask(through, alpha_mask(), "m.png", "not json"))[0] == 400
        assert (await upload_mask(direct, alpha_mask(), "m.png", "not json"))[0] == 500


async def test_masked_upload_and_output_originals_run_on_any_backend(sims, proxies) -> None:
    a, b = await sims("alpha"), await sims("beta")
    proxy = await proxies([a, b])
    async with ComfyClient(proxy.url) as client:
        await client.connect()
        await upload(client, rgb_png_with_workflow(5), name="photo.png")
        await upload_mask(client, alpha_mask(), "photo-mask.png", {"filename": "photo.png", "type": "input"})
        ids = [await client.queue_prompt(load_invert_save("photo-mask.png")) for _ in range(4)]
        await asyncio.gather(*(client.wait_done(pid) for pid in ids))
        records = await proxy.services.store.get_many(ids)
        assert {r.backend for r in records} == {"alpha", "beta"}
        assert all(r.outcome == "success" for r in records)
        # The mask editor on an output image: original_ref names the proxy's reference for it.
        status, history = await client.get(f"/history/{ids[0]}")
        output = history[ids[0]]["outputs"]["3"]["images"][0]
        assert "~" in output["filename"]
        assert await upload_mask(client, alpha_mask(), "out-mask.png", output) == (
            200, {"name": "out-mask.png", "subfolder": "", "type": "input"})
        status, composed = await client.get_bytes("/view", filename="out-mask.png", type="input")
        _, made = await client.get_bytes("/view", **output)
        with Image.open(io.BytesIO(composed)) as got, Image.open(io.BytesIO(made)) as original:
            assert status == 200 and got.convert("RGB").tobytes() == original.convert("RGB").tobytes()
            assert got.getchannel("A").tobytes() != original.convert("RGBA").getchannel("A").tobytes()


async def test_a_backend_copy_of_an_upload_is_written_once_whoever_sends_it(sims, tmp_path, monkeypatch) -> None:
    """ComfyUI's `/upload/image` with `overwrite` truncates the file, then writes it: a LoadImage reading the
    copy meanwhile got an empty file (the simulator's 512×512 default), and the mask editor's `/upload/mask`
    on that output a 400 (its mask no longer fit). So copies at once, from a second replica, or after a
    failed dispatch made the copier forget the backend, must all leave the first copy untouched."""
    requests: list[str] = []
    writes: list[str] = []
    handle, write = api_files._image_upload, api_files._write

    def counted_request(paths: Any, post: Any, save: Any = None) -> Any:
        requests.append(post["image"].filename)
        return handle(paths, post, save)

    def counted_write(data: bytes, post: Any, path: str) -> None:
        writes.append(path)
        write(data, post, path)
    monkeypatch.setattr(api_files, "_image_upload", counted_request)
    monkeypatch.setattr(api_files, "_write", counted_write)
    sim = await sims("alpha")
    uploads = UploadStore.in_folder(tmp_path)
    await uploads.save("", "input", "", "photo.png", rgb_png_with_workflow(5), overwrite=False)
    prompt = load_invert_save("photo.png")
    async with ComfyClient(sim.url) as direct, aiohttp.ClientSession() as session:
        object_info = (await direct.get("/object_info"))[1]
        one, two = UploadCopier(uploads, session), UploadCopier(uploads, session)   # two replicas
        sent = await asyncio.gather(*(copier.prepare(prompt, "", sim.url, object_info) for copier in (one, one, two)))
        one.forget(sim.url)
        sent.append(await one.prepare(prompt, "", sim.url, object_info))
        assert len(writes) == 1, writes
        assert len(requests) == 3   # one copier sends a file once, however many prompts need it at once
        assert len(one._copying) == len(two._copying) == 0   # no lock is kept once its copies are done
        assert len({p["1"]["inputs"]["image"] for p in sent}) == 1
        subfolder, _, name = sent[0]["1"]["inputs"]["image"].rpartition("/")
        assert (await direct.get_bytes("/view", filename=name, subfolder=subfolder, type="input")
                == (200, rgb_png_with_workflow(5)))


async def test_mask_originals_are_per_tenant(sims, proxies) -> None:
    tenants = (TenantConfig("alice", api_keys=("ka",)), TenantConfig("bob", api_keys=("kb",)))
    proxy = await proxies([await sims("alpha")], tenants=tenants)
    async with ComfyClient(proxy.url, headers={"X-API-Key": "ka"}) as alice, \
            ComfyClient(proxy.url, headers={"X-API-Key": "kb"}) as bob:
        await alice.connect()
        await upload(alice, rgb_png_with_workflow(1), name="secret.png")
        pid = await alice.queue_prompt(load_invert_save("secret.png"))
        await alice.wait_done(pid)
        output = (await alice.get(f"/history/{pid}"))[1][pid]["outputs"]["3"]["images"][0]
        for ref in ({"filename": "secret.png", "type": "input"}, output):
            assert (await upload_mask(bob, alpha_mask(), "steal.png", ref))[0] == 200
            assert (await bob.get_bytes("/view", filename="steal.png", type="input"))[0] == 404
