"""The simulator's websocket registry and outgoing message pump (ComfyUI server.py `send*`, `publish_loop`).

Execution code calls `send_sync`, which only enqueues; one publisher task sends in order, so a slow
socket never stalls execution. `sid=None` means every socket, exactly as in ComfyUI.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from aiohttp import web

from proxy.jsoncodec import dumps_comfyui

log = structlog.get_logger(__name__)

BINARY = "binary"  # event name of a pre-encoded binary frame


class SocketHub:
    def __init__(self, max_upload_size: int) -> None:
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.metadata: dict[str, dict[str, Any]] = {}
        self.transports: dict[str, asyncio.Transport | None] = {}
        self.server_features = {"supports_preview_metadata": True, "max_upload_size": max_upload_size}
        self._outbox: asyncio.Queue[tuple[str, Any, str | None]] = asyncio.Queue()

    def register(self, sid: str, ws: web.WebSocketResponse, transport: asyncio.Transport | None) -> None:
        self.sockets.pop(sid, None)  # a reconnect with the same clientId takes the slot over
        self.sockets[sid] = ws
        self.metadata[sid] = {"feature_flags": {}}
        self.transports[sid] = transport

    def unregister(self, sid: str) -> None:
        # ComfyUI quirk: pops by id, so an old socket closing drops a newer one registered under its id.
        self.sockets.pop(sid, None)
        self.metadata.pop(sid, None)
        self.transports.pop(sid, None)

    def supports_preview_metadata(self, sid: str | None) -> bool:
        if sid is None or sid not in self.metadata:
            return False
        return self.metadata[sid].get("feature_flags", {}).get("supports_preview_metadata", False) is True

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        self._outbox.put_nowait((event, data, sid))

    def send_frame(self, frame: bytes, sid: str | None = None) -> None:
        self._outbox.put_nowait((BINARY, frame, sid))

    async def send(self, event: str, data: Any, sid: str | None = None) -> None:
        if sid is None:
            targets = list(self.sockets.values())
        else:
            targets = [self.sockets[sid]] if sid in self.sockets else []
        for ws in targets:
            try:
                if event == BINARY:
                    await ws.send_bytes(data)
                else:
                    await ws.send_str(dumps_comfyui({"type": event, "data": data}))
            except (ConnectionError, RuntimeError) as err:
                log.warning("sim_send_error", error=str(err), sid=sid)

    async def publish_loop(self) -> None:
        while True:
            event, data, sid = await self._outbox.get()
            try:
                await self.send(event, data, sid)
            except Exception:  # one bad message must not silence the simulator
                log.exception("sim_publish_failed", event=event, sid=sid)

    async def close_all(self, abort: bool) -> None:
        """Close every socket: by aborting the connection like a network drop, or with a close frame
        (a second at most, so a stalled client cannot hold up shutdown)."""
        if abort:
            for transport in list(self.transports.values()):
                if transport is not None:
                    transport.abort()
            return
        closing = [asyncio.wait_for(ws.close(), 1.0) for ws in list(self.sockets.values())]
        await asyncio.gather(*closing, return_exceptions=True)
