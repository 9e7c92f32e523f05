"""Control routes that act on prompts: `POST /queue` (delete, clear), `POST /interrupt`, `POST /free`,
`POST /history` (delete, clear). Each acts only on the caller's own prompts; on a backend, by prompt_id,
never backend-wide, since ComfyUI's global forms would touch everyone's work (protocol §9). Answers are
bare 200s, as ComfyUI gives them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import structlog
from aiohttp import web

from proxy.api.context import identity, services
from proxy.backend_client import BackendUnreachable
from proxy.jobs import CANCELLED, job
from proxy.relay.hub import WITHDRAWN, ClientEvent
from proxy.services import Services
from proxy.store import DISPATCHED, FINISHED, RUNNING, PromptRecord
from proxy.tenancy import Identity
from proxy.webhooks.subscription import CANCELLED as CANCELLED_EVENT
from proxy.webhooks.subscription import deliveries_for

log = structlog.get_logger(__name__)


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise web.HTTPBadRequest() from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest()
    return body


async def _own(svc: Services, who: Identity, prompt_ids: list[Any]) -> list[PromptRecord]:
    ids = [str(p) for p in prompt_ids]
    return [r for r in await svc.store.get_many(ids) if who.owns(r.tenant)]


async def _backend_call(svc: Services, backend: str | None, path: str, body: dict[str, Any]) -> None:
    state = svc.farm.get(backend) if backend else None
    if state is None:
        return
    try:
        await svc.client.post_bare(state.url, path, body)
    except BackendUnreachable as exc:
        log.warning("backend_call_failed", backend=backend, path=path, error=str(exc))
        svc.farm.mark_down(state.name, f"POST {path} failed: {exc}")  # passive detection (proxy.health)


async def _withdraw(svc: Services, records: list[PromptRecord]) -> list[str]:
    """Remove prompts that have not started; those already at a backend are deleted there too. Returns
    the ids removed (one that started meanwhile is not)."""
    removed: list[str] = []
    for rec in records:
        # a withdrawn prompt's webhook hears job.cancelled, with the job as it was (its record goes)
        cancelled = (deliveries_for(rec, CANCELLED_EVENT, job={**job(rec), "status": CANCELLED})
                     if rec.webhook else [])
        state = await svc.store.withdraw(rec.prompt_id, deliveries=cancelled)
        if state == DISPATCHED:
            await _backend_call(svc, rec.backend, "/queue", {"delete": [rec.prompt_id]})
        if state is not None:
            svc.router.queue_changed(rec.tenant)
            removed.append(rec.prompt_id)
            if rec.client_id is not None:
                svc.router.publish(ClientEvent(rec.tenant, rec.client_id, rec.prompt_id, WITHDRAWN))
            if cancelled:
                svc.webhooks.nudge()
    svc.dispatcher.wake()
    return removed


async def post_queue(request: web.Request) -> web.Response:
    svc = services(request)
    who = identity(request)
    body = await _json_body(request)
    if body.get("clear"):
        ids = await svc.store.queued()
        for pinned in (await svc.store.inflight()).values():
            ids.extend(pinned)
        await _withdraw(svc, [r for r in await _own(svc, who, ids) if r.state != RUNNING])
    if isinstance(body.get("delete"), list):
        await _withdraw(svc, await _own(svc, who, body["delete"]))
    return web.Response(status=200)


async def post_interrupt(request: web.Request) -> web.Response:
    svc = services(request)
    who = identity(request)
    body = await _json_body(request)
    if body.get("prompt_id") is not None:
        targets = await _own(svc, who, [body["prompt_id"]])
    else:
        # ComfyUI's global interrupt stops whatever runs, whoever owns it: here, only the caller's.
        ids = [pid for pinned in (await svc.store.inflight()).values() for pid in pinned]
        targets = await _own(svc, who, ids)
    running = [r for r in targets if r.state == RUNNING]
    await asyncio.gather(*(_backend_call(svc, r.backend, "/interrupt", {"prompt_id": r.prompt_id})
                           for r in running))
    return web.Response(status=200)


async def cancel_records(svc: Services, records: list[PromptRecord]) -> list[str]:
    """Cancel jobs (`/api/jobs`): pending ones leave the queue (here or at their backend), running ones are
    interrupted by prompt_id; finished ones are left alone. Returns the ids cancelled."""
    pending = [r for r in records if r.state not in (RUNNING, FINISHED)]
    withdrawn = await _withdraw(svc, pending)
    started = [r.prompt_id for r in pending if r.prompt_id not in withdrawn]   # began meanwhile
    running = [r for r in records if r.state == RUNNING]
    running += [r for r in await svc.store.get_many(started) if r.state == RUNNING]
    await asyncio.gather(*(_backend_call(svc, r.backend, "/interrupt", {"prompt_id": r.prompt_id})
                           for r in running))
    return withdrawn + [r.prompt_id for r in running]


async def post_free(request: web.Request) -> web.Response:
    svc = services(request)
    body = await _json_body(request)
    flags: dict[str, Any] = {k: bool(body[k]) for k in ("unload_models", "free_memory") if k in body}
    await asyncio.gather(*(_backend_call(svc, s.name, "/free", flags) for s in svc.farm.snapshot()
                           if s.polled_ok))
    return web.Response(status=200)


async def post_history(request: web.Request) -> web.Response:
    svc = services(request)
    who = identity(request)
    body = await _json_body(request)
    ids: list[str] = []
    if body.get("clear"):
        ids = await svc.store.history_ids()
    if isinstance(body.get("delete"), list):
        ids += [str(p) for p in body["delete"]]
    await svc.store.forget_history([r.prompt_id for r in await _own(svc, who, ids)])
    return web.Response(status=200)
