"""The proxy's own routes for operators and orchestrators: liveness, readiness, backend states."""

from __future__ import annotations

from aiohttp import web

from proxy.api.context import identity, services
from proxy.config import ConfigError
from proxy.errors import BadRequest, Forbidden, NotFound, ProxyError
from proxy.scheduler import Candidate, queue_depth, vram_free_fraction
from proxy.services import CONFIG_PATH, TENANTS


async def healthz(request: web.Request) -> web.Response:
    """The process is up and serving (a liveness probe must not depend on Redis or backends)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """It can admit: the store answers, and a backend is available or the farm's catalogue is kept (then
    `waiting`: prompts queue until a backend comes, as an autoscaler scaling from zero needs). A file store
    that fails makes it `degraded`, still ready: outputs wait in the copy queue and `/view` serves from
    backends."""
    svc = services(request)
    problems: list[str] = []
    try:
        await svc.store.ping()
    except ProxyError as exc:
        problems.append(f"store: {exc.details or exc.message}")
    available = [s.name for s in svc.farm.snapshot() if s.available]
    waiting = not available and bool(svc.membership.catalogue())
    if not available and not waiting:
        problems.append("no backend available, and no catalogue kept to validate prompts against")
    body: dict[str, object] = {"status": "ok" if not problems else "unavailable",
                               "backends_available": available, "problems": problems}
    if waiting and not problems:   # scaled to zero: prompts are admitted and wait for a backend
        body["status"] = "waiting"
    if svc.keeper is not None:
        # the problem's detail (keys name tenants, prompts and files) is in the log, not on this open route
        body["file_store"] = {"kind": svc.keeper.files.kind, "ok": svc.keeper.problem is None,
                              "problem": None if svc.keeper.problem is None else "unavailable: see the log"}
        if svc.keeper.problem is not None and not problems:
            body["status"] = "degraded"
    return web.json_response(body, status=200 if not problems else 503)


def require_admin(request: web.Request) -> None:
    if not identity(request).admin and request.app[TENANTS].enabled:
        raise Forbidden("This route is for administrators", "the tenant's role is not admin")


async def drain(request: web.Request) -> web.Response:
    """No new prompts go to the backend; those running or queued there finish."""
    return await _set_drain(request, True)


async def undrain(request: web.Request) -> web.Response:
    return await _set_drain(request, False)


async def _set_drain(request: web.Request, drained: bool) -> web.Response:
    require_admin(request)
    svc = services(request)
    name = request.match_info["name"]
    if svc.farm.get(name) is None:
        raise NotFound(f"No backend named {name!r}", name)
    await svc.store.set_drained(name, drained)
    svc.farm.set_draining(name, drained)
    state = svc.farm.get(name)
    assert state is not None
    return web.json_response(state.describe())


async def reload(request: web.Request) -> web.Response:
    """Read the config file again and apply its backends (see `proxy.reload`)."""
    require_admin(request)
    path = request.app.get(CONFIG_PATH)
    if path is None:
        raise BadRequest("no_config_file", "This proxy was started without --config: nothing to reload")
    try:
        return web.json_response(await services(request).reloader.reload_file(path))
    except ConfigError as exc:
        raise BadRequest("invalid_config", "The config file is invalid; nothing was changed",
                         "\n".join(exc.problems)) from exc


async def backends(request: web.Request) -> web.Response:
    """Each backend's state, scores, in-flight count and last stats (admin, once tenants exist)."""
    require_admin(request)
    svc = services(request)
    inflight = await svc.store.inflight()
    out = []
    for state in svc.farm.snapshot():
        item = state.describe()
        item["inflight"] = len(inflight.get(state.name, []))
        # The scheduler's view: lower load wins among backends with a free slot (proxy.scheduler).
        candidate = Candidate(state, item["inflight"])
        item["scores"] = {"load": round(queue_depth(candidate), 3),
                          "vram_free_fraction": round(-vram_free_fraction(candidate), 3)}
        item["devices"] = list(state.devices)
        out.append(item)
    return web.json_response({"backends": out})
