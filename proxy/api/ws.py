"""`/ws`: a client's websocket, with ComfyUI's connect sequence (protocol §8).

On connect: `status` with `sid` and the client's own queue count; if one of the client's prompts is
running, `executing` with its current node (no prompt_id), as ComfyUI does for a reconnecting client.
A first message `feature_flags` is answered with the server's flags and switches previews to type 4.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
from aiohttp import web

from proxy.api.context import identity, services
from proxy.relay import messages
from proxy.relay.hub import LOGS_SUBSCRIPTION, ClientEvent, ClientSocket, write_loop
from proxy.store import RUNNING


def feature_flags(max_upload_size: int) -> str:
    return messages.message("feature_flags", {"supports_preview_metadata": True,
                                              "max_upload_size": max_upload_size})


async def websocket(request: web.Request) -> web.WebSocketResponse:
    svc = services(request)
    ws = web.WebSocketResponse(max_msg_size=1024 * 1024, heartbeat=None)
    await ws.prepare(request)
    tenant = identity(request).tenant
    client_id = request.query.get("clientId") or svc.hub.new_client_id()
    sock = ClientSocket(ws, tenant, client_id, transport=request.transport)
    # ComfyUI greets a socket with its queue count and the socket's id; the proxy's count is the tenant's.
    sock.offer(messages.status(await svc.store.count_active(tenant), sid=client_id))
    active = await svc.store.active_prompts(tenant, client_id)
    for rec in await svc.store.get_many(active):
        if rec.state == RUNNING and rec.current_node is not None:
            sock.offer(messages.executing(rec.current_node))
            break
    svc.hub.register(sock)
    writer = asyncio.create_task(write_loop(sock), name=f"ws-writer-{client_id}")
    first = True
    try:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            if first:
                first = False
                try:
                    parsed = json.loads(msg.data)
                except ValueError:
                    continue
                if isinstance(parsed, dict) and parsed.get("type") == "feature_flags":
                    data = parsed.get("data") or {}
                    sock.wants_metadata = bool(isinstance(data, dict) and data.get("supports_preview_metadata"))
                    sock.offer(feature_flags(svc.config.server.max_body_mb * 1024 * 1024))
            # Other client messages are ignored, as ComfyUI does.
    finally:
        if svc.hub.unregister(sock) and (tenant, client_id) in svc.hub.log_subscribers:
            # Every replica lists the subscription (a backend restart renews it if any is left): end it.
            svc.router.publish(ClientEvent(tenant, client_id, "0", LOGS_SUBSCRIPTION))
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionResetError):
            await writer
    return ws
