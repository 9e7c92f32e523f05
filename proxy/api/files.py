"""`/view` and `/upload/image`: a file reference the proxy handed out is resolved to its backend and
streamed through; a plain name is one of the caller's own uploads (see `proxy.uploads`).

The body is relayed chunk by chunk, never held whole in memory. See `proxy.outputs` for why and how
file names carry their reference.
"""

from __future__ import annotations

import asyncio
import mimetypes

import aiohttp
from aiohttp import web

from proxy.api.context import identity, services
from proxy.outputs import ref_of, split_annotation

CHUNK = 256 * 1024
FORCE_DOWNLOAD = {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}
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
    if ref is None:
        return await _view_upload(request, filename)
    target = await svc.store.resolve_output(ref)
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


async def _view_upload(request: web.Request, filename: str) -> web.StreamResponse:
    """`/view` of a file the caller uploaded (type input, or temp/output uploads)."""
    svc = services(request)
    name, annotated_type = split_annotation(filename)
    type_ = annotated_type or request.query.get("type", "output")
    path = svc.uploads.find(identity(request).tenant, type_, request.query.get("subfolder", ""), name)
    if path is None:
        return web.Response(status=404)
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if content_type in FORCE_DOWNLOAD:
        content_type = "application/octet-stream"  # as ComfyUI does, so no page runs from /view
    return web.FileResponse(path, headers={"Content-Disposition": f'filename="{path.name}"',
                                           "Content-Type": content_type})


async def upload_image(request: web.Request) -> web.Response:
    """ComfyUI's `/upload/image`: multipart `image`, optional `overwrite`, `subfolder`, `type`."""
    svc = services(request)
    post = await request.post()
    image = post.get("image")
    if not isinstance(image, web.FileField) or not image.filename:
        return web.Response(status=400)
    type_ = str(post.get("type") or "input")
    subfolder = str(post.get("subfolder") or "")
    overwrite = str(post.get("overwrite", "")).lower() in ("true", "1")
    data = await asyncio.to_thread(image.file.read)
    saved = await asyncio.to_thread(svc.uploads.save, identity(request).tenant, type_, subfolder,
                                    image.filename, data, overwrite)
    if saved is None:
        return web.Response(status=400)
    return web.json_response(saved)
