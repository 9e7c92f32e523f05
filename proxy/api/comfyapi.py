"""ComfyAPI's surface (../shared/seeds: the ComfyAPI service), served from the proxy's own templates and job
machinery, so a ComfyAPI client runs unchanged against the farm:

- `GET /workflows/`: the template ids; `GET /workflows/{workflow_id}`: ComfyAPI's workflow descriptor
  (`proxy.workflow_inputs.analysis`: every input by node id, with type, default and range).
- `GET /ws/register` (a websocket): answers `{"websocket_cid": "…"}` first, then carries the runs queued
  with that cid: ComfyUI's own messages (`executing`, `progress`, `executed`, `execution_error`, …), and at
  each run's end `{"type": "workflow_status", "request_id", "status"}` and a `result` listing every output
  with its links; with `?images=binary` each output image follows as `{"type": "image", "output", "size"}`
  and a binary frame of its bytes. Previews are not sent: a ComfyAPI client takes every binary frame for a result.
- `POST /workflows/{workflow_id}/queue` with `{"websocket_cid", "inputs": [{"node_id", "value"}]}` (or, as
  ComfyAPI's own code takes it, `?websocket_cid=` with the list as the body) → `{"request_id"}`, which is
  the prompt_id: the run is an ordinary prompt (history, queue, quotas, fair share, webhooks).

A cid is known to every replica through the store (`Store.hold_socket`) for its tenant only, renewed while
the socket is open; a socket that sent and received nothing and has no run pending for
`workflows.socket_idle_s` is closed and its cid forgotten, so a queue call naming it is refused. Errors
come in FastAPI's shape, as ComfyAPI's do: `{"detail": "…"}` with the status, ComfyUI's error body beside
it under `error` (`proxy.api.middleware`, for every refusal on these paths, a missing key's 401 too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from proxy.api.context import identity, public_base, services
from proxy.api.prompts import admit_request
from proxy.api.workflows import catalogue, template_named
from proxy.errors import BadRequest, ProxyError
from proxy.imagefetch import is_url
from proxy.jobs import CANCELLED, COMPLETED, FAILED, IN_PROGRESS, PENDING, run_error, status_of
from proxy.outputlinks import linked, read_output
from proxy.relay.hub import ClientSocket, RunEnded
from proxy.services import WORKFLOWS, Services
from proxy.store import FINISHED
from proxy.workflow_inputs import analysis, fill

log = structlog.get_logger(__name__)

SOCKET_TTL_MS = 30_000        # a cid outlives its replica this long at most (renewed every third of it)
STATUS_WORDS = {PENDING: "queued", IN_PROGRESS: "running", COMPLETED: "completed", FAILED: "failed",
                CANCELLED: "interrupted"}   # ComfyAPI's own words for a run's status
RESULT_IMAGE_MAX = 256 * 1024 * 1024   # an output image sent whole on the socket at most this large
MAX_IMAGE_URLS = 8                     # image inputs of one queue call that may be URLs to fetch
IMAGE_READ_S = 60.0                    # reading one output image for the socket takes at most this long
Image = tuple[dict[str, Any], bytes]   # an output's entry in the result, and its bytes


async def list_workflows(request: web.Request) -> web.Response:
    return web.json_response(sorted(request.app[WORKFLOWS].keys()))


async def describe_workflow(request: web.Request) -> web.Response:
    template = template_named(request, request.match_info["workflow_id"])
    return web.json_response(analysis(template, catalogue(services(request))))


async def queue_workflow(request: web.Request) -> web.Response:
    svc, tenant = services(request), identity(request).tenant
    try:
        body = await request.json()
    except ValueError as exc:
        raise BadRequest("invalid_prompt", "Invalid JSON in request body", str(exc)) from exc
    cid = (body.get("websocket_cid") if isinstance(body, dict) else None) or request.query.get("websocket_cid")
    inputs = body.get("inputs", []) if isinstance(body, dict) else body
    if not isinstance(cid, str) or not cid or await svc.store.socket_tenant(cid) != tenant:
        raise BadRequest("invalid_websocket_cid", f"Connection {cid} not found",
                         "register a websocket at /ws/register first; an idle or closed one is forgotten")
    template = template_named(request, request.match_info["workflow_id"])
    filled = fill(template, catalogue(svc), inputs)
    urls = {(node_id, name): value for node_id, name, value in filled.images if is_url(value)}
    if len(urls) > MAX_IMAGE_URLS:
        raise BadRequest("invalid_input", f"At most {MAX_IMAGE_URLS} image inputs may be URLs", str(len(urls)))
    for (node_id, name), url in urls.items():   # the last value given for an input is the one it takes
        filled.workflow[node_id]["inputs"][name] = await svc.images.fetch(tenant, url)
    admitted = await admit_request(request, {"prompt": filled.workflow, "client_id": cid})
    pid = admitted.record.prompt_id
    return web.json_response({"request_id": pid, "prompt_id": pid, "number": admitted.record.number})


class _Activity:
    def __init__(self) -> None:
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()


async def register(request: web.Request) -> web.WebSocketResponse:
    """A ComfyAPI socket: its cid first, then its runs' messages and results (module docstring)."""
    svc, tenant = services(request), identity(request).tenant
    ws = web.WebSocketResponse(max_msg_size=1024 * 1024, heartbeat=None)
    await ws.prepare(request)
    cid = uuid.uuid4().hex
    try:
        await svc.store.hold_socket(cid, tenant, SOCKET_TTL_MS)
    except ProxyError as exc:   # a cid no replica could find is no use: the client registers again later
        log.warning("comfyapi_socket_unregistered", error=exc.details)
        await ws.close(code=1011, message=b"the state store is unavailable")
        return ws
    sock = ClientSocket(ws, tenant, cid, transport=request.transport, results=True)
    sock.offer(json.dumps({"websocket_cid": cid}))
    svc.hub.register(sock)
    activity = _Activity()
    result = _Results(svc, sock, public_base(request), binary=request.query.get("images") == "binary")
    tasks = [asyncio.create_task(_write(sock, result, activity), name=f"comfyapi-writer-{cid}"),
             asyncio.create_task(_keep(svc, sock, activity), name=f"comfyapi-keeper-{cid}")]
    try:
        async for _ in ws:   # what a client sends only keeps its socket awake
            activity.touch()
    finally:
        svc.hub.unregister(sock)
        for task in tasks:
            task.cancel()
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, Exception) and not isinstance(outcome, ConnectionError):
                log.warning("comfyapi_socket_task_failed", cid=cid, error=repr(outcome))
        with contextlib.suppress(ProxyError):
            await svc.store.drop_socket(cid)
    return ws


async def _keep(svc: Services, sock: ClientSocket, activity: _Activity) -> None:
    """Renew the cid while the socket is open; close it once idle past `workflows.socket_idle_s`."""
    idle_s = svc.config.workflows.socket_idle_s
    every = min(SOCKET_TTL_MS / 3000, idle_s / 2)
    while True:
        await asyncio.sleep(every)
        with contextlib.suppress(ProxyError):
            await svc.store.hold_socket(sock.client_id, sock.tenant, SOCKET_TTL_MS)
        if time.monotonic() - activity.last < idle_s:
            continue
        try:
            waiting = await svc.store.active_prompts(sock.tenant, sock.client_id)
        except ProxyError:
            continue
        if not waiting:
            log.info("comfyapi_socket_idle", cid=sock.client_id, tenant=sock.tenant)
            with contextlib.suppress(ProxyError):
                await svc.store.drop_socket(sock.client_id)
            await sock.ws.close(code=1000, message=b"idle")
            return


async def _write(sock: ClientSocket, results: _Results, activity: _Activity) -> None:
    """The socket's outbox in order: its runs' messages, and after each run's end (the hub's `RunEnded`,
    put there after that run's `executing` null) the run's result."""
    while True:
        frame = await sock.outbox.get()
        if frame is None:   # the hub dropped a client too slow to read
            with contextlib.suppress(ConnectionError):
                await sock.ws.close(code=1008, message=b"client too slow")
            return
        activity.touch()
        if isinstance(frame, RunEnded):
            await (results.withdrawn(frame.prompt_id) if frame.withdrawn else results.send(frame.prompt_id))
            continue
        sock.taken(frame)
        if isinstance(frame, str):   # only text reaches a results socket (proxy.relay.hub)
            await sock.ws.send_str(frame)


class _Results:
    """A run's end as a ComfyAPI client hears it: its status, its outputs with links, the images."""

    def __init__(self, svc: Services, sock: ClientSocket, base: str, *, binary: bool) -> None:
        self.svc, self.sock, self.base, self.binary = svc, sock, base, binary

    async def _tell(self, prompt_id: str, status: str, outputs: list[dict[str, Any]], error: Any) -> None:
        """A run's end: its `workflow_status`, then its `result`."""
        await self.sock.ws.send_str(json.dumps({"type": "workflow_status", "request_id": prompt_id, "status": status}))
        await self.sock.ws.send_str(json.dumps({"type": "result", "request_id": prompt_id, "prompt_id": prompt_id,
                                                "status": status, "outputs": outputs, "error": error}))

    async def withdrawn(self, prompt_id: str) -> None:
        """A run deleted from the queue before it ran: ComfyUI says nothing, a ComfyAPI client hears it ended."""
        await self._tell(prompt_id, "interrupted", [], {
            "type": "withdrawn", "message": "The run was deleted from the queue before it started"})

    async def send(self, prompt_id: str) -> None:
        """The run's status and result, then its images; a result that cannot be read whole still goes out,
        with what is known, so a client waiting for it is never left waiting."""
        try:
            await self._send(prompt_id)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:   # the store away, a history in an odd shape: say so on the socket
            log.warning("comfyapi_result_failed", prompt_id=prompt_id, error=repr(exc))
            await self._tell(prompt_id, "unknown", [], {
                "type": "result_unavailable", "message": f"the result could not be read: "
                f"{getattr(exc, 'details', '') or exc}; see GET /api/jobs/{prompt_id}"})

    async def _send(self, prompt_id: str) -> None:
        rec = await self.svc.store.get(prompt_id)
        if rec is None or rec.tenant != self.sock.tenant or rec.state != FINISHED:
            return
        outputs, images = await self._outputs(rec.history or {})
        await self._tell(prompt_id, STATUS_WORDS[status_of(rec)], outputs, run_error(rec.history or {}))
        for entry, data in images:
            await self.sock.ws.send_str(json.dumps({"type": "image", "request_id": prompt_id, "output": entry,
                                                    "size": len(data)}))
            await self.sock.ws.send_bytes(data)

    async def _outputs(self, history: dict[str, Any]) -> tuple[list[dict[str, Any]], list[Image]]:
        outputs: list[dict[str, Any]] = []
        images: list[Image] = []
        for node_id, ui in (history.get("outputs") or {}).items():
            for kind, items in (ui.items() if isinstance(ui, dict) else ()):
                for item in items if isinstance(items, list) else ():
                    if not isinstance(item, dict) or "filename" not in item:
                        continue
                    entry = {"node_id": node_id, "kind": kind, "filename": item["filename"],
                             "subfolder": item.get("subfolder", ""), "type": item.get("type", "output")}
                    found = await linked(self.svc, item, self.base)
                    if found is not None:
                        entry["link"] = found[1]
                    outputs.append(entry)
                    data = await self._bytes(found[0]) if self.binary and kind == "images" and found else None
                    entry["binary"] = data is not None   # whether its bytes follow the result on the socket
                    if data is not None:
                        images.append((entry, data))
        return outputs, images

    async def _bytes(self, target: Any) -> bytes | None:
        try:
            async with asyncio.timeout(IMAGE_READ_S):
                return await read_output(self.svc, target, RESULT_IMAGE_MAX)
        except (aiohttp.ClientError, TimeoutError, ProxyError) as exc:
            log.warning("comfyapi_image_unread", file=getattr(target, "filename", ""), error=repr(exc))
            return None
