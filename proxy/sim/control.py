"""Simulator-only routes for tests, under `/sim/` (not ComfyUI routes, no `/api` twin):

- `GET /sim/faults` → the current faults, e.g. `{"error_at_node": null, "reject_prompts": false,
  "slow_factor": 1.0, "drop_sockets": false}`;
- `POST /sim/faults` with any of `{"error_at_node": "KSampler"}`, `{"reject_prompts": true}`,
  `{"slow_factor": 5}`, `{"drop_sockets": true}` (one-shot: cuts every websocket now), `{"reset": true}`
  → the faults after the change; 400 `{"error": ...}` for an unknown fault or a bad value;
- `GET /sim/stats` → what the simulated GPU has done since start: `{"prompts", "busy_s", "load_s",
  "sampling_steps", "accepted", "polled", "model_loads", "model_swaps", "loaded"}` (`busy_s` is time
  inside prompts, loads included; `accepted` counts prompts `POST /prompt` queued; `polled` the
  `GET /system_stats`, `/prompt` and `/object_info` answered; a swap is a load that replaced another
  checkpoint) — benchmarks count from it;
- `POST /sim/die` → 200, then the simulator behaves like a crashed process: the listening socket is
  closed, every other connection (websockets included) is cut, the worker stops and the running prompt
  never reaches history.
See `faults.py` for what each fault does.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import asdict

from aiohttp import web

from proxy.sim.faults import FaultError
from proxy.sim.state import SIM, Sim

routes = web.RouteTableDef()


@routes.get("/sim/faults")
async def get_faults(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIM].faults.as_dict())


@routes.post("/sim/faults")
async def post_faults(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    try:
        changes = await request.json()
        if not isinstance(changes, dict):
            raise FaultError("body must be a JSON object")
        drop = sim.faults.update(changes)
    except (ValueError, FaultError) as exc:
        return web.json_response({"error": str(exc)}, status=400)
    if drop:
        await sim.hub.close_all(abort=True)
    return web.json_response(sim.faults.as_dict())


@routes.get("/sim/stats")
async def get_stats(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    return web.json_response({**asdict(sim.executor.work), "accepted": sim.accepted, "polled": sim.polled,
                              "model_loads": sim.gpu.loads,
                              "model_swaps": sim.gpu.swaps, "loaded": sim.gpu.loaded})


@routes.post("/sim/die")
async def post_die(request: web.Request) -> web.Response:
    await die(request.app[SIM], keep=request.transport)
    return web.Response(status=200, headers={"Connection": "close"})


async def die(sim: Sim, keep: asyncio.Transport | None = None) -> None:
    """Stop as a crash would: no more listening, every connection but `keep` cut, no more work."""
    if sim.dead:
        return
    sim.dead = True
    for task in sim.tasks:
        task.cancel()
    if sim.stop_listening is not None:
        await sim.stop_listening()
    else:
        server = getattr(keep, "_server", None)  # asyncio's listening server behind this connection
        if server is not None:
            server.close()
    for transport in list(sim.transports):
        if transport is not keep:
            with contextlib.suppress(Exception):
                transport.abort()
