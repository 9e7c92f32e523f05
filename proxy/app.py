"""The proxy's aiohttp application: its long-lived parts, listed in the order they start.

Start: store → HTTP session → uploads folder → file store → output keeper → webhook sender → event bus →
farm poller (first poll awaited) → upstream sockets → dispatcher → client sockets → reloader → membership →
DNS discovery → gauge sampler. Each part registers its close as it starts (`proxy.lifecycle`): they run in
reverse, and a failed start closes what had started.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web

from proxy import jsoncodec
from proxy.api import middlewares, setup_routes
from proxy.api.users import user_root
from proxy.api.webhooks import payload as webhook_payload
from proxy.backend_client import BackendClient
from proxy.backends import Farm, SharedFlags
from proxy.comfy.userdata import USER_ROOT
from proxy.config import Config
from proxy.discovery import DnsDiscoverer
from proxy.dispatch import Dispatcher
from proxy.files import FileStore, FileStoreUnavailable, open_files
from proxy.files.folder import FolderStore
from proxy.files.opening import key_prefix
from proxy.imagefetch import FetchLimits, ImageFetcher
from proxy.keeping import OutputKeeper
from proxy.lifecycle import Lifecycle
from proxy.links import SHARED_SECRET_NAME, LinkSigner, new_secret
from proxy.membership import Membership
from proxy.metrics import METRICS, Metrics, http_middleware, metrics_handler
from proxy.relay.bus import EventBus, LocalBus
from proxy.relay.buses import redis_bus
from proxy.relay.hub import ClientHub
from proxy.relay.router import EventRouter
from proxy.relay.upstream import Upstream, lease_name, upstream_client_id
from proxy.reload import FarmReloader
from proxy.resolving import dns_resolver
from proxy.sampler import GaugeSampler
from proxy.scheduler import Scheduler
from proxy.services import CONFIG, CONFIG_PATH, SERVICES, STORE_OVERRIDE, TENANTS, WORKFLOWS, Services
from proxy.store import Store, open_store
from proxy.store.instrumented import InstrumentedStore
from proxy.store.redis import Keys
from proxy.tenancy import TenantDirectory
from proxy.uploads import Naming, UploadCopier, UploadStore
from proxy.urlguard import AddressPolicy, UrlGuard, parse_networks
from proxy.webhooks.sender import WebhookSender
from proxy.workflows import load_templates

log = structlog.get_logger(__name__)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    async with Lifecycle() as life:
        await _start(app, life)
        yield


async def _close_fetcher(images: ImageFetcher, guard: UrlGuard) -> None:
    await images.close()
    await guard.close()


async def _start(app: web.Application, life: Lifecycle) -> None:
    """Build and start every part, registering each one's close with `life` as it goes."""
    config, metrics = app[CONFIG], app[METRICS]
    given = app.get(STORE_OVERRIDE)
    raw_store: Store = given if given is not None else open_store(config.store)
    await life.part("store", close=raw_store.close if given is None else None)
    store: Store = InstrumentedStore(raw_store, metrics.store_ops)  # type: ignore[assignment]

    # No cookie jar: a cookie one backend sets must never ride along on another tenant's request.
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=256, keepalive_timeout=60),
        auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(), json_serialize=jsoncodec.dumps_compact)
    await life.part("session", close=session.close)
    client = BackendClient(session)
    hub = ClientHub(metrics)
    replica = uuid.uuid4().hex
    files = open_files(config.outputs)
    uploads = await _upload_store(config, files, store, replica, life)

    farm = Farm(backends=config.backends, session=session, settings=config.scheduler, health=config.health,
                metrics=metrics)
    farm.follow_shared_flags(SharedFlags(store.drained, store.lease_holders, lease_name, replica))
    bus: EventBus = (redis_bus(config.store.events, hub=hub, url=config.store.redis_url,
                               keys=Keys(config.store.key_prefix), settle=store.ends_announced)
                     if config.store.redis_url else LocalBus(hub, store.ends_announced))
    router = EventRouter(store=store, client=client, publish=bus.publish, backend_url=farm.url_of,
                         on_slot_freed=farm.nudge, metrics=metrics, on_started=farm.note_started,
                         on_finished=farm.note_finished)

    def client_id(name: str) -> str:
        return upstream_client_id(config.store.key_prefix, name)

    def make_upstream(name: str) -> Upstream:
        return Upstream(backend=name, farm=farm, router=router, store=store, client=client, session=session,
                        client_id=client_id(name), owner=replica, wants_logs=lambda: bool(hub.log_subscribers))

    upstreams = {b.name: make_upstream(b.name) for b in config.backends}
    dispatcher = Dispatcher(store=store, farm=farm, scheduler=Scheduler(config.scheduler.policy), client=client,
                            router=router, upstream_ids={name: client_id(name) for name in upstreams},
                            settings=config.scheduler, replica=replica, metrics=metrics, tenants=app[TENANTS],
                            uploads=UploadCopier(uploads, session))
    reloader = FarmReloader(farm=farm, store=store, dispatcher=dispatcher, upstreams=upstreams,
                            make_upstream=make_upstream, client_id=client_id, workflows=app[WORKFLOWS])
    membership = Membership(store=store, farm=farm, client=client, apply=reloader.apply, move_off=dispatcher.move_off,
                            config_backends=config.backends, interval_s=config.scheduler.poll_interval_s)
    reloader.on_backends = membership.set_config
    discoverer = DnsDiscoverer(sources=config.discovery.dns, resolver=dns_resolver(config.dns.nameservers),
                               store=store, changed=membership.nudge)
    known_pools = tuple({*(label for b in config.backends for label in b.labels),
                         *(label for source in config.discovery.dns for label in source.labels),
                         *(pool for t in config.tenants for pool in t.pools)})
    sampler = GaugeSampler(metrics, store, farm, hub, config.scheduler.poll_interval_s,
                           tenant_pools=lambda tenant: app[TENANTS].get(tenant).pools, known_pools=known_pools)
    keeper = None if files is None else OutputKeeper(store=store, files=files, farm=farm, session=session,
                                                     metrics=metrics, config=config)
    if keeper is not None:
        router.on_outputs = keeper.nudge

    async def link_secret() -> str:
        return await store.shared_secret(SHARED_SECRET_NAME, new_secret())
    links = LinkSigner(config.outputs.link_secret, link_secret)
    guard = UrlGuard(AddressPolicy(allow_private=config.webhooks.allow_private,
                                   allow=parse_networks(config.webhooks.allow_cidrs)), config.dns.nameservers)
    webhooks = WebhookSender(store=store, config=config, guard=guard, metrics=metrics,
                             payload=lambda delivery: webhook_payload(app[SERVICES], delivery))
    router.on_deliveries = webhooks.nudge
    wf = config.workflows
    # Its own guard: a fetched image is read back by the tenant, so webhooks' internal receivers do not
    # make internal images fetchable.
    image_guard = UrlGuard(AddressPolicy(allow_private=wf.image_allow_private,
                                         allow=parse_networks(wf.image_allow_cidrs)), config.dns.nameservers)
    images = ImageFetcher(image_guard, uploads, FetchLimits(max_bytes=int(wf.image_max_mb * 1024 * 1024),
                                                            timeout_s=wf.image_timeout_s,
                                                            max_redirects=wf.image_max_redirects))
    app[SERVICES] = Services(config, store, farm, client, hub, router, dispatcher, upstreams, uploads, reloader,
                             files, keeper, links, guard, webhooks, membership, images)

    if files is not None and keeper is not None:
        await life.part("files", lambda: _start_files(files), files.close)
        await life.part("output-keeper", keeper.start, keeper.stop)
    await life.part("webhooks", webhooks.start, webhooks.stop)
    await life.part("images", images.start, lambda: _close_fetcher(images, image_guard))
    await life.part("bus", bus.start, bus.stop)
    await life.part("farm", farm.start, farm.stop)
    await life.part("upstreams", lambda: _start_all(upstreams), lambda: _stop_all(upstreams))
    await life.part("upstreams-connected", lambda: farm.wait_connected(config.scheduler.backend_timeout_s))
    await life.part("dispatcher", dispatcher.start, dispatcher.stop)
    await life.part("client-sockets", close=hub.close_all)
    await life.part("reloader", close=reloader.stop)
    await life.part("membership", membership.start, membership.stop)
    await life.part("discovery", discoverer.start, discoverer.stop)
    await life.part("sampler", sampler.start, sampler.stop)


async def _upload_store(config: Config, files: FileStore | None, store: Store, owner: str,
                        life: Lifecycle) -> UploadStore:
    """Uploads in the file store (every replica reaches it); with `outputs.store: backend`, in
    `uploads.dir`. This replica's own folder (the web frontend's user data) is `uploads.dir` or a temporary
    folder removed when the app stops."""
    if config.uploads.dir:
        root = config.uploads.dir
    else:
        temp = tempfile.TemporaryDirectory(prefix="comfy-proxy-uploads-")
        await life.part("uploads-folder", close=temp.cleanup)
        root = temp.name
    naming = Naming(store.hold_lease, store.drop_lease, owner)
    if files is None:
        return UploadStore(FolderStore(Path(root) / "files"), root, naming)
    return UploadStore(files, root, naming, key_prefix(config.outputs))


async def _start_files(files: FileStore) -> None:
    """A file store that fails at start does not stop the proxy: copies wait in the queue, `/view` serves
    from the backends, and readiness says the store is degraded until it answers."""
    try:
        await files.start()
    except FileStoreUnavailable as exc:
        log.warning("file_store_unavailable", kind=files.kind, error=str(exc))


def _start_all(upstreams: dict[str, Upstream]) -> None:
    for upstream in upstreams.values():
        upstream.start()


async def _stop_all(upstreams: dict[str, Upstream]) -> None:
    """Every upstream, including those a reload added since the start."""
    for upstream in list(upstreams.values()):
        await upstream.stop()


async def _close_client_sockets(app: web.Application) -> None:
    """Before the server waits for open handlers: websockets would hold a graceful shutdown open."""
    if SERVICES in app:
        await app[SERVICES].hub.close_all()


def create_app(config: Config, store: Store | None = None, config_path: str | None = None) -> web.Application:
    """The proxy. `store` lets tests share one store between a proxy and its restarted successor;
    `config_path` is the file `POST /proxy/reload` and SIGHUP read again."""
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
