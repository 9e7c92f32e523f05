"""HTTP and websocket routes, grouped by concern. Every ComfyUI route is also served under `/api`, as
ComfyUI does (protocol §1); what ComfyUI serves as static files or from its `/internal` sub-app has no
twin (`STATIC_ROUTES`). The proxy's own routes live under `/proxy/` and `/metrics`. The web frontend's
folder is served at `/` after every other route (see `setup_routes`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.api import (
    admin,
    comfyapi,
    control,
    files,
    frontend,
    history,
    info,
    jobs,
    logs,
    members,
    openapi,
    operator,
    prompts,
    run,
    users,
    webhooks,
    workflows,
    ws,
)
from proxy.api.middleware import (
    auth_middleware,
    error_middleware,
    origin_middleware,
    request_id_middleware,
    slow_body_middleware,
)
from proxy.comfy import userdata
from proxy.comfy.frontend import WEB_ROOT, add_static, cache_control, web_root

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

COMFY_ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/prompt", prompts.post_prompt),
    ("GET", "/prompt", prompts.get_prompt),
    ("GET", "/queue", prompts.get_queue),
    ("POST", "/queue", control.post_queue),
    ("POST", "/interrupt", control.post_interrupt),
    ("POST", "/free", control.post_free),
    ("POST", "/history", control.post_history),
    ("GET", "/history", history.get_history),
    ("GET", "/history/{prompt_id}", history.get_history_item),
    ("GET", "/view", files.view),
    # later ComfyUI registers these under /api itself, so /api/api/jobs answers too (protocol §17)
    ("GET", "/api/jobs", jobs.list_jobs),
    ("POST", "/api/jobs/cancel", jobs.cancel_jobs),
    ("GET", "/api/jobs/{job_id}", jobs.get_job),
    ("POST", "/api/jobs/{job_id}/cancel", jobs.cancel_job),
    ("GET", "/api/jobs/{job_id}/events", jobs.job_events),
    ("POST", "/upload/image", files.upload_image),
    ("POST", "/upload/mask", files.upload_mask),
    ("GET", "/view_metadata/{folder}", info.view_metadata),
    ("GET", "/object_info", info.object_info),
    ("GET", "/object_info/{node_class}", info.object_info_class),
    ("GET", "/system_stats", info.system_stats),
    ("GET", "/models", info.models),
    ("GET", "/models/{folder}", info.models_in_folder),
    ("GET", "/embeddings", info.embeddings),
    ("GET", "/extensions", frontend.extensions),
    ("GET", "/features", info.features),
    ("GET", "/ws", ws.websocket),
    ("GET", "/users", users.get_users),
    ("POST", "/users", users.post_users),
    ("GET", "/settings", userdata.get_settings),
    ("POST", "/settings", userdata.post_settings),
    ("GET", "/settings/{id}", userdata.get_setting),
    ("POST", "/settings/{id}", userdata.post_setting),
    ("GET", "/userdata", userdata.list_userdata),
    ("GET", "/v2/userdata", userdata.list_userdata_v2),
    ("GET", "/userdata/{file}", userdata.get_userdata),
    ("POST", "/userdata/{file}", userdata.post_userdata),
    ("DELETE", "/userdata/{file}", userdata.delete_userdata),
    ("POST", "/userdata/{file}/move/{dest}", userdata.move_userdata),
    ("GET", "/", frontend.index),
    ("GET", "/i18n", frontend.i18n),
    ("GET", "/workflow_templates", frontend.workflow_templates),
    ("GET", "/global_subgraphs", frontend.global_subgraphs),
    ("GET", "/global_subgraphs/{id}", frontend.global_subgraph),
    ("GET", "/experiment/models", frontend.experiment_models),
    ("GET", "/experiment/models/{folder}", frontend.experiment_models_in_folder),
    ("GET", "/experiment/models/preview/{path:.+}", frontend.backend_file("/experiment/models/preview")),
]

STATIC_ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", "/extensions/{path:.+}", frontend.extension_file),
    ("GET", "/templates/{path:.+}", frontend.backend_file("/templates", raised=True)),
    ("GET", "/docs/{path:.+}", frontend.backend_file("/docs")),
    ("GET", "/api/workflow_templates/{path:.+}", frontend.backend_file("/api/workflow_templates")),
    ("GET", "/internal/folder_paths", frontend.folder_paths),
    ("GET", "/internal/files/{directory_type}", frontend.internal_files),
    ("GET", "/internal/logs", logs.logs),
    ("GET", "/internal/logs/raw", logs.raw_logs),
    ("PATCH", "/internal/logs/subscribe", logs.subscribe_logs),
]

PROXY_ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", "/proxy/healthz", admin.healthz),
    ("GET", "/proxy/readyz", admin.readyz),
    ("GET", "/proxy/backends", admin.backends),
    ("POST", "/proxy/backends", members.add_backend),
    ("GET", "/proxy/backends/{name}", members.get_backend),
    ("PATCH", "/proxy/backends/{name}", members.patch_backend),
    ("DELETE", "/proxy/backends/{name}", members.delete_backend),
    ("POST", "/proxy/backends/{name}/drain", admin.drain),
    ("POST", "/proxy/backends/{name}/undrain", admin.undrain),
    ("POST", "/proxy/reload", admin.reload),
    ("GET", "/proxy/workflows", workflows.list_workflows),
    ("GET", "/proxy/workflows/{name}", workflows.describe_workflow),
    ("POST", "/proxy/workflows/{name}/run", workflows.run_workflow),
    ("GET", "/proxy/jobs/{prompt_id}", workflows.job),
    ("POST", "/proxy/run", run.run),
    ("GET", "/proxy/files/{ref}/{name}", files.signed_file),
    ("GET", "/proxy/webhooks/failed", webhooks.failed),
    ("POST", "/proxy/webhooks/{delivery_id}/redeliver", webhooks.redeliver),
    ("GET", "/proxy/openapi.json", openapi.openapi),
    ("GET", "/proxy/", operator.page),
    ("GET", "/proxy/ui/farm", operator.farm_fragment),
]


# ComfyAPI's routes (proxy.api.comfyapi), at its own paths
COMFYAPI_ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", "/workflows/", comfyapi.list_workflows),
    ("GET", "/workflows", comfyapi.list_workflows),
    ("GET", "/workflows/{workflow_id}", comfyapi.describe_workflow),
    ("POST", "/workflows/{workflow_id}/queue", comfyapi.queue_workflow),
    ("GET", "/ws/register", comfyapi.register),
]


def setup_routes(app: web.Application) -> None:
    for method, path, handler in COMFY_ROUTES:
        app.router.add_route(method, path, handler)
        app.router.add_route(method, "/api" + path, handler)
    for method, path, handler in (*STATIC_ROUTES, *PROXY_ROUTES, *COMFYAPI_ROUTES):
        app.router.add_route(method, path, handler)
    app[WEB_ROOT] = root = web_root()

    async def add_frontend_last(app: web.Application) -> None:
        # The static route at `/` matches every path: added at startup, after every route create_app
        # or anyone else registered, it shadows none of them.
        add_static(app, root, mend=True)
    app.on_startup.append(add_frontend_last)


def middlewares() -> list[Callable[..., Awaitable[web.StreamResponse]]]:
    return [request_id_middleware, error_middleware, slow_body_middleware, cache_control, origin_middleware,
            auth_middleware]
