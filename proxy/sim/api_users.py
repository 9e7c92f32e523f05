"""Frontend users (ComfyUI app/user_manager.py); settings and user files are `proxy.comfy.userdata`.

Files live under `user/<user>/`. Without `--multi-user` ComfyUI ignores the `comfy-user` header; the
simulator honours it when it names a user made with `POST /users` (so per-user isolation can be tested)
and otherwise, like ComfyUI, uses `default`.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from typing import Any

from aiohttp import web

from proxy.comfy.userdata import exists, user_path
from proxy.sim.state import SIM, Sim

routes = web.RouteTableDef()
SYSTEM_USER_PREFIX = "__"
SETTINGS_FILE = "comfy.settings.json"


def request_user(sim: Sim, request: web.Request) -> str:
    user = request.headers.get("comfy-user", "default")
    return user if user in sim.users and not user.startswith(SYSTEM_USER_PREFIX) else "default"


def user_root(request: web.Request) -> str:
    """The simulator's folder for the request's user (`comfy.userdata.USER_ROOT`)."""
    sim = request.app[SIM]
    return os.path.join(sim.paths.user, request_user(sim, request))


@routes.get("/users")
async def get_users(request: web.Request) -> web.Response:
    user_dir = user_path(request, None, create_dir=False)
    return web.json_response({"storage": "server", "migrated": exists(user_dir)})


@routes.post("/users")
async def post_users(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    username = (await request.json())["username"]
    if username in sim.users.values():
        return web.json_response({"error": "Duplicate username."}, status=400)
    name = username.strip()
    if not name:
        return web.json_response({"error": "username not provided"}, status=400)
    user_id = re.sub("[^a-zA-Z0-9-_]+", "-", name)
    if name.startswith(SYSTEM_USER_PREFIX) or user_id.startswith(SYSTEM_USER_PREFIX):
        return web.json_response({"error": "System User prefix not allowed"}, status=400)
    user_id = f"{user_id}_{uuid.uuid4()}"
    sim.users[user_id] = name
    _write_json(os.path.join(sim.paths.user, "users.json"), sim.users)
    return web.json_response(user_id)




def _write_json(path: str, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f)
