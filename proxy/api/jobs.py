"""ComfyUI's Jobs API over the farm (`GET /api/jobs`, `GET /api/jobs/{id}`, `POST /api/jobs/{id}/cancel`,
`POST /api/jobs/cancel`; later ComfyUI, protocol §17), built from the proxy's records (`proxy.jobs`), so it
answers the same whatever version the backends run. Each caller sees and cancels only its own jobs
(admins: all); another tenant's job is "not found", never "forbidden". Errors are ComfyUI's
`{"error": "…"}` with 400 or 404.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from proxy import jsoncodec
from proxy.api.context import identity, services
from proxy.api.control import cancel_records
from proxy.api.webhooks import webhook_state
from proxy.jobs import SORT_BY, SORT_ORDER, STATUSES, job, sort_key
from proxy.relay.jobevents import ENDS, JobLog
from proxy.services import Services
from proxy.store import FINISHED, PromptRecord


def _error(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": message}, status=status)


class BadQuery(ValueError):
    """A query parameter ComfyUI refuses: its message is the 400's `error`."""


def _statuses(raw: str | None) -> list[str]:
    if raw is None:
        return list(STATUSES)
    wanted = [s.strip() for s in raw.split(",") if s.strip()]
    bad = [s for s in wanted if s not in STATUSES]
    if bad:
        raise BadQuery(f"Invalid status value(s): {', '.join(bad)}. Valid values: {', '.join(STATUSES)}")
    return wanted


def _choice(query: Any, name: str, allowed: tuple[str, ...], default: str) -> str:
    value = query.get(name, default)
    if value not in allowed:
        raise BadQuery(f"{name} must be one of: {', '.join(allowed)}")
    return str(value)


def _number(query: Any, name: str, least: int) -> int | None:
    raw = query.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise BadQuery(f"{name} must be an integer") from None
    if value < least:
        raise BadQuery(f"{name} must be at least {least}")
    return value


async def _own_records(request: web.Request) -> list[PromptRecord]:
    """The caller's prompts: queued, at backends, running and in history."""
    svc = services(request)
    ids = await svc.store.queued()
    for pinned in (await svc.store.inflight()).values():
        ids += pinned
    ids += await svc.store.history_ids()
    who = identity(request)
    return [r for r in await svc.store.get_many(list(dict.fromkeys(ids))) if who.owns(r.tenant)]


async def list_jobs(request: web.Request) -> web.Response:
    query = request.query
    try:
        statuses = _statuses(query.get("status"))
        sort_by = _choice(query, "sort_by", SORT_BY, "created_at")
        sort_order = _choice(query, "sort_order", SORT_ORDER, "desc")
        limit = _number(query, "limit", 1)
        offset = _number(query, "offset", 0) or 0
    except BadQuery as exc:
        return _error(str(exc))
    workflow_id = query.get("workflow_id")
    jobs = [j for j in (job(r) for r in await _own_records(request)) if j["status"] in statuses
            and (not workflow_id or j.get("workflow_id") == workflow_id)]
    jobs.sort(key=sort_key(sort_by), reverse=sort_order == "desc")
    page = jobs[offset:] if limit is None else jobs[offset:offset + limit]
    return web.json_response({"jobs": page, "pagination": {
        "offset": offset, "limit": limit, "total": len(jobs), "has_more": offset + len(page) < len(jobs)}})


async def _own(request: web.Request, prompt_id: str) -> PromptRecord | None:
    rec = await services(request).store.get(prompt_id)
    return rec if rec is not None and identity(request).owns(rec.tenant) else None


async def get_job(request: web.Request) -> web.Response:
    rec = await _own(request, request.match_info["job_id"])
    if rec is None:
        return _error("Job not found", 404)
    body = job(rec, detail=True)
    webhook = await webhook_state(services(request), rec)
    if webhook is not None:
        body["webhook"] = webhook
    return web.json_response(body)


async def cancel_job(request: web.Request) -> web.Response:
    """Interrupts it if running, dequeues it if pending; a finished job is not cancelled."""
    rec = await _own(request, request.match_info["job_id"])
    if rec is None:
        return _error("Job not found", 404)
    return web.json_response({"cancelled": bool(await cancel_records(services(request), [rec]))})


async def cancel_jobs(request: web.Request) -> web.Response:
    """`{"job_ids": [...]}`: each of the caller's jobs that can be cancelled is; others are left alone."""
    try:
        body = json.loads(await request.read() or b"null")
    except ValueError:
        return _error("Invalid JSON body")
    ids = body.get("job_ids") if isinstance(body, dict) else None
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
        return _error("job_ids must be a non-empty list of job ids")
    who = identity(request)
    records = [r for r in await services(request).store.get_many(list(dict.fromkeys(ids))) if who.owns(r.tenant)]
    return web.json_response({"cancelled": bool(await cancel_records(services(request), records))})


HEARTBEAT_S = 15.0   # a comment this often keeps idle load balancers from closing the stream


def _last_event_id(request: web.Request) -> int:
    raw = request.headers.get("Last-Event-ID", "")
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 12 else 0


async def job_events(request: web.Request) -> web.StreamResponse:
    """`GET /api/jobs/{id}/events`: the job's messages as server-sent events (`event:` ComfyUI's type,
    `data:` its JSON, `id:` its number in the job), from after `Last-Event-ID`, ending with its terminal
    message; a comment every 15 s while nothing happens."""
    rec = await _own(request, request.match_info["job_id"])
    if rec is None:
        return _error("Job not found", 404)
    svc = services(request)
    log = svc.hub.jobs.open(rec.prompt_id, rec.tenant)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})   # nginx: pass each event on at once
    await resp.prepare(request)
    last = _last_event_id(request)
    if rec.state == FINISHED:
        await _end_from_history(svc, rec.prompt_id, log)
    while True:
        for number, type_, data in log.after(last):
            await resp.write(f"id: {number}\nevent: {type_}\ndata: {data}\n\n".encode())
            last = number
            if type_ in ENDS:
                return resp
        changed = log.changed
        try:
            await asyncio.wait_for(changed.wait(), HEARTBEAT_S)
        except TimeoutError:
            await resp.write(b": keep-alive\n\n")
            await _end_from_history(svc, rec.prompt_id, log)


async def _end_from_history(svc: Services, prompt_id: str, log: JobLog) -> None:
    """A job that ended while this replica was not following it (or whose log was dropped): its terminal
    message from history, so the stream still ends."""
    if log.ended_at is not None:
        return
    rec = await svc.store.get(prompt_id)
    if rec is None or rec.state != FINISHED or rec.history is None:
        return
    for event, data in (rec.history.get("status") or {}).get("messages", []):
        if event in ENDS and isinstance(data, dict):
            log.append(event, jsoncodec.dumps_compact({"type": event, "data": data}))
            return
