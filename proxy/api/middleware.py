"""Cross-cutting request handling: errors rendered in ComfyUI's shape, ComfyUI's origin check, and a
deadline on slowly sent request bodies."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import itertools
import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from proxy.api.context import IDENTITY
from proxy.errors import Forbidden, PayloadTooLarge, ProxyError, Unauthorized, error_body
from proxy.links import LINK_ROUTE
from proxy.services import CONFIG, TENANTS

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def comfyapi_path(path: str) -> bool:
    """ComfyAPI's routes (proxy.api.comfyapi), whose clients read FastAPI's `detail` in an error."""
    return path in ("/workflows", "/ws/register") or path.startswith("/workflows/")


def _refusal(request: web.Request, exc: ProxyError) -> web.Response:
    body = exc.body()
    if comfyapi_path(request.path):
        body = {"detail": exc.message, **body}
    return web.json_response(body, status=exc.status, headers=exc.headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ProxyError as exc:
        return _refusal(request, exc)
    except web.HTTPRequestEntityTooLarge as exc:
        # aiohttp's own refusal is plain text; clients expect ComfyUI's error shape.
        return _refusal(request, PayloadTooLarge("Request body too large", exc.text or ""))
    except web.HTTPException:
        raise
    except Exception as exc:  # a bug must still answer in ComfyUI's shape, and be logged with context
        log.exception("unhandled_error", path=request.path, method=request.method)
        return web.json_response(error_body("internal_error", "Internal proxy error", repr(exc)), status=500)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _split_host(value: str) -> tuple[str, int | None]:
    parts = urlsplit("//" + value.strip())
    try:
        port = parts.port
    except ValueError:
        port = None
    return (parts.hostname or ""), port


def _same_site(origin: tuple[str, int | None], host: tuple[str, int | None]) -> bool:
    """ComfyUI's comparison: host names equal, ports too when both carry one (protocol §3)."""
    return origin[0] == host[0] and (origin[1] is None or host[1] is None or origin[1] == host[1])


@web.middleware
async def origin_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """ComfyUI's guard against cross-site requests when served on loopback (protocol §3): a browser
    page from another origin must not drive a local farm. Same rule, same bare 403.

    Behind an ingress the `Host` the proxy sees is the ingress's upstream address, not the one in the
    browser's `Origin`. So the origin may also match the first `X-Forwarded-Host` (the address the browser
    used, as the ingress reports it) or the host of `server.public_url`; and a loopback forwarded host
    turns the check on as a loopback `Host` does. A page cannot forge `X-Forwarded-Host`: a cross-site
    request with a custom header needs a CORS preflight, which gets no `Access-Control-Allow-*` here, and
    a websocket handshake cannot carry one at all. The nginx an operator writes for a path prefix:

        location /comfy/ {
            proxy_pass http://127.0.0.1:8188/;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;   # map: "upgrade", or "close" when empty
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_read_timeout 1h;        # a quiet websocket is not a dead one
            client_max_body_size 100m;    # uploads, as server.max_body_mb
        }

    (`proxy_set_header Host $http_host;` works too, as with ComfyUI itself; tests/test_ingress.py runs all
    three ways.)"""
    origin_header = request.headers.get("Origin")
    if not origin_header:
        return await handler(request)
    seen = [_split_host(value) for value in (request.headers.get("Host", ""),
                                             request.headers.get("X-Forwarded-Host", "").split(",")[0]) if value]
    if not any(_is_loopback(host) for host, _ in seen):
        return await handler(request)   # ComfyUI checks loopback hosts only
    o = urlsplit(origin_header.strip())
    try:
        origin = ((o.hostname or ""), o.port)
    except ValueError:
        return web.Response(status=403)
    if any(_same_site(origin, host) for host in seen):
        return await handler(request)
    public_url = request.app[CONFIG].server.public_url
    if public_url and _same_site(origin, _split_host(urlsplit(public_url).netloc)):
        return await handler(request)
    return web.Response(status=403)


BODY_PROGRESS_BYTES = 64 * 1024


@web.middleware
async def slow_body_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request body must keep arriving: within every `server.body_timeout_s` it must end or bring
    `BODY_PROGRESS_BYTES` more, else the handler is cancelled and the client gets 408 in ComfyUI's shape.
    aiohttp has no such timeout, so a client trickling a body would hold a connection and a handler
    forever. The handlers here read their whole body before working, so a stalled body is the client's."""
    if not request.body_exists or request.content.is_eof():   # nothing left to arrive (most small bodies)
        return await handler(request)
    window = request.app[CONFIG].server.body_timeout_s
    content = request.content
    loop = asyncio.get_running_loop()
    seen = content.total_bytes
    check: asyncio.TimerHandle | None = None

    def watch(deadline: asyncio.Timeout) -> None:
        nonlocal seen, check
        if content.is_eof():
            deadline.reschedule(None)
            return
        if content.total_bytes - seen >= BODY_PROGRESS_BYTES:
            seen = content.total_bytes
            check = loop.call_later(window, watch, deadline)
        else:
            deadline.reschedule(loop.time())  # expires now: the handler is cancelled
    try:
        async with asyncio.timeout(None) as deadline:
            check = loop.call_later(window, watch, deadline)
            try:
                return await handler(request)
            finally:
                check.cancel()
    except TimeoutError:
        if not deadline.expired():
            raise
        log.warning("request_body_too_slow", path=request.path, received=content.total_bytes)
        return web.json_response(error_body("request_timeout", "The request body arrived too slowly",
                                            f"less than {BODY_PROGRESS_BYTES} bytes in {window} s"),
                                 status=408, headers={"Connection": "close"})


OPEN_PATHS = frozenset({"/proxy/healthz", "/proxy/readyz", "/proxy/"})   # the operator page's shell: no data
OPEN_PREFIXES = (LINK_ROUTE + "/",)   # signed links: the signature is the credential
JOIN_PREFIX = "/proxy/backends"      # all a join token reaches (proxy.api.members checks the rest)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every route acts for an identity; probes stay open, `/metrics` takes its own token if set."""
    if request.path in OPEN_PATHS or request.path.startswith(OPEN_PREFIXES):
        return await handler(request)
    directory = request.app[TENANTS]
    if request.path == "/metrics":
        token = directory.auth.metrics_token
        given = request.headers.get("Authorization", "")
        if token and not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise Unauthorized("A metrics token is required", "send Authorization: Bearer TOKEN")
        return await handler(request)
    request[IDENTITY] = who = directory.identify(request)
    if who.joiner and not request.path.startswith(JOIN_PREFIX):
        raise Forbidden("A join token may only register and remove backends", "use a tenant's API key")
    return await handler(request)


_REQUEST_ID_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
# Request ids need to be unique, not unguessable: a random prefix per process and a counter, instead of a
# uuid4 (a getrandom system call) per request.
_REQUEST_ID_PREFIX = uuid.uuid4().hex[:16]
_REQUEST_IDS = (f"{_REQUEST_ID_PREFIX}{n:016x}" for n in itertools.count())


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request id on every log line of the request (structlog contextvars) and on the answer.

    A client's own `X-Request-Id` is kept when it is short and plain, so traces can be joined across an
    ingress; anything else is replaced (no header or log injection)."""
    given = request.headers.get("X-Request-Id", "")
    rid = given if 0 < len(given) <= 64 and set(given) <= _REQUEST_ID_OK else next(_REQUEST_IDS)
    with structlog.contextvars.bound_contextvars(request_id=rid):
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers["X-Request-Id"] = rid
            raise
        if not response.prepared:
            response.headers["X-Request-Id"] = rid
        return response
