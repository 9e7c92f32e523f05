"""What the conformance tests share: model-free image workflows that real ComfyUI runs on the CPU, one
client run (websocket frames, history), normalisation of what legitimately differs between two runs
(ids, timestamps, output counters, the proxy's file references), and a PNG reader for pixel equality."""

from __future__ import annotations

import contextlib
import itertools
import random
import re
import struct
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from tests.client import ComfyClient

RUN_TIMEOUT_S = 60.0
_colors = itertools.count(random.randrange(1, 1 << 23))


def fresh_color() -> int:
    """A colour no earlier prompt of this session used: ComfyUI caches node outputs across prompts by
    their inputs, so a fresh colour makes every node run (EmptyImage's `color` is 0..0xFFFFFF)."""
    return next(_colors) % 0xFFFFFF


def image_chain(color: int, prefix: str = "conf", output: str = "SaveImage") -> dict[str, Any]:
    """EmptyImage → ImageInvert → SaveImage (or PreviewImage, which writes to temp/), the traces' prompt."""
    save = {"filename_prefix": prefix} if output == "SaveImage" else {}
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": output, "inputs": {**save, "images": ["2", 0]}},
    }


def load_chain(image: str, prefix: str = "upl") -> dict[str, Any]:
    """LoadImage (an uploaded file) → ImageInvert → ImageScale → SaveImage."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "ImageScale", "inputs": {"image": ["2", 0], "upscale_method": "nearest-exact",
                                                     "width": 32, "height": 24, "crop": "disabled"}},
        "4": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["3", 0]}},
    }


def titled(workflow: dict[str, Any], titles: dict[str, str]) -> dict[str, Any]:
    """An API-format workflow as the web UI's "Save (API Format)" writes it: `_meta.title` on each node
    (client libraries address nodes by title)."""
    return {nid: {**node, "_meta": {"title": titles[nid]}} for nid, node in workflow.items()}


def slow_chain(color: int, blurs: int = 8) -> dict[str, Any]:
    """EmptyImage 256² → `blurs` × ImageBlur(31) → PreviewImage: about 0.45 s a node on 2 CPU cores, and
    ComfyUI honours an interrupt at the next node."""
    prompt: dict[str, Any] = {"1": {"class_type": "EmptyImage",
                                    "inputs": {"width": 256, "height": 256, "batch_size": 1, "color": color}}}
    for i in range(2, 2 + blurs):
        prompt[str(i)] = {"class_type": "ImageBlur",
                          "inputs": {"image": [str(i - 1), 0], "blur_radius": 31, "sigma": 10.0}}
    prompt["99"] = {"class_type": "PreviewImage", "inputs": {"images": [str(1 + blurs), 0]}}
    return prompt


@dataclass
class Run:
    prompt_id: str
    frames: list[dict[str, Any] | str]   # text messages; "binary" for a binary frame
    history: dict[str, Any]              # the entry of /history/{prompt_id}


async def run_prompt(base: str, prompt: dict[str, Any], **extra: Any) -> Run:
    """A client's whole flow: websocket, POST /prompt, every frame until `executing` null, history."""
    async with ComfyClient(base) as client:
        await client.connect()
        await client.wait_for(lambda f: f.type == "status")  # the greeting: the socket is registered
        prompt_id = await client.queue_prompt(prompt, **extra)
        await client.wait_done(prompt_id, RUN_TIMEOUT_S)
        status, history = await client.get(f"/history/{prompt_id}")
        assert status == 200 and prompt_id in history, history
        frames: list[dict[str, Any] | str] = [f.text if f.text is not None else "binary" for f in client.frames]
        return Run(prompt_id, frames, history[prompt_id])


async def get_bytes(session: aiohttp.ClientSession, url: str, **params: str) -> tuple[int, bytes, str]:
    async with session.get(url, params=params) as r:
        return r.status, await r.read(), r.headers.get("Content-Type", "")


@contextlib.asynccontextmanager
async def pinned(proxy_url: str, backend: str, others: list[str]) -> AsyncIterator[None]:
    """Make the proxy dispatch to `backend` only, with its own admin route: drain the others."""
    async with aiohttp.ClientSession() as s:
        for name in others:
            async with s.post(f"{proxy_url}/proxy/backends/{name}/drain") as r:
                assert r.status == 200, await r.text()
        try:
            yield
        finally:
            for name in others:
                async with s.post(f"{proxy_url}/proxy/backends/{name}/undrain") as r:
                    assert r.status == 200, await r.text()


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_OUTPUT_NAME = re.compile(r"(?P<prefix>.*)_\d{5}_(?P<ref>~[a-z2-7]{20})?(?P<ext>\.\w+)")
_TEMP_PREFIX = re.compile(r"_temp_[a-z]{5}$")  # PreviewImage: ComfyUI_temp_<5 random letters>_00001_.png


def normalized(obj: Any, ids: dict[str, str] | None = None) -> Any:
    """What may differ between two faithful runs, made equal: prompt ids → PID<n> in order of
    appearance, timestamps → 0, socket and client ids → SID/CID, output counters → NNNNN, the proxy's
    file reference (`~<ref>` in a file name) removed, PreviewImage's random temp prefix → XXXXX."""
    ids = {} if ids is None else ids

    def pid(value: str) -> str:
        return ids.setdefault(value, f"PID{len(ids)}")

    def walk(o: Any, key: str | None = None) -> Any:
        if isinstance(o, dict):
            return {(pid(k) if _UUID.fullmatch(k) else k): walk(v, k) for k, v in o.items()}
        if isinstance(o, list):
            return [walk(x) for x in o]
        if key in ("timestamp", "create_time"):
            return 0
        if key == "sid":
            return "SID"
        if key == "client_id":
            return "CID"
        if key == "filename" and isinstance(o, str) and (m := _OUTPUT_NAME.fullmatch(o)):
            return f"{_TEMP_PREFIX.sub('_temp_XXXXX', m['prefix'])}_NNNNN_{m['ext']}"
        if isinstance(o, str) and (key == "prompt_id" or _UUID.fullmatch(o)):
            return pid(o)
        return o
    return walk(obj)


def normalized_history(entry: dict[str, Any]) -> dict[str, Any]:
    """A history entry with the graph and the queue number set aside (compared on their own)."""
    out = normalized(entry)
    out["prompt"] = [0, out["prompt"][1], "GRAPH", *out["prompt"][3:]]
    return out


def message_types(frames: Sequence[dict[str, Any] | str]) -> list[str]:
    return [f["type"] if isinstance(f, dict) else f for f in frames]


def output_files(history: dict[str, Any]) -> list[dict[str, str]]:
    return [image for node in history["outputs"].values() for image in node.get("images", [])]


def png(width: int, height: int, seed: int) -> bytes:
    """A small RGB PNG with a pattern from `seed`: an upload that a LoadImage can read."""
    rows = b"".join(b"\0" + bytes((x * 7 + y * 13 + seed) % 256 for x in range(width * 3)) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def png_pixels(data: bytes) -> tuple[bytes, bytes]:
    """(IHDR, filtered scanlines) of a PNG: equal pixels whatever text chunks (SaveImage writes the prompt
    into one) the file carries."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    pos, header, idat = 8, b"", b""
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return header, zlib.decompress(idat)


def differences(got: Any, want: Any, path: str = "$") -> list[str]:
    """Where two JSON values differ, as `path: got != want` lines (a readable assertion message)."""
    if isinstance(got, dict) and isinstance(want, dict):
        out = [f"{path}: key order {list(got)} != {list(want)}"] if list(got) != list(want) and \
            set(got) == set(want) else []
        for key in sorted(set(got) | set(want), key=str):
            if key not in got or key not in want:
                out.append(f"{path}.{key}: {'missing' if key not in got else 'extra'}")
            else:
                out += differences(got[key], want[key], f"{path}.{key}")
        return out
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        return [d for i, (g, w) in enumerate(zip(got, want, strict=True)) for d in differences(g, w, f"{path}[{i}]")]
    if type(got) is not type(want) or got != want:
        return [f"{path}: {got!r:.300} != {want!r:.300}"]
    return []


def assert_same(got: Any, want: Any, what: str = "") -> None:
    """got == want, exactly (key order included, as on the wire), with the differences as the message."""
    found = differences(got, want)
    assert not found, f"{what} differs from real ComfyUI:\n" + "\n".join(found[:20])
