"""`POST /proxy/run`: run-and-wait for services that cannot hold a socket. The body is `/prompt`'s plus
`wait_s` (at most 300); the answer is the finished job as `GET /api/jobs/{id}` gives it, each output with
a signed `link` (and with `?inline=1` its bytes, base64, when no larger than `jobs.inline_max_bytes`), or,
when it has not ended in time, 202 with `Location: /api/jobs/{id}` to follow it there.

The wait ends on the prompt's end as it crosses the event bus (`ClientHub.watch_end`), whichever replica
settled it, with a read of the store each second as a floor.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiohttp import web

from proxy.admission import parse_body
from proxy.api.context import public_base, services
from proxy.api.prompts import admit_request
from proxy.errors import BadRequest
from proxy.jobs import job
from proxy.outputlinks import with_links
from proxy.services import Services
from proxy.store import FINISHED, PromptRecord

MAX_WAIT_S = 300.0
DEFAULT_WAIT_S = 60.0
POLL_S = 1.0


def wait_seconds(body: dict[str, Any]) -> float:
    """`wait_s` taken out of a request body (it is not part of the prompt)."""
    raw = body.pop("wait_s", DEFAULT_WAIT_S)
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 <= raw <= MAX_WAIT_S:
        raise BadRequest("invalid_prompt", f"wait_s must be a number of seconds from 0 to {MAX_WAIT_S:g}",
                         repr(raw))
    return float(raw)


async def wait_finished(svc: Services, prompt_id: str, wait_s: float) -> PromptRecord | None:
    """The prompt's record once it has ended, or None if it has not within `wait_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    ended = svc.hub.watch_end(prompt_id)
    try:
        while True:
            rec = await svc.store.get(prompt_id)
            if rec is not None and rec.state == FINISHED:
                return rec
            left = deadline - loop.time()
            if rec is None or left <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(ended), min(left, POLL_S))
    finally:
        svc.hub.unwatch_end(prompt_id, ended)


async def answer_when_done(request: web.Request, prompt_id: str, wait_s: float) -> web.Response:
    svc = services(request)
    rec = await wait_finished(svc, prompt_id, wait_s)
    if rec is None:
        current = await svc.store.get(prompt_id)
        base = (svc.config.server.public_url or "").rstrip("/")
        body = job(current) if current is not None else {"id": prompt_id}
        return web.json_response(body, status=202, headers={"Location": f"{base}/api/jobs/{prompt_id}"})
    inline = request.query.get("inline", "").lower() in ("1", "true")
    finished = job(rec, detail=True)
    finished["outputs"] = await with_links(svc, finished.get("outputs") or {}, public_base(request), inline=inline)
    return web.json_response(finished)


async def run(request: web.Request) -> web.Response:
    """`POST /proxy/run`."""
    body = parse_body(await request.read())
    wait_s = wait_seconds(body)
    admitted = await admit_request(request, body)
    return await answer_when_done(request, admitted.record.prompt_id, wait_s)
