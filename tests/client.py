"""A ComfyUI client for tests, doing what real clients do: a websocket per clientId, POST /prompt,
waiting for `executing` with node null, then /history and /view."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from proxy.app import SERVICES, Services


@dataclass
class ProxyHandle:
    url: str
    runner: web.AppRunner

    @property
    def app(self) -> web.Application:
        return self.runner.app

    @property
    def services(self) -> Services:
        return self.runner.app[SERVICES]

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_proxy(app: web.Application, port: int = 0) -> ProxyHandle:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    real_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return ProxyHandle(f"http://127.0.0.1:{real_port}", runner)


@dataclass
class Frame:
    text: dict[str, Any] | None = None
    binary: bytes | None = None

    @property
    def type(self) -> str:
        return self.text["type"] if self.text else "binary"


@dataclass
class ComfyClient:
    """One client: a session, a clientId and its websocket, recording every frame it receives."""

    base: str
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    session: aiohttp.ClientSession | None = None
    ws: aiohttp.ClientWebSocketResponse | None = None
    frames: list[Frame] = field(default_factory=list)
    _new: asyncio.Condition = field(default_factory=asyncio.Condition)
    _reader: asyncio.Task[None] | None = None

    headers: dict[str, str] = field(default_factory=dict)

    async def __aenter__(self) -> ComfyClient:
        self.session = aiohttp.ClientSession(headers=self.headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self.ws is not None:
            await self.ws.close()
        assert self.session is not None
        await self.session.close()

    async def connect(self, feature_flags: bool = False, query: str = "") -> None:
        assert self.session is not None
        self.ws = await self.session.ws_connect(
            f"{self.base.replace('http', 'ws', 1)}/ws?clientId={self.client_id}{query}")
        if feature_flags:
            await self.ws.send_str(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            frame = Frame(text=json.loads(msg.data)) if msg.type == aiohttp.WSMsgType.TEXT else Frame(binary=msg.data)
            async with self._new:
                self.frames.append(frame)
                self._new.notify_all()

    async def wait_for(self, predicate: Any, timeout: float = 15.0) -> Frame:
        async def scan() -> Frame:
            async with self._new:
                seen = 0
                while True:
                    for frame in self.frames[seen:]:
                        if predicate(frame):
                            return frame
                    seen = len(self.frames)
                    await self._new.wait()
        return await asyncio.wait_for(scan(), timeout)

    async def wait_done(self, prompt_id: str, timeout: float = 15.0) -> Frame:
        return await self.wait_for(lambda f: f.text is not None and f.text["type"] == "executing"
                                   and f.text["data"].get("node") is None
                                   and f.text["data"].get("prompt_id") == prompt_id, timeout)

    def messages_of(self, prompt_id: str) -> list[dict[str, Any]]:
        return [f.text for f in self.frames if f.text is not None
                and isinstance(f.text.get("data"), dict) and f.text["data"].get("prompt_id") == prompt_id]

    def messages_of_type(self, type_: str) -> list[dict[str, Any]]:
        return [f.text for f in self.frames if f.text is not None and f.text.get("type") == type_]

    async def post(self, path: str, body: Any = None, *, raw: bytes | None = None) -> tuple[int, Any]:
        assert self.session is not None
        kwargs: dict[str, Any] = {"data": raw} if raw is not None else {"json": body}
        async with self.session.post(self.base + path, **kwargs) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text) if text else None
            except ValueError:
                return resp.status, text

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        assert self.session is not None
        async with self.session.request(method, self.base + path, json=body) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else None

    async def patch(self, path: str, body: Any) -> tuple[int, Any]:
        assert self.session is not None
        async with self.session.patch(self.base + path, json=body) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else None

    async def get_from(self, base: str, path: str) -> tuple[int, Any]:
        """A GET from another server (a backend directly)."""
        assert self.session is not None
        async with self.session.get(base + path) as resp:
            return resp.status, json.loads(await resp.text() or "null")

    async def post_to(self, base: str, path: str, body: Any) -> int:
        """A call to another server (a simulator's fault switch)."""
        assert self.session is not None
        async with self.session.post(base + path, json=body) as resp:
            await resp.read()
            return resp.status

    async def get(self, path: str, **params: str) -> tuple[int, Any]:
        assert self.session is not None
        async with self.session.get(self.base + path, params=params) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text and resp.content_type == "application/json" else text

    async def get_bytes(self, path: str, **params: str) -> tuple[int, bytes]:
        assert self.session is not None
        async with self.session.get(self.base + path, params=params) as resp:
            return resp.status, await resp.read()

    async def queue_prompt(self, prompt: dict[str, Any], **extra: Any) -> str:
        status, body = await self.post("/prompt", {"prompt": prompt, "client_id": self.client_id, **extra})
        assert status == 200, body
        return str(body["prompt_id"])


async def run_failing(client: ComfyClient, backend_url: str, prompt: dict[str, Any]) -> str:
    """A prompt that ends in `execution_error` at its KSampler (the simulator's fault switch), run to its
    end on `client`'s socket (connected); the fault is lifted afterwards."""
    await client.post_to(backend_url, "/sim/faults", {"error_at_node": "KSampler"})
    try:
        pid = await client.queue_prompt(prompt)
        await client.wait_done(pid)
    finally:
        await client.post_to(backend_url, "/sim/faults", {"error_at_node": None})
    return pid


def txt2img(seed: int, steps: int = 4, *, ckpt: str = "v1-5-pruned-emaonly.safetensors", prefix: str = "ComfyUI",
            width: int = 64, height: int = 64) -> dict[str, Any]:
    """ComfyUI's default text-to-image graph (API format), small and fast on the simulator."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    }
