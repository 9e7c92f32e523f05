"""What a handler needs to know about the request beyond its body: the services, and whose it is."""

from __future__ import annotations

from aiohttp import web

from proxy.app import SERVICES, Services


def services(request: web.Request) -> Services:
    return request.app[SERVICES]


def tenant_of(request: web.Request) -> str:
    """The tenant a request acts for. Anonymous ("") until tenants are configured."""
    return ""
