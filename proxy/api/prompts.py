"""`/prompt` and `/queue`: admission, and the queue as the proxy sees it (its own queue plus the prompts
it has at backends), in ComfyUI's item shape `[number, prompt_id, prompt, extra_data, outputs]`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from proxy.admission import Admitted, admit, parse_body
from proxy.api.context import identity, public_base, services
from proxy.backends import BackendState
from proxy.capability import combos_of
from proxy.errors import ProxyError, QuotaExceeded
from proxy.metrics import METRICS
from proxy.relay.router import prompt_item
from proxy.store import RUNNING, PromptRecord
from proxy.webhooks.subscription import subscription_for


async def post_prompt(request: web.Request) -> web.Response:
    admitted = await admit_request(request, None)
    return web.json_response(admitted.answer())


async def admit_request(request: web.Request, body: dict[str, Any] | None) -> Admitted:
    """Admission for a request: `POST /prompt`'s body, or a body built by a workflow template."""
    svc = services(request)
    who = identity(request)
    tenant = who.tenant
    try:
        if body is None:
            body = parse_body(await request.read())
        pools = set(who.pools)
        backends: list[tuple[BackendState, Mapping[str, Any]]] | None = [
            (s, svc.farm.object_info_of(s.name)) for s in svc.farm.snapshot()
            if s.polled_ok and (not pools or pools & set(s.config.labels))]
        object_info = svc.farm.merged_object_info()
        combos = svc.farm.merged_combos()
        if not object_info:   # no backend up (scaled to zero): the kept catalogue; the prompt waits in the queue
            object_info, backends = svc.membership.catalogue(), None
            combos = combos_of(object_info)
        uploaded = await svc.uploads.named_in(body, tenant, object_info)
        extra = body.get("extra_data")
        webhook = await subscription_for(extra if isinstance(extra, dict) else {}, tenant, svc.config, svc.guard,
                                         public_base(request))
        admitted = await admit(body, store=svc.store, object_info=object_info, who=who,
                               uploaded=uploaded.__contains__,
                               backends=backends, combos=combos,
                               idle_credit=svc.config.scheduler.idle_tenant_credit, webhook=webhook)
    except ProxyError as exc:
        metrics = request.app[METRICS]
        metrics.rejected.labels(tenant or "anonymous", exc.type).inc()
        if isinstance(exc, QuotaExceeded):
            metrics.quota_rejections.labels(tenant or "anonymous", (exc.extra_info or {})["limit"]).inc()
        raise
    svc.router.queue_status.show(tenant, admitted.active)   # ComfyUI's queue.put() broadcasts the count
    svc.dispatcher.wake()
    return admitted


async def _tenant_records(request: web.Request) -> list[PromptRecord]:
    svc = services(request)
    who = identity(request)
    ids = await svc.store.queued()
    for pinned in (await svc.store.inflight()).values():
        ids.extend(pinned)
    return [rec for rec in await svc.store.get_many(ids) if who.owns(rec.tenant)]


async def get_prompt(request: web.Request) -> web.Response:
    who = identity(request)
    count = await services(request).store.count_active(None if who.admin else who.tenant)
    return web.json_response({"exec_info": {"queue_remaining": count}})


async def get_queue(request: web.Request) -> web.Response:
    records = await _tenant_records(request)
    running = [prompt_item(r) for r in records if r.state == RUNNING]
    pending = sorted((r for r in records if r.state != RUNNING), key=lambda r: r.number)
    return web.json_response({"queue_running": running, "queue_pending": [prompt_item(r) for r in pending]})
