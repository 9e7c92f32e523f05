"""Webhook deliveries for operators and job owners: a job's delivery state, the deliveries given up, and
delivering one of those again (admin only)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from proxy.api.admin import require_admin
from proxy.api.context import services
from proxy.errors import BadRequest, NotFound
from proxy.jobs import job
from proxy.outputlinks import with_links
from proxy.services import Services
from proxy.store.base import Delivery, PromptRecord
from proxy.webhooks.subscription import delivery_ids

FAILED_LIMIT = 1000


def delivery_view(d: Delivery) -> dict[str, Any]:
    return {"id": d.id, "prompt_id": d.prompt_id, "event": d.event, "tenant": d.tenant, "url": d.url,
            "status": d.status, "attempts": d.attempts, "last_error": d.last_error or None,
            "created_at": d.created_at, "last_attempt_at": d.last_attempt_at or None,
            "delivered_at": d.delivered_at or None}


async def payload(svc: Services, delivery: Delivery) -> dict[str, Any]:
    """A delivery's body, as Standard Webhooks lays one out: `{"type": "job.completed", "timestamp": ...,
    "data": JOB}`, JOB being the job as `GET /api/jobs/{id}` gives it now (outputs with signed links under
    the address the prompt's client used), or, for a prompt withdrawn before it ran (whose record is gone),
    as it was then. A record gone (expired), or of another job under the same prompt_id, gives `{"id"}`."""
    data = delivery.job
    if data is None:
        rec = await svc.store.get(delivery.prompt_id)
        same = rec is not None and (rec.tenant, rec.created_at) == (delivery.tenant, delivery.admitted_at)
        data = job(rec, detail=True) if rec is not None and same else {"id": delivery.prompt_id}
        if "outputs" in data:
            data["outputs"] = await with_links(svc, data["outputs"], delivery.base)
    stamp = datetime.fromtimestamp(delivery.created_at, UTC).isoformat().replace("+00:00", "Z")
    return {"type": delivery.event, "timestamp": stamp, "data": data}


async def webhook_state(svc: Services, rec: PromptRecord) -> dict[str, Any] | None:
    """A job's `webhook`: its latest delivery's `{status, attempts, last_error}` (and which event), or
    `pending` before any event is queued; None when the job has no webhook."""
    if not rec.webhook:
        return None
    known = await svc.store.webhook_states(delivery_ids(rec))
    if not known:
        return {"status": "pending", "attempts": 0, "last_error": None, "event": None}
    latest = max(known, key=lambda d: d.created_at)
    return {"status": latest.status, "attempts": latest.attempts, "last_error": latest.last_error or None,
            "event": latest.event}


async def failed(request: web.Request) -> web.Response:
    """`GET /proxy/webhooks/failed?limit=N`: deliveries given up, the latest first."""
    require_admin(request)
    raw = request.query.get("limit", "100")
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= FAILED_LIMIT:
        raise BadRequest("bad_request", f"limit must be 1..{FAILED_LIMIT}", raw)
    found = await services(request).store.webhooks_failed(int(raw))
    return web.json_response({"deliveries": [delivery_view(d) for d in found]})


async def redeliver(request: web.Request) -> web.Response:
    """`POST /proxy/webhooks/{id}/redeliver`: a failed delivery goes back to the outbox, due now, with the
    same `webhook-id` (its receiver may have seen an attempt) and its attempts counted afresh."""
    require_admin(request)
    svc = services(request)
    delivery_id = request.match_info["delivery_id"]
    again = await svc.store.webhook_redeliver(delivery_id, time.time())
    if again is None:
        raise NotFound(f"No failed delivery {delivery_id!r}", delivery_id)
    svc.webhooks.nudge()
    return web.json_response(delivery_view(again))
