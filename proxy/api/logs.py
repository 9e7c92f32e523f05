"""The frontend's logs panel through the proxy: the farm's console logs, admins only.

ComfyUI keeps its last 300 console writes (`/internal/logs`, `/internal/logs/raw`) and pushes new ones as
`logs` messages to sockets that `PATCH /internal/logs/subscribe`. The proxy merges every backend's log by
time, each line prefixed with its backend's name. A backend's log shows every prompt it ran, whoever sent
it, so with tenants only admins may read it (403 otherwise).

Live lines: a subscription is shared with every replica over the event bus (the socket may be held by
another replica than the one the PATCH reached), and each backend is asked to push its lines to the
proxy's upstream socket, whose owner relays them, prefixed, to the subscribed sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from aiohttp import web

from proxy.api.admin import require_admin
from proxy.api.context import identity, services
from proxy.api.info import gather_by_backend
from proxy.backend_client import BackendUnreachable
from proxy.errors import BadRequest
from proxy.relay.hub import LOGS_SUBSCRIPTION, ClientEvent
from proxy.relay.messages import prefixed
from proxy.services import Services


async def _raw_logs(svc: Services) -> dict[str, Any]:
    answers = await gather_by_backend(svc, "/internal/logs/raw")
    entries: list[dict[str, Any]] = []
    size = None
    for name, answer in answers:
        if isinstance(answer, dict):
            entries += prefixed(name, answer.get("entries"))
            size = size or answer.get("size")
    entries.sort(key=lambda e: str(e.get("t", "")))
    return {"entries": entries, "size": size or {"cols": 80, "rows": 24}}


async def logs(request: web.Request) -> web.Response:
    require_admin(request)
    raw = await _raw_logs(services(request))
    return web.json_response("".join(f"{e.get('t', '')} - {e['m']}" for e in raw["entries"]))


async def raw_logs(request: web.Request) -> web.Response:
    require_admin(request)
    return web.json_response(await _raw_logs(services(request)))


async def subscribe_logs(request: web.Request) -> web.Response:
    require_admin(request)
    svc = services(request)
    try:
        body = json.loads(await request.read())
        client_id, enabled = str(body["clientId"]), bool(body["enabled"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BadRequest("invalid_request", "Body must be {\"clientId\": str, \"enabled\": bool}", repr(exc)) from exc
    svc.router.publish(ClientEvent(identity(request).tenant, client_id, "1" if enabled else "0", LOGS_SUBSCRIPTION))
    if enabled:   # each backend pushes its lines to the proxy's upstream socket
        async def one(name: str, url: str) -> None:
            # A backend that is down now is asked again when its upstream socket is back (proxy.relay.upstream).
            with contextlib.suppress(BackendUnreachable):
                await svc.client.subscribe_logs(url, svc.dispatcher.upstream_ids.get(name, ""))
        await asyncio.gather(*(one(s.name, s.url) for s in svc.farm.snapshot() if s.polled_ok))
    return web.Response(status=200)
