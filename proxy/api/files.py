"""`/view`: a file reference the proxy handed out, resolved to its backend and streamed through.

The body is relayed chunk by chunk, never held whole in memory. See `proxy.outputs` for why and how
file names carry their reference.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from proxy.api.context import identity, services
from proxy.outputs import ref_of, split_annotation

CHUNK = 256 * 1024
_PASS_HEADERS = ("Content-Type", "Content-Length", "Cache-Control", "Last-Modified", "ETag")


async def view(request: web.Request) -> web.StreamResponse:
    svc = services(request)
    filename = request.query.get("filename")
    if not filename:
        return web.Response(status=404)
    # Same refusals as ComfyUI's /view (protocol §5) before anything is looked up.
    if filename.startswith("/") or ".." in filename:
        return web.Response(status=400)
    ref = ref_of(filename)
    target = await svc.store.resolve_output(ref) if ref else None
    if target is None or not identity(request).owns(target.tenant):
        return web.Response(status=404)
    state = svc.farm.get(target.backend)
    if state is None:
        return web.Response(status=404)
    params = {k: v for k, v in request.query.items() if k not in ("filename", "subfolder", "type")}
    params.update(filename=target.filename, subfolder=target.subfolder, type=target.type)
    try:
        upstream = await svc.client.session.get(state.url + "/view", params=params)
    except (aiohttp.ClientError, TimeoutError):
        svc.farm.mark_down(target.backend, "GET /view failed")
        return web.Response(status=502)
    async with upstream:
        if upstream.status != 200:
            return web.Response(status=upstream.status)
        resp = web.StreamResponse(status=200)
        for name in _PASS_HEADERS:
            if name in upstream.headers:
                resp.headers[name] = upstream.headers[name]
        shown, _ = split_annotation(filename)
        resp.headers["Content-Disposition"] = f'filename="{shown}"'
        await resp.prepare(request)
        async for chunk in upstream.content.iter_chunked(CHUNK):
            await resp.write(chunk)
        await resp.write_eof()
        return resp
