"""The proxy's aiohttp application: long-lived parts started and stopped in order by one cleanup context.

Start: store → HTTP session → farm poller (first poll awaited) → upstream sockets → dispatcher.
Stop: the reverse, after client sockets are closed with 1001 (going away).
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from proxy import jsoncodec
from proxy.backend_client import BackendClient
from proxy.backends import Farm, SharedFlags
from proxy.comfy.userdata import USER_ROOT
from proxy.config import Config
from proxy.dispatch import Dispatcher
from proxy.metrics import METRICS, Metrics, http_middleware, metrics_handler
from proxy.relay.bus import EventBus, LocalBus, RedisBus
from proxy.relay.hub import ClientHub
from proxy.relay.router import EventRouter
from proxy.relay.upstream import Upstream, lease_name, upstream_client_id
from proxy.reload import FarmReloader
from proxy.sampler import GaugeSampler
from proxy.scheduler import Scheduler
from proxy.store import Store, open_store
from proxy.store.instrumented import InstrumentedStore
from proxy.store.redis import Keys
from proxy.tenancy import TenantDirectory
from proxy.uploads import UploadCopier, UploadStore
from proxy.workflows import load_templates


@dataclass
class Services:
    """Everything a request handler may use; built once per application."""

    config: Config
    store: Store
    farm: Farm
    client: BackendClient
    hub: ClientHub
    router: EventRouter
    dispatcher: Dispatcher
    upstreams: dict[str, Upstream]
    uploads: UploadStore
    reloader: FarmReloader


SERVICES = web.AppKey("services", Services)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    metrics = app[METRICS]
    given = app.get(STORE_OVERRIDE)
    raw_store: Store = given if given is not None else open_store(config.store)
    store: Store = InstrumentedStore(raw_store, metrics.store_ops)  # type: ignore[assignment]
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=256, keepalive_timeout=60)
    # No cookie jar: a cookie one backend sets must never ride along on another tenant's request.
    session = aiohttp.ClientSession(connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                                    json_serialize=jsoncodec.dumps_compact)
    farm = Farm(config.backends, session, config.scheduler.poll_interval_s, config.scheduler.backend_timeout_s,
                metrics, config.health)
    replica = uuid.uuid4().hex
    farm.follow_shared_flags(SharedFlags(store.drained, store.lease_holders, lease_name, replica))
    temp_uploads = None if config.uploads.dir else tempfile.TemporaryDirectory(prefix="comfy-proxy-uploads-")
    uploads = UploadStore(config.uploads.dir or temp_uploads.name)  # type: ignore[union-attr]
    client = BackendClient(session)
    hub = ClientHub(metrics)

    def backend_url(name: str) -> str | None:
        state = farm.get(name)
        return state.url if state else None

    bus: EventBus = (RedisBus(hub, config.store.redis_url, Keys(config.store.key_prefix).events, store.ends_announced)
                     if config.store.redis_url else LocalBus(hub, store.ends_announced))
    router = EventRouter(store, client, bus.publish, backend_url, farm.nudge, metrics, farm.note_started,
                         farm.note_finished)
    def client_id(name: str) -> str:
        return upstream_client_id(config.store.key_prefix, name)

    def make_upstream(name: str) -> Upstream:
        return Upstream(name, farm, router, store, client, session, client_id(name), replica,
                        wants_logs=lambda: bool(hub.log_subscribers))

    ids = {b.name: client_id(b.name) for b in config.backends}
    upstreams = {name: make_upstream(name) for name in ids}
    dispatcher = Dispatcher(store, farm, Scheduler(config.scheduler.policy), client, router, ids, metrics,
                            app[TENANTS], UploadCopier(uploads, session), config.scheduler.failover_after_s,
                            config.scheduler.retry_max_attempts, replica)
    sampler = GaugeSampler(metrics, store, farm, hub, config.scheduler.poll_interval_s)
    reloader = FarmReloader(farm, store, dispatcher, upstreams, make_upstream, client_id)
    app[SERVICES] = Services(config, store, farm, client, hub, router, dispatcher, upstreams, uploads, reloader)
    try:
        await bus.start()
        await farm.start()
        for up in upstreams.values():
            up.start()
        await farm.wait_connected(config.scheduler.backend_timeout_s)
        dispatcher.start()
        sampler.start()
        yield
    finally:
        await sampler.stop()
        await reloader.stop()
        await hub.close_all()
        await dispatcher.stop()
        for up in list(upstreams.values()):
            await up.stop()
        await farm.stop()
        await bus.stop()
        await session.close()
        if given is None:
            await raw_store.close()
        if temp_uploads is not None:
            temp_uploads.cleanup()


async def _close_client_sockets(app: web.Application) -> None:
    """Before the server waits for open handlers: websockets would hold a graceful shutdown open."""
    if SERVICES in app:
        await app[SERVICES].hub.close_all()


CONFIG = web.AppKey("config", Config)
TENANTS = web.AppKey("tenants", TenantDirectory)
CONFIG_PATH = web.AppKey("config_path", str)
WORKFLOWS = web.AppKey("workflows", dict)
STORE_OVERRIDE: web.AppKey[Store] = web.AppKey("store_override")


def create_app(config: Config, store: Store | None = None, config_path: str | None = None) -> web.Application:
    """The proxy. `store` lets tests share one store between a proxy and its restarted successor;
    `config_path` is the file `POST /proxy/reload` and SIGHUP read again."""
    from proxy.api import middlewares, setup_routes
    from proxy.api.users import user_root

    metrics = Metrics()
    app = web.Application(middlewares=[http_middleware(metrics), *middlewares()],
                          client_max_size=config.server.max_body_mb * 1024 * 1024)
    app[CONFIG] = config
    app[METRICS] = metrics
    app[TENANTS] = TenantDirectory(config.auth, config.tenants)
    app[WORKFLOWS] = load_templates(config.workflows.dir) if config.workflows.dir else {}
    app[USER_ROOT] = user_root
    if config_path is not None:
        app[CONFIG_PATH] = config_path
    if store is not None:
        app[STORE_OVERRIDE] = store
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_close_client_sockets)
    setup_routes(app)
    app.router.add_get("/metrics", metrics_handler)
    return app
