"""`/view` and uploads with ComfyUI's path rules (server.py `view_image`, `image_upload`, `upload_mask`).

`/upload/mask` copies the upload's alpha onto `original_ref` (`proxy.comfy.imaging`); when the original
cannot be found it writes nothing and still answers 200 with the name, as ComfyUI does (its saver's
400/403 answers are discarded there).
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import os
from collections.abc import Callable
from typing import Any

from aiohttp import web

from proxy.comfy.imaging import apply_mask_alpha, view_variant
from proxy.comfy.uploads import upload_target
from proxy.sim.files import SimPaths
from proxy.sim.state import SIM

routes = web.RouteTableDef()

FORCE_DOWNLOAD = {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}


def _view_path(paths: SimPaths, query: Any) -> str | int:
    """The file a `/view` query names, or the bare status ComfyUI answers."""
    filename, output_dir = paths.annotated(query["filename"])
    if not filename or filename[0] == "/" or ".." in filename:
        return 400
    if output_dir is None:
        output_dir = paths.by_type(query.get("type", "output"))
    if output_dir is None:
        return 400
    if "subfolder" in query:
        full_output_dir = os.path.join(output_dir, query["subfolder"])
        if os.path.commonpath((os.path.abspath(full_output_dir), output_dir)) != output_dir:
            return 403
        output_dir = full_output_dir
    file = os.path.join(output_dir, os.path.basename(filename))
    return file if os.path.isfile(file) else 404


@routes.get("/view")
async def view_image(request: web.Request) -> web.StreamResponse:
    query = request.rel_url.query
    if "filename" not in query:
        return web.Response(status=404)
    found = _view_path(request.app[SIM].paths, query)
    if isinstance(found, int):
        return web.Response(status=found)
    filename = os.path.basename(found)
    if "preview" in query or query.get("channel", "rgba") != "rgba":
        variant = await asyncio.to_thread(_variant_of, found, query)
        if variant is not None:
            return web.Response(body=variant[0], content_type=variant[1],
                                headers={"Content-Disposition": f'filename="{filename}"'})
    content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    if content_type in FORCE_DOWNLOAD:
        content_type = "application/octet-stream"  # ComfyUI forces these to download
    return web.FileResponse(found, headers={"Content-Disposition": f'filename="{filename}"',
                                            "Content-Type": content_type})


def _variant_of(path: str, query: Any) -> tuple[bytes, str] | None:
    with open(path, "rb") as f:
        return view_variant(f.read(), query)


SaveFunction = Callable[[bytes, Any, str], None]


def _image_upload(paths: SimPaths, post: Any, save: SaveFunction | None = None) -> web.Response:
    image = post.get("image")
    upload_type = post.get("type") or "input"
    upload_dir = paths.by_type(upload_type)
    if upload_dir is None:
        raise ValueError(f"unknown upload type {upload_type!r}")  # ComfyUI fails here too: a bare 500
    if not isinstance(image, web.FileField):
        return web.Response(status=400)
    if not image.filename:
        return web.Response(status=400)
    data = image.file.read()
    overwrite = post.get("overwrite") in ("true", "1")
    subfolder = post.get("subfolder", "")
    target = upload_target(upload_dir, subfolder, image.filename, data, overwrite)
    if target is None:
        return web.Response(status=400)
    name, path, write = target
    if write:
        (save or _write)(data, post, path)
    return web.json_response({"name": name, "subfolder": subfolder, "type": upload_type})


def _write(data: bytes, post: Any, path: str) -> None:
    with open(path, "wb") as f:
        f.write(data)


@routes.post("/upload/image")
async def upload_image(request: web.Request) -> web.Response:
    post = await request.post()
    return _image_upload(request.app[SIM].paths, post)


def _mask_saver(paths: SimPaths) -> SaveFunction:
    def save(data: bytes, post: Any, path: str) -> None:
        original_ref = json.loads(post.get("original_ref"))
        filename, output_dir = paths.annotated(original_ref["filename"])
        if not filename or filename[0] == "/" or ".." in filename:
            return
        output_dir = output_dir or paths.by_type(original_ref.get("type", "output"))
        if output_dir is None:
            return
        if original_ref.get("subfolder", ""):
            full = os.path.join(output_dir, original_ref["subfolder"])
            if os.path.commonpath((os.path.abspath(full), output_dir)) != output_dir:
                return
            output_dir = full
        original = os.path.join(output_dir, filename)
        if os.path.isfile(original):
            with open(original, "rb") as f:
                composed = apply_mask_alpha(f.read(), data, path)
            _write(composed, post, path)
    return save


@routes.post("/upload/mask")
async def upload_mask(request: web.Request) -> web.Response:
    post = await request.post()
    paths = request.app[SIM].paths
    return _image_upload(paths, post, _mask_saver(paths))
