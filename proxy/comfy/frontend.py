"""The official web frontend, served as ComfyUI 0.3.75 serves it (server.py `get_root`, `add_routes`,
middleware/cache_middleware.py), for the simulator and the proxy alike.

ComfyUI serves the `comfyui-frontend-package`'s `static/` folder at `/`, `index.html` at `GET /` with
no-cache headers, and lists the folder's `extensions/**/*.js` in `/extensions`. A middleware marks
`.js`, `.css` and `index*.json` answers `no-cache` and images as cacheable. The package is a base
dependency, as in ComfyUI's requirements; should it be missing (an install that skipped dependencies),
`GET /` says how to get it and the API still works.

Under a path prefix (an ingress serving `/comfy/` with the prefix stripped) the page builds its asset,
API, websocket and image URLs from its own location, so the server needs no prefix setting. One bug of
the pinned version stops it there, and the proxy mends it as the file is served (`ROUTER_BASE`).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.resources
import os
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PACKAGE = "comfyui-frontend-package"
REQUIRED_VERSION = "1.32.9"  # the pin in ComfyUI 0.3.75's requirements.txt (its /system_stats says so too)
INSTALL_HINT = (f"The ComfyUI web frontend is not installed. Install it with "
                f"pip install {PACKAGE}=={REQUIRED_VERSION} (a dependency of comfy-farm-proxy) and restart.\n")
WEB_ROOT: web.AppKey[Path | None] = web.AppKey("web_root")  # the folder an application serves at `/`
ONE_HOUR, ONE_DAY = 3600, 86400
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Frontends from 1.32.2 (1.34.0 too) route the page against "./", so under a path prefix no route matches and
# the page never starts (Comfy-Org/ComfyUI_frontend#6995, #7075 on 1.32.9). Upstream's fix (#7115) routes
# against the page's own path; the same expression replaces the bug in the bundle as it is served.
ROUTER_BASE = (b'function getBasePath(){return isElectron()?"/":"./"}',
               b'function getBasePath(){return isElectron()?"/":window.location.pathname}')


def web_root() -> Path | None:
    """The installed frontend's static folder, or None when the package is absent."""
    try:  # in the function: an install that skipped dependencies lacks it, and the API must still start
        import comfyui_frontend_package  # type: ignore[import-not-found]
    except ImportError:
        return None
    root = Path(str(importlib.resources.files(comfyui_frontend_package) / "static"))
    return root if (root / "index.html").is_file() else None


def extension_scripts(root: Path | None) -> list[str]:
    """`/extensions` entries of the frontend itself: every `extensions/**/*.js` as a URL path."""
    if root is None:
        return []
    files = glob.glob(os.path.join(glob.escape(str(root)), "extensions/**/*.js"), recursive=True)
    return ["/" + os.path.relpath(f, root).replace("\\", "/") for f in files]


def index_handler(root: Path | None) -> Handler:
    """`GET /`: index.html never cached (so a new frontend version is picked up), or how to install it."""
    async def get_root(request: web.Request) -> web.StreamResponse:
        if root is None:
            return web.Response(status=404, text=INSTALL_HINT)
        return web.FileResponse(root / "index.html",
                                headers={"Cache-Control": "no-cache", "Pragma": "no-cache", "Expires": "0"})
    return get_root


def mended_scripts(root: Path) -> dict[str, bytes]:
    """The frontend's entry scripts (`assets/index-*.js`) that carry the router-base bug, by URL path, with
    upstream's fix applied (`ROUTER_BASE`); none for a frontend without the bug."""
    bug, fix = ROUTER_BASE
    mended = {}
    for script in sorted((root / "assets").glob("index-*.js")):
        body = script.read_bytes()
        if body.count(bug) == 1:
            mended["/" + script.relative_to(root).as_posix()] = body.replace(bug, fix)
    return mended


def _script(body: bytes) -> Handler:
    """A script served from memory, revalidated by its ETag as a static file is (it is `no-cache`)."""
    etag = hashlib.sha256(body).hexdigest()[:32]

    async def get_script(request: web.Request) -> web.StreamResponse:
        if any(tag.value == etag for tag in request.if_none_match or ()):
            response = web.Response(status=304)
        else:
            response = web.Response(body=body, content_type="text/javascript", charset="utf-8")
        response.etag = etag
        return response
    return get_script


def add_static(app: web.Application, root: Path | None, *, mend: bool) -> None:
    """The frontend's files at `/`; with `mend`, the entry script with upstream's router fix in its place
    (the proxy mends it; the simulator serves the package's bytes, as ComfyUI 0.3.75 does). Register it
    last: its prefix matches every path."""
    if root is not None:
        for path, body in (mended_scripts(root) if mend else {}).items():
            app.router.add_get(path, _script(body))
        app.router.add_static("/", root)


@web.middleware
async def cache_control(request: web.Request, handler: Handler) -> web.StreamResponse:
    """ComfyUI's cache rules by path: scripts, styles and index*.json revalidate; images are cached for
    a day (a missing one for an hour, a temporary redirect not at all). Headers already set win."""
    response = await handler(request)  # a raised HTTPException passes unmarked, as in ComfyUI
    _mark(request.path, response.status, response.headers)
    return response


def _mark(path: str, status: int, headers: MutableMapping[str, str]) -> None:
    last = path.rsplit("/", 1)[-1]
    if path.endswith((".js", ".css")) or (last.startswith("index") and last.endswith(".json")):
        headers.setdefault("Cache-Control", "no-cache")
    elif path.lower().endswith(IMAGE_SUFFIXES):
        if status == 404:
            headers.setdefault("Cache-Control", f"public, max-age={ONE_HOUR}")
        elif status in (200, 201, 202, 203, 204, 205, 206, 301, 308):
            headers.setdefault("Cache-Control", f"public, max-age={ONE_DAY}")
        elif status in (302, 303, 307):
            headers.setdefault("Cache-Control", "no-cache")


def merge_json(base: object, update: object) -> object:
    """ComfyUI's merge of translation files (utils/json_util.py): objects merge key by key, lists
    concatenate, anything else is replaced by the update. The proxy merges backends' `/i18n` with it."""
    if isinstance(base, dict) and isinstance(update, dict):
        merged = dict(base)
        for key, value in update.items():
            merged[key] = merge_json(merged[key], value) if key in merged else value
        return merged
    if isinstance(base, list) and isinstance(update, list):
        return base + update
    return update
