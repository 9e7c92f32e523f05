"""A prompt's webhook: `extra_data.webhook` `{url, events}` in `POST /prompt` (or a template run), else
its tenant's default (`tenants[].webhook`), checked at admission and kept on the prompt's record; and the
deliveries its events make.

A delivery's id is the same for every attempt and every replica (derived from the job, its tenant and
admission time included, and the event), so a prompt's end queued twice (two replicas racing, a history
read again) is one delivery, receivers deduplicate retries on `webhook-id`, and a prompt_id a client
uses again later (clients choose them) makes new deliveries.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from proxy.config import WEBHOOK_EVENTS, Config
from proxy.errors import BadRequest
from proxy.store.base import Delivery, PromptRecord
from proxy.urlguard import UrlGuard, UrlRefused

STARTED = "job.started"
CANCELLED = "job.cancelled"
# by the prompt's outcome as the store records it (success | error | interrupted)
ENDED = {"success": "job.completed", "error": "job.failed", "interrupted": CANCELLED}


def ended_as(history: dict[str, Any]) -> str:
    """completed, failed or cancelled (an interrupted run), as ComfyUI's Jobs API reads a history entry."""
    status = history.get("status") or {}
    events = {m[0] for m in status.get("messages", []) if isinstance(m, list) and m}
    if status.get("status_str") == "error":
        return "cancelled" if "execution_interrupted" in events else "failed"
    return "completed"


def _refused(details: str) -> BadRequest:
    return BadRequest("invalid_prompt", "Invalid webhook", details)


def _events(raw: Any) -> list[str]:
    if raw is None:
        return list(WEBHOOK_EVENTS)
    if not isinstance(raw, list) or not raw or not all(isinstance(e, str) and e in WEBHOOK_EVENTS for e in raw):
        raise _refused(f"events must be a non-empty list of {', '.join(WEBHOOK_EVENTS)}")
    return list(dict.fromkeys(raw))


async def subscription_for(extra_data: dict[str, Any], tenant: str, config: Config, guard: UrlGuard,
                           base: str) -> dict[str, Any] | None:
    """The webhook to keep on the prompt's record (`url`, `events`, and `base`: the proxy's address as the
    client reached it, for links in the deliveries), or None; a bad one is a 400 in ComfyUI's shape."""
    raw = extra_data.get("webhook")
    if raw is None:
        own = config.tenant(tenant)
        if own is None or not own.webhook.url:
            return None
        return {"url": own.webhook.url, "events": list(own.webhook.events), "base": base}
    if isinstance(raw, str):
        raw = {"url": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("url"), str):
        raise _refused("extra_data.webhook must be {\"url\": \"https://...\", \"events\": [...]}")
    events = _events(raw.get("events"))
    if config.webhook_secret(tenant) is None:
        raise _refused("webhooks are not configured for this tenant: no signing secret (the tenant's "
                       "webhook.secret; webhooks.secret serves a farm without tenants)")
    try:
        await guard.check(raw["url"])
    except UrlRefused as exc:
        raise _refused(f"webhook url refused: {exc}") from None
    return {"url": raw["url"], "events": events, "base": base}


def delivery_id(rec: PromptRecord, event: str) -> str:
    job = f"{rec.tenant}\n{rec.prompt_id}\n{rec.created_at!r}\n{event}"
    return "msg_" + hashlib.sha256(job.encode()).hexdigest()[:32]


def delivery_ids(rec: PromptRecord) -> list[str]:
    """Every delivery a job can have, the start first."""
    return [delivery_id(rec, event) for event in WEBHOOK_EVENTS]


def deliveries_for(rec: PromptRecord, event: str, job: dict[str, Any] | None = None,
                   now: float | None = None) -> list[Delivery]:
    """The delivery of `event` when the prompt has a webhook that wants it (none otherwise)."""
    hook = rec.webhook
    if not hook or event not in hook.get("events", ()):
        return []
    return [Delivery(id=delivery_id(rec, event), prompt_id=rec.prompt_id, event=event, tenant=rec.tenant,
                     url=hook["url"], base=hook.get("base", ""), created_at=time.time() if now is None else now,
                     admitted_at=rec.created_at, job=job)]
