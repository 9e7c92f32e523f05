"""Prompt, queue and history routes, as ComfyUI 0.3.75's server.py has them.

Errors are ComfyUI's: bare empty 200s, and an exception in a handler (invalid JSON to `POST /prompt`,
a non-integer `max_items`) left to aiohttp's plain-text 500 (traces/validation_errors.json `invalid_json`).
"""

from __future__ import annotations

import copy
import os
import time
import uuid
from typing import Any

from aiohttp import web

from proxy.comfy.validation import ValidationResult, validate_prompt
from proxy.sim.state import SIM, Sim

routes = web.RouteTableDef()

SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
MODEL_INPUTS = {"CheckpointLoaderSimple": "ckpt_name", "LoraLoader": "lora_name", "VAELoader": "vae_name"}


def image_check(sim: Sim) -> Any:
    """LoadImage's VALIDATE_INPUTS: the file must exist in input/ (or where its annotation points)."""
    def check(class_type: str, inputs: dict[str, Any]) -> str | bool:
        name = inputs["image"]
        filename, folder = sim.paths.annotated(name)  # a linked (None) image fails here, as in ComfyUI
        if not os.path.exists(os.path.join(folder or sim.paths.input, filename)):
            return f"Invalid image file: {name}"
        return True
    return check


def validate(sim: Sim, prompt: Any, targets: list[str] | None) -> ValidationResult:
    check = image_check(sim)
    checks = {"LoadImage": (("image",), check), "LoadImageMask": (("image",), check)}
    info = sim.object_info()
    if sim.faults.reject_prompts:
        return _rejected(prompt, info, targets, checks)
    return validate_prompt(prompt, info, targets, checks)


def _rejected(prompt: Any, info: dict[str, Any], targets: list[str] | None, checks: Any) -> ValidationResult:
    """The `reject_prompts` fault: validate as if this backend had no model files at all."""
    info = copy.deepcopy(info)   # the simulator's object_info is shared
    for class_type, input_name in MODEL_INPUTS.items():
        if class_type in info:
            info[class_type]["input"]["required"][input_name][0] = []
    result = validate_prompt(prompt, info, targets, checks)
    if not result.ok:
        return result
    error = {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
             "details": "", "extra_info": {}}
    reason = {"type": "value_not_in_list", "message": "Value not in list",
              "details": "ckpt_name: 'model.safetensors' not in []",
              "extra_info": {"input_name": "ckpt_name", "input_config": None, "received_value": "model.safetensors"}}
    node_errors = {o: {"errors": [reason], "dependent_outputs": [o], "class_type": prompt[o]["class_type"]}
                   for o in result.outputs}
    return ValidationResult(False, error, [], node_errors)


@routes.get("/prompt")
async def get_prompt(request: web.Request) -> web.Response:
    request.app[SIM].polled += 1
    return web.json_response(request.app[SIM].queue_info())


@routes.post("/prompt")
async def post_prompt(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    sim.log.info("got prompt")
    json_data = await request.json()  # invalid JSON: aiohttp's bare 500, as ComfyUI
    if "number" in json_data:
        number: float = float(json_data["number"])
    else:
        number = sim.number
        if "front" in json_data and json_data["front"]:
            number = -number
        sim.number += 1
    if "prompt" not in json_data:
        error = {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided",
                 "extra_info": {}}
        return web.json_response({"error": error, "node_errors": {}}, status=400)
    prompt = json_data["prompt"]
    prompt_id = str(json_data.get("prompt_id", uuid.uuid4()))
    valid = validate(sim, prompt, json_data.get("partial_execution_targets"))
    extra_data = json_data.get("extra_data", {})
    if "client_id" in json_data:
        extra_data["client_id"] = json_data["client_id"]
    if not valid.ok:
        sim.log.info(f"invalid prompt: {valid.error}")
        return web.json_response({"error": valid.error, "node_errors": valid.node_errors}, status=400)
    sensitive = {key: extra_data.pop(key) for key in SENSITIVE_EXTRA_DATA_KEYS if key in extra_data}
    extra_data["create_time"] = int(time.time() * 1000)
    sim.queue.put(number=number, prompt_id=prompt_id, prompt=prompt, extra_data=extra_data, outputs=valid.outputs,
                  sensitive=sensitive)
    sim.accepted += 1
    return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": valid.node_errors})


@routes.get("/queue")
async def get_queue(request: web.Request) -> web.Response:
    queue = request.app[SIM].queue
    return web.json_response({"queue_running": [item.as_list() for item in queue.running()],
                              "queue_pending": [item.as_list() for item in queue.queue]})


@routes.post("/queue")
async def post_queue(request: web.Request) -> web.Response:
    queue = request.app[SIM].queue
    json_data = await request.json()
    if "clear" in json_data and json_data["clear"]:
        queue.wipe_queue()
    for prompt_id in json_data.get("delete", []) if "delete" in json_data else []:
        queue.delete_queue_item(prompt_id)
    return web.Response(status=200)


@routes.post("/interrupt")
async def post_interrupt(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    try:
        json_data = await request.json()
    except ValueError:
        json_data = {}
    prompt_id = json_data.get("prompt_id")
    if not prompt_id or any(item.prompt_id == prompt_id for item in sim.queue.running()):
        sim.executor.interrupt()  # with a prompt_id, only when that prompt is the one running
    return web.Response(status=200)


@routes.post("/free")
async def post_free(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    json_data = await request.json()
    for flag in ("unload_models", "free_memory"):
        if json_data.get(flag, False):
            sim.queue.set_flag(flag, json_data[flag])
    return web.Response(status=200)


@routes.get("/history")
async def get_history(request: web.Request) -> web.Response:
    query = request.rel_url.query
    max_items = int(query["max_items"]) if "max_items" in query else None
    offset = int(query["offset"]) if "offset" in query else -1
    return web.json_response(request.app[SIM].queue.get_history(max_items=max_items, offset=offset))


@routes.get("/history/{prompt_id}")
async def get_history_prompt(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIM].queue.get_history(prompt_id=request.match_info["prompt_id"]))


@routes.post("/history")
async def post_history(request: web.Request) -> web.Response:
    queue = request.app[SIM].queue
    json_data = await request.json()
    if "clear" in json_data and json_data["clear"]:
        queue.wipe_history()
    for prompt_id in json_data.get("delete", []) if "delete" in json_data else []:
        queue.delete_history_item(prompt_id)
    return web.Response(status=200)
