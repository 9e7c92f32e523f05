"""What a handler needs to know about the request beyond its body: the services, and whose it is."""

from __future__ import annotations

from aiohttp import web

from proxy.services import SERVICES, Services
from proxy.tenancy import Identity

IDENTITY = web.RequestKey("identity", Identity)


def services(request: web.Request) -> Services:
    return request.app[SERVICES]


def identity(request: web.Request) -> Identity:
    """Set by the auth middleware for every ComfyUI route."""
    return request[IDENTITY]


def public_base(request: web.Request) -> str:
    """The proxy's address as clients know it: `server.public_url`, else this request's scheme and host."""
    return (services(request).config.server.public_url or f"{request.scheme}://{request.host}").rstrip("/")
