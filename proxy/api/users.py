"""The web frontend's user data through the proxy: settings and user files (saved workflows, …) are
kept per tenant by the proxy, so they follow the tenant whichever backend runs its prompts. The handlers
are ComfyUI's (`proxy.comfy.userdata`); only the folder is the proxy's."""

from __future__ import annotations

from aiohttp import web

from proxy.api.context import identity, services
from proxy.comfy.userdata import exists, user_path
from proxy.uploads import tenant_dir


def user_root(request: web.Request) -> str:
    """`comfy.userdata.USER_ROOT` for the proxy: the tenant's own folder beside its uploads."""
    return str(services(request).uploads.root / tenant_dir(identity(request).tenant) / "user")


async def get_users(request: web.Request) -> web.Response:
    """Single-user storage as ComfyUI answers it: each tenant is the one user of its own data."""
    return web.json_response({"storage": "server",
                              "migrated": exists(user_path(request, None, create_dir=False))})


async def post_users(request: web.Request) -> web.Response:
    # ComfyUI's own error form for /users: users here are the proxy's tenants, made in its config.
    return web.json_response({"error": "Users are the proxy's tenants; they are configured, not created"},
                             status=400)
