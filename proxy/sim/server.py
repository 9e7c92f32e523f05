"""The simulated ComfyUI application: routes at their path and at `/api` + path, ComfyUI's loopback
Origin check, and the lifecycle of the worker and the message pump.

`create_sim_app` builds the application (its cleanup context owns the tasks and a temporary base
folder); `start_sim` runs one on loopback and returns a `SimServer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from proxy.comfy import frontend, userdata
from proxy.sim import api_files, api_frontend, api_info, api_prompts, api_users, control, templates, ws
from proxy.sim.hub import SocketHub
from proxy.sim.options import SimOptions
from proxy.sim.state import SIM, Sim
from proxy.sim.worker import prompt_worker

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
COMFY_ROUTES = (api_prompts.routes, api_info.routes, api_files.routes, api_users.routes, userdata.routes, ws.routes,
                api_frontend.routes)


async def is_loopback(host: str | None) -> bool:
    """server.py is_loopback: an IP that is loopback, or a name that resolves only to loopback."""
    if host is None:
        return False
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    loop = asyncio.get_running_loop()
    loopback = False
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            infos = await loop.getaddrinfo(host, None, family=family, type=socket.SOCK_STREAM)
        except socket.gaierror:
            continue
        for *_, sockaddr in infos:
            if not ipaddress.ip_address(sockaddr[0]).is_loopback:
                return loopback
            loopback = True
    return loopback


@web.middleware
async def origin_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """ComfyUI's origin check (protocol §1; traces/info_routes.json `origin_mismatch`): bare 403."""
    if "Host" in request.headers and "Origin" in request.headers:
        host_domain: str | None = request.headers["Host"].lower()
        parsed = urllib.parse.urlparse(request.headers["Origin"])
        origin_domain: str | None = parsed.netloc.lower()
        host_parsed = urllib.parse.urlsplit("//" + (host_domain or ""))
        loopback = await is_loopback(host_parsed.hostname)
        if parsed.port is None:  # ports are compared only when both carry one
            host_domain = host_parsed.hostname
        if host_parsed.port is None:
            origin_domain = parsed.hostname
        if loopback and host_domain and origin_domain and host_domain != origin_domain:
            return web.Response(status=403)
    if request.method == "OPTIONS":
        return web.Response()
    return await handler(request)


@web.middleware
async def crash_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Remembers every connection so `/sim/die` can cut them; a dead simulator answers nothing."""
    sim = request.app[SIM]
    transport = request.transport
    if transport is not None:
        if sim.dead:
            transport.abort()
            raise web.HTTPServiceUnavailable()
        with contextlib.suppress(TypeError):
            sim.transports.add(transport)
    return await handler(request)


def _with_api_twins(table: web.RouteTableDef) -> list[web.RouteDef]:
    """Every route at `/api` + path first, then at its path, as ComfyUI's add_routes does."""
    defs = [r for r in table if isinstance(r, web.RouteDef)]
    return [web.RouteDef(r.method, "/api" + r.path, r.handler, r.kwargs) for r in defs] + defs


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    sim = app[SIM]
    sim.tasks = [asyncio.create_task(sim.hub.publish_loop(), name=f"sim-{sim.options.name}-publish"),
                 asyncio.create_task(prompt_worker(sim), name=f"sim-{sim.options.name}-worker")]
    try:
        yield
    finally:
        for task in sim.tasks:
            task.cancel()
        for task in sim.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        sim.paths.remove()


async def _close_sockets(app: web.Application) -> None:
    await app[SIM].hub.close_all(abort=False)


def create_sim_app(options: SimOptions) -> web.Application:
    """A simulated ComfyUI as an aiohttp application (run it with any runner)."""
    sim = Sim.create(options)
    app = web.Application(client_max_size=options.max_upload_mb * 1024 * 1024,
                          middlewares=[crash_guard, frontend.cache_control, origin_only])
    app[SIM] = sim
    app[userdata.USER_ROOT] = api_users.user_root
    app[frontend.WEB_ROOT] = root = frontend.web_root()
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_close_sockets)
    page = web.RouteTableDef()
    page.get("/")(frontend.index_handler(root))
    for table in (*COMFY_ROUTES, page):
        app.add_routes(_with_api_twins(table))
    app.add_routes(control.routes)
    app.add_subapp("/internal", api_frontend.internal_app(sim))
    api_frontend.add_static_routes(app, sim)
    templates.add_routes(app, sim)
    frontend.add_static(app, root, mend=False)  # last: ComfyUI's static route at `/` matches every path
    return app


class SimServer:
    """A running simulator on loopback."""

    def __init__(self, runner: web.AppRunner, url: str, name: str) -> None:
        self._runner = runner
        self.url = url
        self.name = name

    @property
    def sim(self) -> Sim:
        """The simulator's state (its hub, queue, history): for tests that watch what it sends."""
        return self._runner.app[SIM]

    async def close(self) -> None:
        await self._runner.cleanup()


async def start_sim(options: SimOptions) -> SimServer:
    """Start a simulator; port 0 picks a free port and `url` carries the real one."""
    app = create_sim_app(options)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, options.host, options.port)
    await site.start()
    port = runner.addresses[0][1]
    app[SIM].stop_listening = site.stop
    app[SIM].port = port
    host = f"[{options.host}]" if ":" in options.host else options.host
    return SimServer(runner, f"http://{host}:{port}", options.name)


__all__ = ["SimServer", "SocketHub", "create_sim_app", "start_sim"]
