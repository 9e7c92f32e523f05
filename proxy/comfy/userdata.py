"""ComfyUI's user data routes: settings and user files (app/user_manager.py, app/app_settings.py).

Files live in a per-user folder that the application names with `USER_ROOT` (a function of the
request): the simulator's `user/<comfy-user or default>/`, the proxy's per-tenant folder. The same
handlers serve both, with ComfyUI's answers and path rules.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from collections.abc import Callable
from typing import Any
from urllib import parse

from aiohttp import web

routes = web.RouteTableDef()
SETTINGS_FILE = "comfy.settings.json"
USER_ROOT: web.AppKey[Callable[[web.Request], str]] = web.AppKey("user_root")


def user_path(request: web.Request, file: str | None, create_dir: bool = True) -> str | None:
    """A path inside the request user's folder, or None when `file` escapes it."""
    user_root = request.app[USER_ROOT](request)
    path = user_root
    if file is not None:
        if "%" in file:
            file = parse.unquote(file)
        if "\x00" in file:
            return None  # no such path can exist (ComfyUI: a 500 from os.path)
        path = os.path.abspath(os.path.join(user_root, file))
        if os.path.commonpath((user_root, path)) != user_root:
            return None
    parent = os.path.split(path)[0]
    if create_dir and not os.path.exists(parent):
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError:
            pass  # a file where a folder should be: writing there fails and is answered as such
    return path


def exists(path: str | None) -> bool:
    return bool(path) and os.path.exists(path)  # type: ignore[arg-type]


def file_info(path: str, relative_to: str) -> dict[str, Any]:
    return {"path": os.path.relpath(path, relative_to).replace(os.sep, "/"), "size": os.path.getsize(path),
            "modified": os.path.getmtime(path), "created": os.path.getctime(path)}


def _load_settings(request: web.Request) -> dict[str, Any]:
    path = user_path(request, SETTINGS_FILE)
    if path is None or not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            loaded = json.load(f)
        return loaded if isinstance(loaded, dict) else {}
    except ValueError:
        return {}  # ComfyUI logs a corrupted settings file and answers {}


def _save_settings(request: web.Request, settings: dict[str, Any]) -> None:
    path = user_path(request, SETTINGS_FILE)
    assert path is not None
    with open(path, "w") as f:
        f.write(json.dumps(settings, indent=4))


@routes.get("/settings")
async def get_settings(request: web.Request) -> web.Response:
    return web.json_response(_load_settings(request))


async def _json(request: web.Request) -> tuple[bool, Any]:
    """(ok, value) of a JSON body: the proxy answers a broken one with a bare 400 (ComfyUI: a 500)."""
    try:
        return True, json.loads(await request.read())
    except ValueError:
        return False, None


@routes.post("/settings")
async def post_settings(request: web.Request) -> web.Response:
    ok, changes = await _json(request)
    if not ok or not isinstance(changes, dict):
        return web.Response(status=400)
    settings = _load_settings(request)
    _save_settings(request, {**settings, **changes})
    return web.Response(status=200)


@routes.get("/settings/{id}")
async def get_setting(request: web.Request) -> web.Response:
    settings = _load_settings(request)
    return web.json_response(settings.get(request.match_info["id"]))


@routes.post("/settings/{id}")
async def post_setting(request: web.Request) -> web.Response:
    ok, value = await _json(request)
    if not ok:
        return web.Response(status=400)
    settings = _load_settings(request)
    settings[request.match_info["id"]] = value
    _save_settings(request, settings)
    return web.Response(status=200)


@routes.get("/userdata")
async def list_userdata(request: web.Request) -> web.Response:
    query = request.rel_url.query
    directory = query.get("dir", "")
    if not directory:
        return web.Response(status=400, text="Directory not provided")
    path = user_path(request, directory)
    if not path:
        return web.Response(status=403, text="Invalid directory")
    if not exists(path):
        return web.Response(status=404, text="Directory not found")
    flags = [query.get(name, "").lower() == "true" for name in ("recurse", "full_info", "split")]
    return web.json_response(_listing(path, *flags))


def _listing(path: str, recurse: bool, full_info: bool, split: bool) -> list[Any]:
    pattern = os.path.join(glob.escape(path), "**", "*") if recurse else os.path.join(glob.escape(path), "*")
    results: list[Any] = []
    for full_path in glob.glob(pattern, recursive=recurse):
        if not os.path.isfile(full_path):
            continue
        rel = os.path.relpath(full_path, path).replace(os.sep, "/")
        results.append(file_info(full_path, path) if full_info else [rel, *rel.split("/")] if split else rel)
    return results


@routes.get("/v2/userdata")
async def list_userdata_v2(request: web.Request) -> web.Response:
    requested = parse.unquote(request.rel_url.query.get("path", ""))
    base = user_path(request, None, create_dir=False)
    target = user_path(request, requested, create_dir=False) if requested else base
    if not target or not base:
        return web.Response(status=400, text="Invalid path requested")
    listing = _walk(base, target)
    return listing if isinstance(listing, web.Response) else web.json_response(listing)


def _walk(base: str, target: str) -> list[dict[str, Any]] | web.Response:
    if not os.path.exists(target):
        if target == base:
            return []
        return web.Response(status=404, text="Requested path not found")
    if not os.path.isdir(target):
        return web.Response(status=400, text="Requested path is not a directory")
    results: list[dict[str, Any]] = []
    for root, dirs, files in os.walk(target, topdown=True):
        for name in dirs:
            rel = os.path.relpath(os.path.join(root, name), base).replace(os.sep, "/")
            results.append({"name": name, "path": rel, "type": "directory"})
        for name in files:
            full = os.path.join(root, name)
            stats = os.stat(full)
            rel = os.path.relpath(full, base).replace(os.sep, "/")
            results.append({"name": name, "path": rel, "type": "file", "size": stats.st_size,
                            "modified": stats.st_mtime})
    results.sort(key=lambda x: (x["type"] != "directory", x["name"].lower()))
    return results


def _data_path(request: web.Request, check_exists: bool = False, param: str = "file") -> str | web.Response:
    file = request.match_info.get(param)
    if not file:
        return web.Response(status=400)
    path = user_path(request, file)
    if not path:
        return web.Response(status=403)
    if check_exists and not os.path.exists(path):
        return web.Response(status=404)
    return path


def _written(request: web.Request, path: str) -> web.Response:
    user_root = user_path(request, None)
    assert user_root is not None
    if request.query.get("full_info", "false").lower() == "true":
        return web.json_response(file_info(path, user_root))
    return web.json_response(os.path.relpath(path, user_root))


@routes.get("/userdata/{file}")
async def get_userdata(request: web.Request) -> web.StreamResponse:
    path = _data_path(request, check_exists=True)
    return path if isinstance(path, web.Response) else web.FileResponse(path)


@routes.post("/userdata/{file}")
async def post_userdata(request: web.Request) -> web.Response:
    path = _data_path(request)
    if isinstance(path, web.Response):
        return path
    if request.query.get("overwrite", "true") == "false" and exists(path):
        return web.Response(status=409, text="File already exists")
    if not _write_bytes(path, await request.read()):
        return web.Response(status=400, reason="Invalid filename. Please avoid special characters like :\\/*?\"<>|")
    return _written(request, path)


def _write_bytes(path: str, body: bytes) -> bool:
    try:
        with open(path, "wb") as f:
            f.write(body)
    except OSError:
        return False
    return True


@routes.delete("/userdata/{file}")
async def delete_userdata(request: web.Request) -> web.Response:
    path = _data_path(request, check_exists=True)
    if isinstance(path, web.Response):
        return path
    try:
        os.remove(path)
    except OSError:  # a folder (ComfyUI: a 500)
        return web.Response(status=400)
    return web.Response(status=204)


@routes.post("/userdata/{file}/move/{dest}")
async def move_userdata(request: web.Request) -> web.Response:
    source = _data_path(request, check_exists=True)
    if isinstance(source, web.Response):
        return source
    dest = _data_path(request, param="dest")
    if isinstance(dest, web.Response):
        return dest
    if request.query.get("overwrite", "true") == "false" and exists(dest):
        return web.Response(status=409, text="File already exists")
    try:
        shutil.move(source, dest)
    except OSError:  # e.g. into a path under a file (ComfyUI: a 500)
        return web.Response(status=400)
    return _written(request, dest)
