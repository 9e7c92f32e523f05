"""The proxy's own routes for operators and orchestrators: liveness, readiness, backend states."""

from __future__ import annotations

from aiohttp import web

from proxy.api.context import services
from proxy.errors import ProxyError


async def healthz(request: web.Request) -> web.Response:
    """The process is up and serving (a liveness probe must not depend on Redis or backends)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """It can admit: the store answers and at least one backend is available."""
    svc = services(request)
    problems: list[str] = []
    try:
        await svc.store.ping()
    except ProxyError as exc:
        problems.append(f"store: {exc.details or exc.message}")
    available = [s.name for s in svc.farm.snapshot() if s.available]
    if not available:
        problems.append("no backend available")
    body = {"status": "ok" if not problems else "unavailable", "backends_available": available,
            "problems": problems}
    return web.json_response(body, status=200 if not problems else 503)


async def backends(request: web.Request) -> web.Response:
    svc = services(request)
    inflight = await svc.store.inflight()
    out = []
    for state in svc.farm.snapshot():
        item = state.describe()
        item["inflight"] = len(inflight.get(state.name, []))
        out.append(item)
    return web.json_response({"backends": out})
