"""`GET /ws` as ComfyUI serves it (server.py `websocket_handler`, comfyui-protocol.md §8).

First message `status` with `sid`; then, if the running prompt belongs to this clientId, `executing` with
the current node and no prompt_id. A first client message `feature_flags` is stored and answered.
"""

from __future__ import annotations

import json
import uuid

from aiohttp import WSMsgType, web

from proxy.sim.state import SIM

routes = web.RouteTableDef()


@routes.get("/ws")
async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    sim = request.app[SIM]
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    sid = request.rel_url.query.get("clientId", "") or uuid.uuid4().hex
    sim.hub.register(sid, ws, request.transport)
    try:
        await sim.hub.send("status", {"status": sim.queue_info(), "sid": sid}, sid)
        if sim.executor.client_id == sid and sim.executor.last_node_id is not None:
            # Reconnect of the running prompt's client: the current node, without prompt_id (protocol §8).
            await sim.hub.send("executing", {"node": sim.executor.last_node_id}, sid)
        first_message = True
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                data = json.loads(msg.data)
            except ValueError:
                continue
            if first_message and isinstance(data, dict) and data.get("type") == "feature_flags":
                if sid in sim.hub.metadata:
                    sim.hub.metadata[sid]["feature_flags"] = data.get("data", {})
                await sim.hub.send("feature_flags", sim.hub.server_features, sid)
            first_message = False
    finally:
        sim.hub.unregister(sid)
    return ws
