"""`/proxy/workflows` and `/proxy/jobs`: the template API for applications (see `proxy.workflows`).

A run is admitted exactly like `POST /prompt` (tenant, quotas, validation, fair queue), so it shows in
`/history`, `/queue` and on `/ws`. A job's status comes from the prompt's record: `queued` (in the
proxy's queue or sent to a backend), `running`, then `completed`, `error` or `interrupted`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from proxy.api.context import identity, public_base, services
from proxy.api.prompts import admit_request
from proxy.api.run import answer_when_done, wait_seconds
from proxy.api.webhooks import webhook_state
from proxy.errors import BadRequest, NotFound
from proxy.jobs import CANCELLED, COMPLETED, FAILED, IN_PROGRESS, PENDING, run_error, status_of
from proxy.outputlinks import linked
from proxy.services import WORKFLOWS, Services
from proxy.store import FINISHED
from proxy.workflows import Template

# `/proxy/jobs/{id}`'s words for the job model's statuses (proxy.jobs): the same job, as documented before
JOB_STATUS = {PENDING: "queued", IN_PROGRESS: "running", COMPLETED: "completed", FAILED: "error",
              CANCELLED: "interrupted"}


def catalogue(svc: Services) -> dict[str, Any]:
    """The farm's node definitions: its backends' merged `/object_info`, else the last kept (scaled to zero)."""
    return svc.farm.merged_object_info() or svc.membership.catalogue()


def template_named(request: web.Request, name: str) -> Template:
    """The template in API format (a UI-format one converted now); 404 when there is none of that name."""
    template = request.app[WORKFLOWS].get(name)
    if template is None:
        raise NotFound(f"No workflow named {name!r}", name)
    return template.resolved(catalogue(services(request)))


def _template(request: web.Request) -> Template:
    return template_named(request, request.match_info["name"])


async def list_workflows(request: web.Request) -> web.Response:
    return web.json_response({"workflows": [{"name": t.name, "description": t.description}
                                            for t in request.app[WORKFLOWS].values()]})


async def describe_workflow(request: web.Request) -> web.Response:
    t = _template(request)
    return web.json_response({"name": t.name, "description": t.description, "inputs": t.schema()})


async def run_workflow(request: web.Request) -> web.Response:
    template = _template(request)
    try:
        body = await request.json()
    except ValueError as exc:
        raise BadRequest("invalid_prompt", "Invalid JSON in request body", str(exc)) from exc
    if not isinstance(body, dict):
        raise BadRequest("invalid_prompt", "Request body must be a JSON object", type(body).__name__)
    waits = "wait_s" in body
    wait_s = wait_seconds(body) if waits else 0.0
    prompt: dict[str, Any] = {"prompt": template.fill(body.get("inputs", {}))}
    if body.get("client_id") is not None:
        prompt["client_id"] = str(body["client_id"])
    admitted = await admit_request(request, prompt)
    if waits:   # run-and-wait, as `POST /proxy/run`
        return await answer_when_done(request, admitted.record.prompt_id, wait_s)
    return web.json_response({"prompt_id": admitted.record.prompt_id, "number": admitted.record.number})


async def _outputs(request: web.Request, history: dict[str, Any], base: str) -> list[dict[str, Any]]:
    """Each output file with its `/view` URL (absolute under `server.public_url` when one is set, else
    relative to the host) and a signed `link` anyone may fetch until it expires (`proxy.links`)."""
    out = []
    for ui in (history.get("outputs") or {}).values():
        for items in (ui or {}).values():
            for item in items if isinstance(items, list) else ():
                if isinstance(item, dict) and "filename" in item:
                    query = {k: item.get(k, "") for k in ("filename", "subfolder", "type")}
                    entry = {"url": f"{base}/view?{urlencode(query)}", "filename": item["filename"],
                             "subfolder": item.get("subfolder", ""), "type": item.get("type", "output")}
                    if (found := await linked(services(request), item, public_base(request))) is not None:
                        entry["link"] = found[1]
                    out.append(entry)
    return out


async def job(request: web.Request) -> web.Response:
    prompt_id = request.match_info["prompt_id"]
    rec = await services(request).store.get(prompt_id)
    if rec is None or not identity(request).owns(rec.tenant):
        raise NotFound(f"No job {prompt_id!r}", prompt_id)
    body: dict[str, Any] = {"prompt_id": prompt_id, "status": JOB_STATUS[status_of(rec)],
                            "progress": {"node": rec.current_node}, "outputs": [], "error": None}
    if rec.state == FINISHED and rec.history is not None:
        body["outputs"] = await _outputs(request, rec.history,
                                         (services(request).config.server.public_url or "").rstrip("/"))
        body["progress"] = {"node": None, "done": True}
        body["error"] = run_error(rec.history)
    webhook = await webhook_state(services(request), rec)
    if webhook is not None:
        body["webhook"] = webhook
    return web.json_response(body)
