"""The application's shared keys and its service registry: a leaf that any module may import.

Handlers reach the long-lived parts through `request.app[SERVICES]`; the parts themselves are built by
`proxy.app`. Nothing here imports a part at run time, so no import of this module can close a circle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:   # for annotations only: importing the parts here would tie every handler to them
    from proxy.backend_client import BackendClient
    from proxy.backends import Farm
    from proxy.config import Config
    from proxy.dispatch import Dispatcher
    from proxy.files import FileStore
    from proxy.imagefetch import ImageFetcher
    from proxy.keeping import OutputKeeper
    from proxy.links import LinkSigner
    from proxy.membership import Membership
    from proxy.relay.hub import ClientHub
    from proxy.relay.router import EventRouter
    from proxy.relay.upstream import Upstream
    from proxy.reload import FarmReloader
    from proxy.store import Store
    from proxy.tenancy import TenantDirectory
    from proxy.uploads import UploadStore
    from proxy.urlguard import UrlGuard
    from proxy.webhooks.sender import WebhookSender


@dataclass
class Services:
    """Everything a request handler may use; built once per application, while it starts."""

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
    files: FileStore | None       # None: `outputs.store: backend`
    keeper: OutputKeeper | None   # copies outputs into `files`
    links: LinkSigner
    guard: UrlGuard               # URLs the proxy calls for clients (webhooks)
    webhooks: WebhookSender
    membership: Membership        # the farm's backends at runtime, shared through the store
    images: ImageFetcher          # image inputs given as URLs (ComfyAPI's queue)


SERVICES: web.AppKey[Services] = web.AppKey("services")
CONFIG: web.AppKey[Config] = web.AppKey("config")
TENANTS: web.AppKey[TenantDirectory] = web.AppKey("tenants")
CONFIG_PATH: web.AppKey[str] = web.AppKey("config_path")          # what SIGHUP and `POST /proxy/reload` read
WORKFLOWS: web.AppKey[dict[str, Any]] = web.AppKey("workflows")   # template name → template, replaced on reload
STORE_OVERRIDE: web.AppKey[Store] = web.AppKey("store_override")   # tests: one store shared by successive apps
