"""`/object_info`: the farm's node classes, merged over available backends (a class appears if any
backend has it; combo lists, such as model files, are the union)."""

from __future__ import annotations

from aiohttp import web

from proxy.api.context import services


async def object_info(request: web.Request) -> web.Response:
    return web.json_response(services(request).farm.merged_object_info())


async def object_info_class(request: web.Request) -> web.Response:
    cls = request.match_info["node_class"]
    merged = services(request).farm.merged_object_info()
    return web.json_response({cls: merged[cls]} if cls in merged else {})
