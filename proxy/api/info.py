"""Information routes merged over the farm: `/object_info` (a class appears if any available backend
has it; combo lists such as model files are the union), `/system_stats` (`system` from the proxy's host
and the backends' versions, `devices` of every backend named by backend), `/models`, `/embeddings`,
`/view_metadata/{folder}` (from a backend that has the file), `/features` (the proxy's own limits)."""

from __future__ import annotations

import asyncio
import os
import sys
import urllib.parse
from typing import Any

import aiohttp
from aiohttp import web

from proxy.api.context import services
from proxy.services import Services


async def object_info(request: web.Request) -> web.Response:
    return web.json_response(services(request).farm.merged_object_info())


async def object_info_class(request: web.Request) -> web.Response:
    cls = request.match_info["node_class"]
    merged = services(request).farm.merged_object_info()
    return web.json_response({cls: merged[cls]} if cls in merged else {})


def _memory() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0, 0


async def system_stats(request: web.Request) -> web.Response:
    svc = services(request)
    healthy = [s for s in svc.farm.snapshot() if s.polled_ok]
    reference = healthy[0].system if healthy else {}
    total, free = _memory()
    system = {
        "os": os.name, "ram_total": total, "ram_free": free,
        "comfyui_version": reference.get("comfyui_version", ""),
        "required_frontend_version": reference.get("required_frontend_version", ""),
        "installed_templates_version": reference.get("installed_templates_version", ""),
        "required_templates_version": reference.get("required_templates_version", ""),
        "python_version": sys.version, "pytorch_version": reference.get("pytorch_version", ""),
        "embedded_python": False, "argv": sys.argv,
    }
    devices = [{**dev, "name": f"{s.name}: {dev.get('name', '')}"} for s in healthy for dev in s.devices]
    return web.json_response({"system": system, "devices": devices})


async def gather_by_backend(svc: Services, path: str) -> list[tuple[str, Any]]:
    """The same GET on every healthy backend: (backend, answer); answers that are not 200 JSON are left out."""
    async def one(name: str, url: str) -> tuple[str, Any]:
        try:
            async with svc.client.session.get(url + path, timeout=svc.client.timeout) as resp:
                return name, await resp.json(content_type=None) if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return name, None
    results = await asyncio.gather(*(one(s.name, s.url) for s in svc.farm.snapshot() if s.polled_ok))
    return [(name, answer) for name, answer in results if answer is not None]


async def gather_json(svc: Services, path: str) -> list[Any]:
    """The answers of `gather_by_backend`, without the names."""
    return [answer for _, answer in await gather_by_backend(svc, path)]


def segment(value: str) -> str:
    """A client's path parameter as one segment of a backend URL: a decoded `../` must not climb out
    of the route to another backend route (say `/history`, everyone's)."""
    return urllib.parse.quote(value, safe="")


def union(lists: list[Any]) -> list[Any]:
    out: list[Any] = []
    seen: set[str] = set()
    for items in lists:
        for item in items if isinstance(items, list) else ():
            key = repr(item)
            if key not in seen:
                seen.add(key)
                out.append(item)
    return out


async def models(request: web.Request) -> web.Response:
    return web.json_response(union(await gather_json(services(request), "/models")))


async def models_in_folder(request: web.Request) -> web.Response:
    answers = await gather_json(services(request), "/models/" + segment(request.match_info["folder"]))
    if not answers:
        return web.Response(status=404)
    return web.json_response(union(answers))


async def embeddings(request: web.Request) -> web.Response:
    return web.json_response(union(await gather_json(services(request), "/embeddings")))


async def view_metadata(request: web.Request) -> web.Response:
    """A model file's safetensors metadata, from the first backend that has the file (the others 404)."""
    query = "?" + request.query_string if request.query_string else ""
    answers = await gather_json(services(request), "/view_metadata/" + segment(request.match_info["folder"]) + query)
    return web.json_response(answers[0]) if answers else web.Response(status=404)


async def features(request: web.Request) -> web.Response:
    svc = services(request)
    return web.json_response({"supports_preview_metadata": True,
                              "max_upload_size": svc.config.server.max_body_mb * 1024 * 1024})
