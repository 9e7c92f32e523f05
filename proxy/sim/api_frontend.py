"""What the web frontend asks of a ComfyUI besides prompts and files (comfyui-protocol.md §6): the page
itself, custom node packs' translations, example workflows, subgraphs and extension scripts, the
model browser's listings, and `/internal/...`.

Custom node packs are folders in `<base>/custom_nodes/` read with ComfyUI's own globs (`locales/`,
`example_workflows/`, `subgraphs/`); a pack's `web/` folder stands for its `WEB_DIRECTORY` (the
simulator imports no Python). Model files are the simulated ones from the options.
"""

from __future__ import annotations

import asyncio
import glob
import hashlib
import json
import os
import time
import urllib.parse
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.comfy.frontend import WEB_ROOT, extension_scripts, merge_json
from proxy.sim.api_info import MODEL_FOLDERS, model_files
from proxy.sim.state import SIM, Sim

routes = web.RouteTableDef()
internal = web.RouteTableDef()

EXAMPLE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")
LOCALE_EXTRA_FILES = ("nodeDefs", "commands", "settings")
SIMULATED_MODEL_SIZE = 2_000_000  # bytes a simulated model file claims in the model browser
STARTED = time.time()


def custom_nodes_dir(sim: Sim) -> str:
    return os.path.join(sim.paths.base, "custom_nodes")


def folder_paths(sim: Sim) -> dict[str, list[str]]:
    """folder_paths.folder_names_and_paths' first element per folder, under the simulator's base."""
    models = os.path.join(sim.paths.base, "models")
    return {name: [custom_nodes_dir(sim) if name == "custom_nodes" else os.path.join(models, name)]
            for name in MODEL_FOLDERS}


def extension_dirs(sim: Sim) -> dict[str, str]:
    """Custom node packs with a `web/` folder: ComfyUI's EXTENSION_WEB_DIRS, pack name → folder."""
    return {os.path.basename(os.path.dirname(d.rstrip("/"))): d.rstrip("/")
            for d in sorted(glob.glob(os.path.join(glob.escape(custom_nodes_dir(sim)), "*", "web/")))}


def _load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


@routes.get("/extensions")
async def get_extensions(request: web.Request) -> web.Response:
    """The frontend's own scripts, then each custom node pack's `web/` scripts under its name."""
    return web.json_response(extension_scripts(request.app[WEB_ROOT]) + _pack_scripts(request.app[SIM]))


def _pack_scripts(sim: Sim) -> list[str]:
    scripts = []
    for name, folder in extension_dirs(sim).items():
        files = glob.glob(os.path.join(glob.escape(folder), "**/*.js"), recursive=True)
        scripts += ["/extensions/" + urllib.parse.quote(name) + "/" + os.path.relpath(f, folder).replace("\\", "/")
                    for f in files]
    return scripts


@routes.get("/i18n")
async def get_i18n(request: web.Request) -> web.Response:
    """Translations of every pack: `locales/<lang>/main.json` plus nodeDefs/commands/settings.json."""
    translations: dict[str, Any] = {}
    for pack in sorted(glob.glob(os.path.join(custom_nodes_dir(request.app[SIM]), "*/"))):
        for lang_dir in glob.glob(os.path.join(pack, "locales", "*/")):
            lang = os.path.basename(os.path.dirname(lang_dir))
            translations.setdefault(lang, {})
            found = _load_json(os.path.join(lang_dir, "main.json"))
            for extra in LOCALE_EXTRA_FILES:
                data = _load_json(os.path.join(lang_dir, extra + ".json"))
                if data:
                    found[extra] = data
            if found:
                translations[lang] = merge_json(translations[lang], found)
    return web.json_response(translations)


@routes.get("/workflow_templates")
async def get_workflow_templates(request: web.Request) -> web.Response:
    """Example workflows of custom node packs: pack name → workflow names."""
    templates: dict[str, list[str]] = {}
    for folder in EXAMPLE_FOLDERS:
        for file in glob.glob(os.path.join(custom_nodes_dir(request.app[SIM]), "*", folder, "*.json")):
            pack = os.path.basename(os.path.dirname(os.path.dirname(file)))
            templates.setdefault(pack, []).append(os.path.splitext(os.path.basename(file))[0])
    return web.json_response(templates)


def _subgraphs(sim: Sim) -> dict[str, dict[str, Any]]:
    found = {}
    for file in glob.glob(os.path.join(custom_nodes_dir(sim), "*", "subgraphs", "*.json")):
        file = file.replace("\\", "/")
        entry_id = hashlib.sha256(f"custom_node{file}".encode()).hexdigest()
        found[entry_id] = {"source": "custom_node", "name": os.path.splitext(os.path.basename(file))[0],
                           "path": file, "info": {"node_pack": "custom_nodes." + file.split("/")[-3]}}
    return found


@routes.get("/global_subgraphs")
async def get_global_subgraphs(request: web.Request) -> web.Response:
    entries = _subgraphs(request.app[SIM])
    return web.json_response({key: {k: v for k, v in entry.items() if k != "path"} for key, entry in entries.items()})


@routes.get("/global_subgraphs/{id}")
async def get_global_subgraph(request: web.Request) -> web.Response:
    """One subgraph with its file as `data`; an unknown id is JSON `null`, as ComfyUI answers."""
    entry = _subgraphs(request.app[SIM]).get(request.match_info["id"])
    if entry is None:
        return web.json_response(None)
    data = await asyncio.to_thread(Path(entry["path"]).read_text, encoding="utf-8")
    return web.json_response({**{k: v for k, v in entry.items() if k != "path"}, "data": data})


@routes.get("/experiment/models")
async def get_model_folders(request: web.Request) -> web.Response:
    paths = folder_paths(request.app[SIM])
    return web.json_response([{"name": name, "folders": paths[name]} for name in MODEL_FOLDERS
                              if name not in ("configs", "custom_nodes")])


@routes.get("/experiment/models/{folder}")
async def get_all_models(request: web.Request) -> web.Response:
    folder = request.match_info["folder"]
    if folder not in MODEL_FOLDERS:
        return web.Response(status=404)
    return web.json_response([{"name": name, "pathIndex": 0, "modified": STARTED, "created": STARTED,
                               "size": SIMULATED_MODEL_SIZE} for name in model_files(request.app[SIM], folder)])


@routes.get("/experiment/models/preview/{folder}/{path_index}/{filename:.*}")
async def get_model_preview(request: web.Request) -> web.Response:
    """Simulated model files have no preview image beside them: 404, as ComfyUI answers then."""
    return web.Response(status=404)


@internal.get("/folder_paths")
async def get_folder_paths(request: web.Request) -> web.Response:
    return web.json_response(folder_paths(request.app[SIM]))


@internal.get("/files/{directory_type}")
async def get_files(request: web.Request) -> web.Response:
    """Files (not folders) of input/output/temp, newest first."""
    directory = request.app[SIM].paths.by_type(request.match_info["directory_type"])
    if directory is None:
        return web.json_response({"error": "Invalid directory type"}, status=400)
    entries = sorted((e for e in os.scandir(directory) if e.is_file()), key=lambda e: -e.stat().st_mtime)
    return web.json_response([e.name for e in entries])


@internal.get("/logs")
async def get_logs(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIM].log.text())


@internal.get("/logs/raw")
async def get_raw_logs(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIM].log.raw())


@internal.patch("/logs/subscribe")
async def subscribe_logs(request: web.Request) -> web.Response:
    json_data = await request.json()   # a bad body is aiohttp's bare 500, as in ComfyUI
    log = request.app[SIM].log
    if json_data["enabled"]:
        log.subscriptions.add(json_data["clientId"])
    else:
        log.subscriptions.discard(json_data["clientId"])
    return web.Response(status=200)


def internal_app(sim: Sim) -> web.Application:
    """`/internal` is a sub-application in ComfyUI: no `/api` twin, and its own middleware-free app."""
    app = web.Application()
    app[SIM] = sim
    app.add_routes(internal)
    return app


def add_static_routes(app: web.Application, sim: Sim) -> None:
    """Custom node packs' scripts at `/extensions/<pack>/` and example workflows at
    `/api/workflow_templates/<pack>/` (ComfyUI serves that one only under /api)."""
    for name, folder in extension_dirs(sim).items():
        app.router.add_static("/extensions/" + name, folder)
    for pack in sorted(glob.glob(os.path.join(glob.escape(custom_nodes_dir(sim)), "*/"))):
        for folder in EXAMPLE_FOLDERS:
            if os.path.isdir(os.path.join(pack, folder)):
                app.router.add_static(f"/api/workflow_templates/{os.path.basename(pack.rstrip('/'))}",
                                      os.path.join(pack, folder))
                break  # one folder per pack: aiohttp refuses two static routes at one prefix
