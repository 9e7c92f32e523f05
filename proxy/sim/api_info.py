"""Information routes: object_info, system_stats, models, features and the like (comfyui-protocol.md §6)."""

from __future__ import annotations

import os
import sys

from aiohttp import web

from proxy.sim.state import SIM, Sim
from proxy.sim.templates import REQUIRED_TEMPLATES_VERSION, installed_templates_version

routes = web.RouteTableDef()

COMFYUI_VERSION = "0.3.75"
FRONTEND_VERSION = "1.32.9"
# folder_paths.folder_names_and_paths of ComfyUI 0.3.75, in its order (traces/info_routes.json /models).
MODEL_FOLDERS = ["checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision",
                 "style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "gligen",
                 "upscale_models", "latent_upscale_models", "custom_nodes", "hypernetworks", "photomaker",
                 "classifiers", "model_patches", "audio_encoders"]


def model_files(sim: Sim, folder: str) -> list[str]:
    return {"checkpoints": list(sim.options.checkpoints), "loras": list(sim.options.loras),
            "vae": list(sim.options.vaes)}.get(folder, [])


def _memory() -> tuple[int, int]:
    try:
        pages, free = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_AVPHYS_PAGES")
        size = os.sysconf("SC_PAGE_SIZE")
        return pages * size, free * size
    except (ValueError, OSError, AttributeError):
        return 0, 0


@routes.get("/system_stats")
async def system_stats(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    sim.polled += 1
    ram_total, ram_free = _memory()
    argv = ["main.py", "--listen", sim.options.host, "--port", str(sim.port or sim.options.port)]
    return web.json_response({
        "system": {
            "os": os.name, "ram_total": ram_total, "ram_free": ram_free, "comfyui_version": COMFYUI_VERSION,
            "required_frontend_version": FRONTEND_VERSION, "installed_templates_version": installed_templates_version(),
            "required_templates_version": REQUIRED_TEMPLATES_VERSION, "python_version": sys.version,
            "pytorch_version": "2.13.0+cu128", "embedded_python": False, "argv": argv,
        },
        "devices": [sim.gpu.device()],
    })


@routes.get("/object_info")
async def get_object_info(request: web.Request) -> web.Response:
    request.app[SIM].polled += 1
    return web.json_response(request.app[SIM].object_info())


@routes.get("/object_info/{node_class}")
async def get_object_info_node(request: web.Request) -> web.Response:
    info = request.app[SIM].object_info()
    node_class = request.match_info["node_class"]
    return web.json_response({node_class: info[node_class]} if node_class in info else {})


@routes.get("/features")
async def get_features(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIM].hub.server_features)


@routes.get("/embeddings")
async def get_embeddings(request: web.Request) -> web.Response:
    return web.json_response([])


@routes.get("/models")
async def list_model_types(request: web.Request) -> web.Response:
    return web.json_response(MODEL_FOLDERS)


@routes.get("/models/{folder}")
async def get_models(request: web.Request) -> web.Response:
    folder = request.match_info["folder"]
    if folder not in MODEL_FOLDERS:
        return web.Response(status=404)
    return web.json_response(model_files(request.app[SIM], folder))


@routes.get("/view_metadata/{folder_name}")
async def view_metadata(request: web.Request) -> web.Response:
    """A safetensors header's `__metadata__`; the simulated files carry a small made-up one."""
    sim = request.app[SIM]
    filename = request.rel_url.query.get("filename")
    folder = request.match_info["folder_name"]
    if not filename or not filename.endswith(".safetensors") or filename not in model_files(sim, folder):
        return web.Response(status=404)
    return web.json_response({"modelspec.title": filename.rsplit(".", 1)[0], "modelspec.sai_model_spec": "1.0.0",
                              "sim.backend": sim.options.name})
