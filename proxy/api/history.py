"""`/history`: finished prompts as their clients must see them, from the proxy's store.

Entries are stored when a prompt ends (relay.router), already carrying the client's number and
client_id and rewritten file references, so history survives a proxy restart (Redis store) and a
backend that is gone. `max_items`/`offset` follow ComfyUI's `get_history` (protocol §4): without an
offset, `max_items` gives the newest N, oldest first.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.api.context import identity, services
from proxy.store import FINISHED


def _int_param(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None


def window(ids: list[str], max_items: int | None, offset: int | None) -> list[str]:
    """ComfyUI's history slicing: a negative or missing offset with max_items means 'the last N'."""
    start = -1 if offset is None else offset
    if start < 0 and max_items is not None:
        start = len(ids) - max_items
    start = max(start, 0)
    out = ids[start:]
    return out if max_items is None else out[:max(max_items, 0)]


async def get_history(request: web.Request) -> web.Response:
    svc = services(request)
    who = identity(request)
    ids = await svc.store.history_ids()
    records = [r for r in await svc.store.get_many(ids) if who.owns(r.tenant) and r.history is not None]
    chosen = window([r.prompt_id for r in records], _int_param(request, "max_items"),
                    _int_param(request, "offset"))
    by_id = {r.prompt_id: r for r in records}
    out: dict[str, Any] = {pid: by_id[pid].history for pid in chosen}
    return web.json_response(out)


async def get_history_item(request: web.Request) -> web.Response:
    svc = services(request)
    prompt_id = request.match_info["prompt_id"]
    rec = await svc.store.get(prompt_id)
    if rec is None or not identity(request).owns(rec.tenant) or rec.state != FINISHED or rec.history is None:
        return web.json_response({})
    return web.json_response({prompt_id: rec.history})
