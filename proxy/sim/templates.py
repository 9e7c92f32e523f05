"""The packages a ComfyUI 0.3.75 serves beside its API (server.py `add_routes`, comfyui-protocol.md §15): the
workflow templates of `comfyui-workflow-templates` at `/templates/...`, which the page's template browser
and first-run dialog read, and the embedded node docs of `comfyui-embedded-docs` at `/docs/...`.

Templates packages from 0.3.0 on (0.7.25 is ComfyUI 0.3.75's pin and a dependency of comfy-farm-proxy)
spread their files over media packages and list them in a manifest: ComfyUI answers exactly the asset
names the manifest lists, and 404 for any other. An older package is one folder, served as it is.
Neither route has an `/api` twin. A missing package is logged and its route left out, as in ComfyUI;
the docs package is optional there and here, and comfy-farm-proxy does not install it.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import structlog
from aiohttp import web

from proxy.sim.state import Sim

try:  # both optional: the simulator starts without them, as ComfyUI does
    import comfyui_workflow_templates
except ImportError:
    comfyui_workflow_templates = None
try:
    import comfyui_embedded_docs
except ImportError:
    comfyui_embedded_docs = None

log = structlog.get_logger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

TEMPLATES_PACKAGE = "comfyui-workflow-templates"
REQUIRED_TEMPLATES_VERSION = "0.7.25"   # the pin in ComfyUI 0.3.75's requirements.txt
ASSET_HANDLER_SINCE = (0, 3, 0)   # server.py: a package before this is one static `templates/` folder
NOT_INSTALLED = (f"{TEMPLATES_PACKAGE} is not installed. Install it with "
                 f"pip install {TEMPLATES_PACKAGE}=={REQUIRED_TEMPLATES_VERSION}")


class TemplatesUnavailable(Exception):
    """The templates package cannot be served; the message says why."""


@functools.cache
def installed_templates_version() -> str | None:
    """The installed templates package's version (`/system_stats` reports it), None when it is absent;
    looked up once, as it cannot change under a running process."""
    try:
        return version(TEMPLATES_PACKAGE)
    except PackageNotFoundError:
        return None


def serves_by_asset_name(installed: str | None) -> bool:
    """Whether ComfyUI serves this package version by asset name: from 0.3.0 on. An absent or unreadable
    version takes the old folder's way, as in server.py."""
    found = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", installed or "")
    if found is None:
        if installed is not None:
            log.warning("unreadable templates package version", version=installed)
        return False
    return tuple(int(part or 0) for part in found.groups()) >= ASSET_HANDLER_SINCE


def template_assets() -> dict[str, Path]:
    """Every asset name the templates manifest lists → its file (a name two templates share is one file)."""
    package = comfyui_workflow_templates
    if package is None or not hasattr(package, "iter_templates"):
        raise TemplatesUnavailable(NOT_INSTALLED)
    try:
        assets = {asset.filename: Path(package.get_asset_path(entry.template_id, asset.filename))
                  for entry in package.iter_templates() for asset in entry.assets}
    except (OSError, KeyError, ValueError) as exc:  # a media package missing, a broken manifest
        raise TemplatesUnavailable(f"its assets cannot be resolved: {exc!r}") from exc
    if not assets:
        raise TemplatesUnavailable("its manifest lists no assets")
    return assets


def legacy_templates_folder() -> Path:
    """The one `templates/` folder of a package before 0.3.0."""
    if comfyui_workflow_templates is None:
        raise TemplatesUnavailable(NOT_INSTALLED)
    folder = Path(str(importlib.resources.files(comfyui_workflow_templates) / "templates"))
    if not folder.is_dir():
        raise TemplatesUnavailable(f"{folder} is not a folder")
    return folder


def asset_handler(assets: dict[str, Path]) -> Handler:
    """`GET /templates/{name}`: a listed asset as a static file is served (type by name, ranges, ETag);
    any other name a raised 404, which ComfyUI's cache middleware leaves unmarked."""
    async def get_template(request: web.Request) -> web.StreamResponse:
        found = assets.get(request.match_info["path"])
        if found is None:
            raise web.HTTPNotFound()
        return web.FileResponse(found)
    return get_template


def add_templates(app: web.Application) -> None:
    if serves_by_asset_name(installed_templates_version()):
        app.router.add_get("/templates/{path:.*}", asset_handler(template_assets()))
    else:
        app.router.add_static("/templates", legacy_templates_folder())


def embedded_docs_folder() -> Path | None:
    if comfyui_embedded_docs is None:
        return None
    return Path(str(importlib.resources.files(comfyui_embedded_docs) / "docs"))


def add_routes(app: web.Application, sim: Sim) -> None:
    """`/templates/...` and `/docs/...` as ComfyUI 0.3.75 adds them (register before the static route at
    `/`). Why the templates are not served goes to the operator's log and the simulator's console log
    (`/internal/logs`), where ComfyUI writes it."""
    try:
        add_templates(app)
    except TemplatesUnavailable as exc:
        log.error("workflow templates not served", backend=sim.options.name, reason=str(exc))
        sim.log.info(f"Workflow templates are not served: {exc}")
    docs = embedded_docs_folder()
    if docs is not None:
        app.router.add_static("/docs", docs)
