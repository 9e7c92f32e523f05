"""The web frontend through the proxy: the page from the proxy's own `comfyui-frontend-package`
(`proxy.comfy.frontend`), and the routes it calls at startup merged over the farm.

What only backends have is fetched from them: custom node packs' extension scripts and example
workflows, the workflow template and embedded-docs packages (`/templates/...`, `/docs/...`), model
previews. The first available backend that answers 200 serves the file, streamed through. Listings are
merged: `/i18n` with ComfyUI's own JSON merge, `/workflow_templates` and `/global_subgraphs` as unions,
`/experiment/models` by name. `/internal/files/{type}` lists the caller's uploads, which is what a
client can use through the proxy.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from proxy.api.context import identity, services
from proxy.api.info import gather_json, segment, union
from proxy.comfy.frontend import WEB_ROOT, extension_scripts, index_handler, merge_json
from proxy.paths import is_file
from proxy.uploads import TYPES

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CHUNK = 256 * 1024
_PASS_HEADERS = ("Content-Type", "Content-Length", "Content-Encoding", "Cache-Control", "Last-Modified", "ETag")


async def index(request: web.Request) -> web.StreamResponse:
    return await index_handler(request.app[WEB_ROOT])(request)


def backend_path(prefix: str, rel: str) -> str | None:
    """`prefix/rel` for a backend URL, or None when `rel` (decoded by the router) has a `..` part that
    would climb to another backend route."""
    if any(part in ("..", ".") for part in rel.split("/")):
        return None
    return prefix + "/" + urllib.parse.quote(rel, safe="/")


async def relay_first(request: web.Request, path: str | None, *, raised: bool = False) -> web.StreamResponse:
    """Stream `path` from the first available backend that has it; 404 when none has: bare, as aiohttp's
    static routes and ComfyUI's handlers answer, or `raised` ("404: Not Found", no cache header) where
    ComfyUI raises it (`/templates`)."""
    svc = services(request)
    if path is None:
        return _not_found(raised)
    for state in svc.farm.snapshot():
        if not state.polled_ok:
            continue
        try:
            upstream = await svc.client.session.get(state.url + path, params=request.query,
                                                    timeout=svc.client.timeout)
        except (aiohttp.ClientError, TimeoutError):
            continue
        async with upstream:
            if upstream.status != 200:
                continue
            resp = web.StreamResponse(status=200)
            for name in _PASS_HEADERS:
                if name in upstream.headers:
                    resp.headers[name] = upstream.headers[name]
            await resp.prepare(request)
            async for chunk in upstream.content.iter_chunked(CHUNK):
                await resp.write(chunk)
            await resp.write_eof()
            return resp
    return _not_found(raised)


def _not_found(raised: bool) -> web.Response:
    if raised:
        raise web.HTTPNotFound()
    return web.Response(status=404)


async def extensions(request: web.Request) -> web.Response:
    """The proxy's own frontend scripts, then custom node packs' scripts from the backends. Backends'
    copies of the frontend's own scripts are left out: the page is the proxy's, of its version."""
    root = request.app[WEB_ROOT]
    own = extension_scripts(root)
    own_dirs = {p.name for p in (root / "extensions").iterdir() if p.is_dir()} if root is not None else set()
    theirs = [path for path in union(await gather_json(services(request), "/extensions"))
              if isinstance(path, str) and path.split("/")[2:3] and path.split("/")[2] not in own_dirs]
    return web.json_response(own + [p for p in theirs if p not in own])


async def extension_file(request: web.Request) -> web.StreamResponse:
    """`/extensions/...`: the frontend's own scripts from the proxy, a pack's scripts from a backend."""
    root = request.app[WEB_ROOT]
    rel = request.match_info["path"]
    if root is not None:
        base = (root / "extensions").resolve()
        local = (base / rel).resolve()
        if local.is_relative_to(base) and is_file(local):
            return web.FileResponse(local)
    return await relay_first(request, backend_path("/extensions", rel))


def backend_file(prefix: str, *, raised: bool = False) -> Handler:
    """Files under `prefix` only backends have: `/templates` (whose missing names ComfyUI answers with a
    raised 404), `/docs`, `/api/workflow_templates`, `/experiment/models/preview`."""
    async def handler(request: web.Request) -> web.StreamResponse:
        return await relay_first(request, backend_path(prefix, request.match_info["path"]), raised=raised)
    return handler


async def i18n(request: web.Request) -> web.Response:
    merged: Any = {}
    for answer in await gather_json(services(request), "/i18n"):
        merged = merge_json(merged, answer)
    return web.json_response(merged)


async def workflow_templates(request: web.Request) -> web.Response:
    merged: dict[str, list[Any]] = {}
    for answer in await gather_json(services(request), "/workflow_templates"):
        for pack, names in (answer.items() if isinstance(answer, dict) else ()):
            merged[pack] = union([merged.get(pack, []), names])
    return web.json_response(merged)


async def global_subgraphs(request: web.Request) -> web.Response:
    merged: dict[str, Any] = {}
    for answer in await gather_json(services(request), "/global_subgraphs"):
        if isinstance(answer, dict):
            for key, entry in answer.items():
                merged.setdefault(key, entry)
    return web.json_response(merged)


async def global_subgraph(request: web.Request) -> web.Response:
    """One subgraph from a backend that has it; JSON `null` when none has, as ComfyUI answers."""
    for answer in await gather_json(services(request), "/global_subgraphs/" + segment(request.match_info["id"])):
        if answer is not None:
            return web.json_response(answer)
    return web.json_response(None)


async def experiment_models(request: web.Request) -> web.Response:
    merged: dict[str, list[Any]] = {}
    for answer in await gather_json(services(request), "/experiment/models"):
        for entry in answer if isinstance(answer, list) else ():
            if isinstance(entry, dict) and "name" in entry:
                merged[entry["name"]] = union([merged.get(entry["name"], []), entry.get("folders", [])])
    return web.json_response([{"name": name, "folders": folders} for name, folders in merged.items()])


async def experiment_models_in_folder(request: web.Request) -> web.Response:
    answers = await gather_json(services(request), "/experiment/models/" + segment(request.match_info["folder"]))
    if not answers:
        return web.Response(status=404)
    files: dict[str, Any] = {}
    for answer in answers:
        for entry in answer if isinstance(answer, list) else ():
            if isinstance(entry, dict) and "name" in entry:
                files.setdefault(entry["name"], entry)
    return web.json_response(list(files.values()))


async def folder_paths(request: web.Request) -> web.Response:
    merged: dict[str, list[Any]] = {}
    for answer in await gather_json(services(request), "/internal/folder_paths"):
        for name, paths in (answer.items() if isinstance(answer, dict) else ()):
            merged[name] = union([merged.get(name, []), paths])
    return web.json_response(merged)


async def internal_files(request: web.Request) -> web.Response:
    """The caller's own uploads of that type, newest first: the files a client can name here."""
    directory_type = request.match_info["directory_type"]
    if directory_type not in TYPES:
        return web.json_response({"error": "Invalid directory type"}, status=400)
    return web.json_response(await services(request).uploads.names(identity(request).tenant, directory_type))
