"""`/view`, `/upload/image` and `/upload/mask`: a file reference the proxy handed out is resolved to its
backend and streamed through; a plain name is one of the caller's own uploads (see `proxy.uploads`).

The body is relayed chunk by chunk, never held whole in memory. See `proxy.outputs` for why and how
file names carry their reference.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import MultiDictProxy

from proxy.api.context import identity, services
from proxy.comfy.imaging import apply_mask_alpha, view_variant
from proxy.errors import Forbidden, NotFound
from proxy.files import FileStore, FileStoreUnavailable
from proxy.files.base import content_type, disposition
from proxy.outputlinks import read_output
from proxy.outputs import client_filename, ref_of, split_annotation
from proxy.paths import unusable_name
from proxy.store.base import OutputRef

log = structlog.get_logger(__name__)

CHUNK = 256 * 1024
VARIANT_MAX_BYTES = 256 * 1024 * 1024   # `preview` and `channel` decode the whole image
# A signed link needs no key, so anyone may be sent one: whatever the file is (an SVG, an HTML page from a
# custom node), it runs no script on the proxy's origin.
SANDBOX = {"Content-Security-Policy": "sandbox", "X-Content-Type-Options": "nosniff"}
_PASS_HEADERS = ("Content-Type", "Content-Length", "Cache-Control", "Last-Modified", "ETag", "Accept-Ranges",
                 "Content-Range")
# ComfyUI's /view is aiohttp's file response: it honours these (RFC 9110 ranges and validators), so the
# proxy hands them on and relays its 206, 304 or 416 (a video player seeks, a browser revalidates).
_CONDITIONAL = ("Range", "If-Range", "If-None-Match", "If-Modified-Since", "If-Match", "If-Unmodified-Since")
_RELAYED = frozenset({200, 206, 304, 412, 416})


async def view(request: web.Request) -> web.StreamResponse:
    """ComfyUI's `/view`: an output by the reference in its name, else one of the caller's uploads."""
    filename = request.query.get("filename")
    if not filename:
        return web.Response(status=404)
    # Same refusals as ComfyUI's /view (protocol §5) before anything is looked up.
    if filename.startswith("/") or ".." in filename:
        return web.Response(status=400)
    ref = ref_of(filename)
    if ref is None:
        return await _view_upload(request, filename)
    return await _view_output(request, filename, ref)


async def _view_output(request: web.Request, filename: str, ref: str) -> web.StreamResponse:
    """`/view` of an output the proxy handed out, as its owner may see it."""
    target = await services(request).store.resolve_output(ref)
    if target is None or not identity(request).owns(target.tenant):
        return web.Response(status=404)
    # its own name (with the reference), not the one asked for: `x~REF.svg` must not retype a PNG
    return await serve_output(request, target, client_filename(target.filename, ref))


async def serve_output(request: web.Request, target: OutputRef, shown: str,
                       extra: Mapping[str, str] | None = None) -> web.StreamResponse:
    """The file from the file store once it is copied there, else (or while the store fails) from the
    backend that wrote it, under the name the client knows (`shown`), with `extra` headers."""
    files = services(request).files
    if target.stored and files is not None:
        try:
            served = await _from_store(request, files, target.stored, shown, extra)
        except FileStoreUnavailable as exc:
            log.warning("view_from_store_failed", key=target.stored, error=str(exc))
        else:
            if served is not None:
                return served
    return await _from_backend(request, target, shown, extra)


async def signed_file(request: web.Request) -> web.StreamResponse:
    """A signed link (`proxy.links`): the file it names, to anyone holding the link until it expires."""
    svc = services(request)
    ref, name, query = request.match_info["ref"], request.match_info["name"], request.query
    tenant = query.get("tenant", "")
    if not await svc.links.valid(ref, name, tenant, query.get("expires", ""), query.get("signature", "")):
        raise Forbidden("This link is not valid", "it was altered, or it has expired")
    target = await svc.store.resolve_output(ref)
    if target is None:
        raise NotFound("This file is no longer kept", name)
    if target.tenant != tenant or client_filename(target.filename, ref) != name:
        raise Forbidden("This link is not valid", "it names another file")
    return await serve_output(request, target, name, SANDBOX)


async def _from_store(request: web.Request, files: FileStore, key: str, shown: str,
                      extra: Mapping[str, str] | None = None) -> web.StreamResponse | None:
    headers = {"Content-Disposition": disposition(shown), "Content-Type": content_type(shown), **(extra or {})}
    if "preview" in request.query or request.query.get("channel", "rgba") != "rgba":
        try:
            data = await files.read(key, VARIANT_MAX_BYTES)
        except ValueError:
            return web.Response(status=413)
        variant = None if data is None else view_variant(data, request.query)
        if variant is not None:
            return web.Response(body=variant[0], content_type=variant[1],
                                headers={"Content-Disposition": headers["Content-Disposition"], **(extra or {})})
    return await files.serve(request, key, headers)


async def _from_backend(request: web.Request, target: OutputRef, shown: str,
                        extra: Mapping[str, str] | None = None) -> web.StreamResponse:
    """The backend's `/view` of the file, streamed (ranges and validators handed on)."""
    svc = services(request)
    state = svc.farm.get(target.backend)
    if state is None:
        return web.Response(status=404)
    params = {k: v for k, v in request.query.items() if k not in ("filename", "subfolder", "type")}
    params.update(filename=target.filename, subfolder=target.subfolder, type=target.type)
    headers = {name: request.headers[name] for name in _CONDITIONAL if name in request.headers}
    try:
        upstream = await svc.client.session.get(state.url + "/view", params=params, headers=headers)
    except (aiohttp.ClientError, TimeoutError):
        svc.farm.mark_down(target.backend, "GET /view failed")
        return web.Response(status=502)
    async with upstream:
        if upstream.status not in _RELAYED:
            return web.Response(status=upstream.status)
        return await _stream(request, upstream, shown, extra)


async def _stream(request: web.Request, upstream: aiohttp.ClientResponse, shown: str,
                  extra: Mapping[str, str] | None = None) -> web.StreamResponse:
    """The backend's answer relayed chunk by chunk, under the name the client asked for."""
    resp = web.StreamResponse(status=upstream.status)
    for name in _PASS_HEADERS:
        if name in upstream.headers:
            resp.headers[name] = upstream.headers[name]
    resp.headers["Content-Disposition"] = disposition(shown)
    resp.headers.update(extra or {})
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
    key = await svc.uploads.find(identity(request).tenant, type_, request.query.get("subfolder", ""), name)
    if key is None:
        return web.Response(status=404)
    shown = key.rsplit("/", 1)[-1]
    served = await _from_store(request, svc.uploads.files, key, shown)
    return served if served is not None else web.Response(status=404)


async def upload_image(request: web.Request) -> web.Response:
    """ComfyUI's `/upload/image`: multipart `image`, optional `overwrite`, `subfolder`, `type`."""
    return await _upload(request, await _form(request), None)


async def _form(request: web.Request) -> MultiDictProxy[Any]:
    """The multipart form, or a bare 400 for a body that is not one (no boundary, a part without a name,
    a broken part): ComfyUI answers those with a bare 500."""
    try:
        return await request.post()
    except (ValueError, HttpProcessingError):  # HttpProcessingError: a part's header aiohttp cannot parse
        raise web.HTTPBadRequest() from None


async def upload_mask(request: web.Request) -> web.Response:
    """ComfyUI's `/upload/mask`: the upload's alpha goes onto `original_ref` (one of the caller's uploads
    or outputs), saved under the upload's name. A missing original writes nothing, still answered 200 with
    the name, as ComfyUI does. An `original_ref` that is not a JSON object is a 400 (ComfyUI: a bare 500)."""
    post = await _form(request)
    try:
        ref = json.loads(str(post.get("original_ref")))
    except ValueError:
        ref = None
    if not isinstance(ref, dict) or not isinstance(ref.get("filename"), str):
        return web.Response(status=400)
    original = await _original_bytes(request, ref)

    def compose(mask: bytes, path: str) -> bytes | None:
        return None if original is None else apply_mask_alpha(original, mask, path)
    return await _upload(request, post, compose)


async def _upload(request: web.Request, post: MultiDictProxy[Any],
                  render: Callable[[bytes, str], bytes | None] | None) -> web.Response:
    svc = services(request)
    image = post.get("image")
    if not isinstance(image, web.FileField) or not image.filename:
        return web.Response(status=400)
    type_ = str(post.get("type") or "input")
    subfolder = str(post.get("subfolder") or "")
    overwrite = str(post.get("overwrite", "")).lower() in ("true", "1")
    data = await asyncio.to_thread(image.file.read)
    try:
        saved = await svc.uploads.save(identity(request).tenant, type_, subfolder, image.filename, data,
                                       overwrite=overwrite, render=render)
    except (OSError, ValueError) as exc:
        if not unusable_name(exc):
            raise
        return web.Response(status=400)   # ComfyUI: a 500; here bad input, like its other upload refusals
    if saved is None:
        return web.Response(status=400)
    return web.json_response(saved)


async def _original_bytes(request: web.Request, ref: dict[str, Any]) -> bytes | None:
    """The image `original_ref` names, as the caller may see it: an output of theirs (fetched from its
    backend) or one of their uploads; None when there is none (ComfyUI's path rules refuse escapes)."""
    svc = services(request)
    filename = ref["filename"]
    name, annotated_type = split_annotation(filename)
    if not name or name.startswith("/") or ".." in name:
        return None
    output = ref_of(filename)
    if output is None:
        type_ = annotated_type or str(ref.get("type") or "output")
        subfolder = str(ref.get("subfolder") or "")
        key = await svc.uploads.find(identity(request).tenant, type_, subfolder, name)
        return None if key is None else await svc.uploads.read(key, VARIANT_MAX_BYTES)
    target = await svc.store.resolve_output(output)
    if target is None or not identity(request).owns(target.tenant):
        return None
    return await read_output(svc, target, VARIANT_MAX_BYTES)
