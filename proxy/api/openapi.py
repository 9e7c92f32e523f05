"""The OpenAPI 3.1 document of every route the proxy serves, at `GET /proxy/openapi.json`.

ComfyUI's routes (each also under `/api`, as ComfyUI registers them) are described as the proxy answers
them: bodies, parameters, response shapes and ComfyUI's error shape
`{"error": {"type", "message", "details", "extra_info"}, "node_errors"}` where the proxy uses it (its
own refusals, `/prompt`); ComfyUI's bare-status answers (an empty 400 or 404) are bare here too.
The proxy's own routes (`/proxy/...`, `/metrics`) and the workflow-template API follow.

tests/test_fuzz.py checks that every route in `proxy.api.COMFY_ROUTES` and `PROXY_ROUTES` is described
here, and runs schemathesis against a live proxy from this document.
"""

from __future__ import annotations

import copy
from typing import Any

from aiohttp import web

from proxy.api.context import services
from proxy.config import WEBHOOK_EVENTS

Schema = dict[str, Any]

OBJECT: Schema = {"type": "object"}
STRING: Schema = {"type": "string"}
STRINGS: Schema = {"type": "array", "items": STRING}
ERROR_REF: Schema = {"$ref": "#/components/schemas/Error"}

SCHEMAS: dict[str, Schema] = {
    "Error": {"type": "object", "required": ["error", "node_errors"], "properties": {
        "error": {"type": "object", "required": ["type", "message", "details", "extra_info"], "properties": {
            "type": STRING, "message": STRING, "details": STRING, "extra_info": OBJECT}},
        "node_errors": OBJECT}},
    "QueueItem": {"type": "array", "description": "[number, prompt_id, prompt, extra_data, outputs_to_execute]",
                  "prefixItems": [{"type": "number"}, STRING, OBJECT, OBJECT, STRINGS], "minItems": 5},
    "HistoryEntry": {"type": "object", "required": ["prompt", "outputs", "status"], "properties": {
        "prompt": {"$ref": "#/components/schemas/QueueItem"},
        "outputs": {"type": "object", "additionalProperties": OBJECT},
        "status": {"type": "object", "properties": {
            "status_str": {"enum": ["success", "error"]}, "completed": {"type": "boolean"},
            "messages": {"type": "array", "items": {"type": "array"}}}},
        "meta": OBJECT}},
    "History": {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/HistoryEntry"}},
    "FileRef": {"type": "object", "required": ["name", "subfolder", "type"], "properties": {
        "name": STRING, "subfolder": STRING, "type": {"enum": ["input", "temp", "output"]}}},
    "Job": {"type": "object", "required": ["prompt_id", "status", "outputs"], "properties": {
        "prompt_id": STRING,
        "status": {"enum": ["queued", "running", "completed", "error", "interrupted"]},
        "progress": OBJECT,
        "outputs": {"type": "array", "items": {"type": "object", "properties": {
            "url": STRING, "filename": STRING, "subfolder": STRING, "type": STRING,
            "link": {**STRING, "description": "a signed URL anyone may fetch until outputs.link_ttl_s passes"}}}},
        "error": {"type": ["object", "null"]}, "webhook": {"$ref": "#/components/schemas/WebhookState"}}},
    "WebhookState": {"type": "object", "description": "the job's latest webhook delivery (jobs with a webhook)",
                     "properties": {"status": {"enum": ["pending", "delivered", "stopped", "failed"]},
                                    "attempts": {"type": "integer"}, "last_error": {"type": ["string", "null"]},
                                    "event": {"type": ["string", "null"]}}},
    "Delivery": {"type": "object", "required": ["id", "prompt_id", "event", "status"], "properties": {
        "id": {**STRING, "description": "the webhook-id every attempt carries"}, "prompt_id": STRING,
        "event": STRING, "tenant": STRING, "url": STRING,
        "status": {"enum": ["pending", "delivered", "stopped", "failed"]}, "attempts": {"type": "integer"},
        "last_error": {"type": ["string", "null"]}, "created_at": {"type": "number"},
        "last_attempt_at": {"type": ["number", "null"]}, "delivered_at": {"type": ["number", "null"]}}},
    "Member": {"type": "object", "required": ["name", "url", "source"], "properties": {
        "name": STRING, "url": STRING, "max_inflight": {"type": "integer"}, "weight": {"type": "number"},
        "labels": STRINGS, "min_vram_free_mb": {"type": "integer"},
        "source": {**STRING, "description": "api, config, join or dns:<name>"},
        "lease_until": {"type": ["number", "null"]}, "leaving": {"type": "boolean"}, "state": OBJECT}},
    "ComfyJob": {"type": "object", "required": ["id", "status"], "properties": {
        "id": STRING, "status": {"enum": ["pending", "in_progress", "completed", "failed", "cancelled"]},
        "priority": {"type": "number"}, "create_time": {"type": "integer"},
        "execution_start_time": {"type": "integer"}, "execution_end_time": {"type": "integer"},
        "execution_error": OBJECT, "outputs_count": {"type": "integer"},
        "previewable_outputs_count": {"type": "integer"}, "preview_output": OBJECT, "workflow_id": STRING,
        "outputs": OBJECT, "execution_status": OBJECT, "workflow": OBJECT,
        "webhook": {"$ref": "#/components/schemas/WebhookState"}}},
    "Backend": {"type": "object", "required": ["name", "url", "available", "circuit", "ejected"], "properties": {
        "name": STRING, "url": STRING, "available": {"type": "boolean"}, "healthy": {"type": "boolean"},
        "upstream_connected": {"type": "boolean"}, "draining": {"type": "boolean"},
        "queue_remaining": {"type": "integer"}, "inflight": {"type": "integer"},
        "circuit": {"enum": ["closed", "open", "half_open"]}, "consecutive_failures": {"type": "integer"},
        "circuit_retry_in_s": {"type": ["number", "null"]}, "ejected": {"type": "boolean"},
        "ejected_for_s": {"type": ["number", "null"]}}},
}


MEMBER_BODY: Schema = {"type": "object", "additionalProperties": False, "properties": {
    "url": STRING, "name": STRING, "labels": STRINGS,
    "max_inflight": {"type": "integer", "minimum": 1, "maximum": 1024},
    "weight": {"type": "number", "exclusiveMinimum": 0}, "min_vram_free_mb": {"type": "integer", "minimum": 0},
    "lease_s": {"type": "number", "minimum": 1, "maximum": 3600,
                "description": "a join agent's lease: renewed by PATCH, the backend is dead once it lapses"}}}
JOBS_ERROR: Schema = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
CANCELLED: Schema = {"type": "object", "required": ["cancelled"], "properties": {"cancelled": {"type": "boolean"}}}


def _json(schema: Schema, description: str = "JSON") -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> Schema:
    return _json(ERROR_REF, description)


def _bare(description: str) -> Schema:
    """ComfyUI's bare-status answers: an empty body (or a short text)."""
    return {"description": description}


def _query(name: str, schema: Schema, required: bool = False, description: str = "") -> Schema:
    out: Schema = {"name": name, "in": "query", "required": required, "schema": schema}
    if description:
        out["description"] = description
    return out


def _path(name: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": STRING}


def _body(schema: Schema, required: bool = False, media: str = "application/json") -> Schema:
    return {"required": required, "content": {media: {"schema": schema}}}


def _op(summary: str, responses: dict[str, Schema], *, params: list[Schema] | None = None,
        body: Schema | None = None, security: list[Schema] | None = None) -> Schema:
    """One operation; every authenticated route can also answer 401 (no or a wrong key)."""
    out: Schema = {"summary": summary, "responses": dict(responses)}
    if params:
        out["parameters"] = params
    if body is not None:
        out["requestBody"] = body
    if security is not None:
        out["security"] = security
    else:
        out["responses"].setdefault("401", _error("an API key is required and missing or wrong"))
    return out


OPEN: list[Schema] = []   # routes that need no key (probes, the page)

CONTROL_BODY: Schema = {"type": "object", "properties": {
    "clear": {"type": "boolean"}, "delete": {"type": "array", "items": STRING}}}
BAD_JSON = _bare("the body is not a JSON object (bare, as ComfyUI)")

PROMPT_BODY: Schema = {"type": "object", "properties": {
    "prompt": {"type": "object", "description": "API-format graph: {node_id: {class_type, inputs, _meta}}",
               "additionalProperties": {"type": "object", "properties": {
                   "class_type": STRING, "inputs": OBJECT, "_meta": OBJECT}}},
    "client_id": STRING, "prompt_id": STRING, "number": {"type": "number"}, "front": {"type": "boolean"},
    "extra_data": {"type": "object", "properties": {"webhook": {
        "type": "object", "required": ["url"],
        "description": "a receiver told of the job's events, signed per Standard Webhooks (the proxy's addition)",
        "properties": {"url": {**STRING, "maxLength": 2048, "description": "http(s); not loopback, private, "
                                                                           "link-local or metadata addresses"},
                       "events": {"type": "array", "minItems": 1, "items": {"enum": list(WEBHOOK_EVENTS)}}}}}},
    "partial_execution_targets": STRINGS}}

COMFY_PATHS: dict[str, dict[str, Schema]] = {
    "/prompt": {
        "post": _op("Queue a prompt (validated against the farm's merged object_info)", {
            "200": _json({"type": "object", "required": ["prompt_id", "number", "node_errors"], "properties": {
                "prompt_id": STRING, "number": {"type": "number"}, "node_errors": OBJECT}}, "queued"),
            "400": _error("no_prompt, invalid_prompt, prompt_no_outputs, prompt_outputs_failed_validation, "
                          "or a body that is not JSON"),
            "413": _error("payload_too_large"),
            "429": _error("quota_exceeded (with Retry-After)"),
            "503": _error("store_unavailable or no_backend_available")}, body=_body(PROMPT_BODY)),
        "get": _op("The caller's queue count", {"200": _json({"type": "object", "properties": {
            "exec_info": {"type": "object", "properties": {"queue_remaining": {"type": "integer"}}}}})}),
    },
    "/queue": {
        "get": _op("The caller's running and pending prompts", {"200": _json({"type": "object", "properties": {
            "queue_running": {"type": "array", "items": {"$ref": "#/components/schemas/QueueItem"}},
            "queue_pending": {"type": "array", "items": {"$ref": "#/components/schemas/QueueItem"}}}})}),
        "post": _op("Delete or clear the caller's pending prompts", {"200": _bare("done"), "400": BAD_JSON},
                    body=_body(CONTROL_BODY)),
    },
    "/interrupt": {"post": _op("Interrupt the caller's running prompt(s)", {"200": _bare("done"), "400": BAD_JSON},
                               body=_body({"type": "object", "properties": {"prompt_id": STRING}}))},
    "/free": {"post": _op("Unload models / free memory on every backend", {"200": _bare("done"), "400": BAD_JSON},
                          body=_body({"type": "object", "properties": {
                              "unload_models": {"type": "boolean"}, "free_memory": {"type": "boolean"}}}))},
    "/history": {
        "get": _op("The caller's finished prompts, oldest first", {"200": _json(
            {"$ref": "#/components/schemas/History"})}, params=[
            _query("max_items", {"type": "integer"}), _query("offset", {"type": "integer"})]),
        "post": _op("Delete or clear the caller's history", {"200": _bare("done"), "400": BAD_JSON},
                    body=_body(CONTROL_BODY)),
    },
    "/history/{prompt_id}": {"get": _op("One prompt's history entry, or {} when unknown", {"200": _json(
        {"$ref": "#/components/schemas/History"})}, params=[_path("prompt_id")])},
    "/api/jobs": {"get": _op("The caller's jobs (later ComfyUI's Jobs API): queued, running and finished", {
        "200": _json({"type": "object", "required": ["jobs", "pagination"], "properties": {
            "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/ComfyJob"}},
            "pagination": {"type": "object", "properties": {
                "offset": {"type": "integer"}, "limit": {"type": ["integer", "null"]},
                "total": {"type": "integer"}, "has_more": {"type": "boolean"}}}}}),
        "400": _json(JOBS_ERROR, "a bad status, sort_by, sort_order, limit or offset")}, params=[
        _query("status", STRING, description="comma-separated: pending, in_progress, completed, failed, cancelled"),
        _query("workflow_id", STRING), _query("sort_by", {"enum": ["created_at", "execution_duration"]}),
        _query("sort_order", {"enum": ["asc", "desc"]}), _query("limit", {"type": "integer", "minimum": 1}),
        _query("offset", {"type": "integer", "minimum": 0})])},
    "/api/jobs/{job_id}": {"get": _op("One job with its outputs, execution status and workflow", {
        "200": _json({"$ref": "#/components/schemas/ComfyJob"}),
        "404": _json(JOBS_ERROR, "no such job for this caller")}, params=[_path("job_id")])},
    "/api/jobs/{job_id}/cancel": {"post": _op("Interrupt the job if running, dequeue it if pending", {
        "200": _json(CANCELLED), "404": _json(JOBS_ERROR, "no such job for this caller")},
        params=[_path("job_id")])},
    "/api/jobs/{job_id}/events": {"get": _op("The job's messages as server-sent events, to its end", {
        "200": {"description": "`text/event-stream`: `id` (the message's number in the job; send it back as "
                               "Last-Event-ID to resume), `event` (ComfyUI's message type), `data` (its JSON)",
                "content": {"text/event-stream": {"schema": STRING}}},
        "404": _json(JOBS_ERROR, "no such job for this caller")}, params=[
        _path("job_id"), {"name": "Last-Event-ID", "in": "header", "required": False, "schema": STRING}])},
    "/api/jobs/cancel": {"post": _op("Cancel several of the caller's jobs", {
        "200": _json(CANCELLED), "400": _json(JOBS_ERROR, "job_ids missing or not a list of ids")},
        body=_body({"type": "object", "required": ["job_ids"], "properties": {
            "job_ids": {"type": "array", "items": STRING, "minItems": 1}}}, True))},
    "/view": {"get": _op("A file: an output by the reference in its name, or one of the caller's uploads", {
        "200": {"description": "the file, streamed", "content": {"*/*": {"schema": {
            "type": "string", "format": "binary"}}}},
        "400": _bare("a filename starting with / or containing .."),
        "403": _bare("a subfolder escaping its folder"),
        "404": _bare("no such file for this caller"),
        "502": _bare("the backend holding the file cannot be reached")}, params=[
        _query("filename", STRING, True, "may end with ' [output]', ' [input]' or ' [temp]'"),
        _query("subfolder", STRING), _query("type", {"enum": ["output", "input", "temp"]}),
        _query("preview", STRING, description="e.g. webp;90"), _query("channel", {"enum": ["rgba", "rgb", "a"]})])},
    "/upload/image": {"post": _op("Upload an image into the caller's own input/temp/output folder", {
        "200": _json({"$ref": "#/components/schemas/FileRef"}, "stored (renamed 'name (1).png' when taken)"),
        "400": _bare("no file, or a name or subfolder escaping its folder"),
        "413": _error("payload_too_large")}, body=_body({"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary"}, "overwrite": STRING, "subfolder": STRING,
            "type": {"enum": ["input", "temp", "output"]}}}, True, "multipart/form-data"))},
    "/upload/mask": {"post": _op("Upload a mask: its alpha applied to `original_ref`, saved under its name", {
        "200": _json({"$ref": "#/components/schemas/FileRef"}, "stored"),
        "400": _bare("no file, an original_ref that is not a JSON object, or a path escape"),
        "413": _error("payload_too_large")}, body=_body({"type": "object", "required": ["image", "original_ref"],
                                                         "properties": {
            "image": {"type": "string", "format": "binary"}, "original_ref": {
                "type": "string", "description": 'JSON: {"filename", "subfolder", "type"}'},
            "overwrite": STRING, "subfolder": STRING, "type": {"enum": ["input", "temp", "output"]}}},
            True, "multipart/form-data"))},
    "/view_metadata/{folder}": {"get": _op("A model file's safetensors metadata, from a backend that has it", {
        "200": _json(OBJECT), "404": _bare("no backend has the file or it has no metadata")},
        params=[_path("folder"), _query("filename", STRING)])},
    "/object_info": {"get": _op("Every node class any available backend offers (combo lists merged)",
                                {"200": _json(OBJECT)})},
    "/object_info/{node_class}": {"get": _op("One node class, or {}", {"200": _json(OBJECT)},
                                             params=[_path("node_class")])},
    "/system_stats": {"get": _op("The proxy's system and every backend's devices", {"200": _json(
        {"type": "object", "required": ["system", "devices"], "properties": {
            "system": OBJECT, "devices": {"type": "array", "items": OBJECT}}})})},
    "/models": {"get": _op("Model folder names over the farm", {"200": _json(STRINGS)})},
    "/models/{folder}": {"get": _op("Model files in a folder over the farm", {
        "200": _json(STRINGS), "404": _bare("no backend has the folder")}, params=[_path("folder")])},
    "/embeddings": {"get": _op("Embedding names over the farm", {"200": _json(STRINGS)})},
    "/extensions": {"get": _op("Frontend extension scripts over the farm", {"200": _json(STRINGS)})},
    "/features": {"get": _op("Server features", {"200": _json({"type": "object", "properties": {
        "supports_preview_metadata": {"type": "boolean"}, "max_upload_size": {"type": "integer"}}})})},
    "/ws": {"get": _op("The client websocket (ComfyUI's messages for the caller's prompts)", {
        "101": _bare("switching protocols"), "400": _bare("not a websocket upgrade request")}, params=[
        _query("clientId", STRING), _query("token", STRING, description="an API key (browsers cannot set headers)")])},
    "/": {"get": _op("The web frontend's page", {"200": {"description": "index.html", "content": {
        "text/html": {"schema": STRING}}}, "404": _bare("no frontend package installed")}, security=OPEN)},
    "/i18n": {"get": _op("Translations of the farm's custom nodes, merged", {"200": _json(OBJECT)})},
    "/workflow_templates": {"get": _op("Example workflows of custom node packs, merged", {
        "200": _json({"type": "object", "additionalProperties": STRINGS})})},
    "/global_subgraphs": {"get": _op("Blueprint subgraphs over the farm", {"200": _json(OBJECT)})},
    "/global_subgraphs/{id}": {"get": _op("One subgraph, or null", {"200": _json({})}, params=[_path("id")])},
    "/experiment/models": {"get": _op("Model folders over the farm", {"200": _json({"type": "array", "items": {
        "type": "object", "properties": {"name": STRING, "folders": STRINGS}}})})},
    "/experiment/models/{folder}": {"get": _op("Model files of a folder over the farm", {
        "200": _json({"type": "array", "items": OBJECT}), "404": _bare("no backend has the folder")},
        params=[_path("folder")])},
    "/experiment/models/preview/{path}": {"get": _op("A model's preview image from a backend that has it", {
        "200": {"description": "the image", "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
        "404": _bare("no backend has it")}, params=[_path("path")])},
    "/users": {
        "get": _op("User storage mode (each tenant is the one user of its own data)", {"200": _json(
            {"type": "object", "properties": {"storage": STRING, "migrated": {"type": "boolean"}}})}),
        "post": _op("Users are the proxy's tenants: always refused", {"400": _json(
            {"type": "object", "properties": {"error": STRING}})}, body=_body({"type": "object", "properties": {
                "username": STRING}})),
    },
    "/settings": {
        "get": _op("The caller's settings", {"200": _json(OBJECT)}),
        "post": _op("Merge settings", {"200": _bare("stored"), "400": _bare("not a JSON object")},
                    body=_body(OBJECT)),
    },
    "/settings/{id}": {
        "get": _op("One setting (null when unset)", {"200": _json({})}, params=[_path("id")]),
        "post": _op("Set one setting", {"200": _bare("stored"), "400": _bare("not JSON")}, params=[_path("id")],
                    body=_body({})),
    },
    "/userdata": {"get": _op("List the caller's user files in a folder", {
        "200": _json({"type": "array"}), "400": _bare("no dir"), "403": _bare("dir escapes the user folder"),
        "404": _bare("no such dir")}, params=[
        _query("dir", STRING, True), _query("recurse", STRING), _query("full_info", STRING),
        _query("split", STRING)])},
    "/v2/userdata": {"get": _op("List the caller's user files (v2 shape)", {
        "200": _json({"type": "array", "items": OBJECT}), "400": _bare("bad path"), "404": _bare("not found")},
        params=[_query("path", STRING)])},
    "/userdata/{file}": {
        "get": _op("One user file", {"200": {"description": "the file", "content": {"*/*": {"schema": {
            "type": "string", "format": "binary"}}}}, "400": _bare("bad name"), "403": _bare("escapes"),
            "404": _bare("not found")}, params=[_path("file")]),
        "post": _op("Write a user file (the body is its content)", {
            "200": _json({}, "the path, or its info with full_info=true"), "400": _bare("bad name"),
            "403": _bare("escapes"), "409": _bare("exists and overwrite=false")},
            params=[_path("file"), _query("overwrite", STRING), _query("full_info", STRING)],
            body=_body({"type": "string", "format": "binary"}, media="application/octet-stream")),
        "delete": _op("Delete a user file", {"204": _bare("deleted"), "400": _bare("bad name"),
                                              "403": _bare("escapes"), "404": _bare("not found")},
                      params=[_path("file")]),
    },
    "/userdata/{file}/move/{dest}": {"post": _op("Move a user file", {
        "200": _json({}), "400": _bare("bad name"), "403": _bare("escapes"), "404": _bare("not found"),
        "409": _bare("destination exists and overwrite=false")}, params=[
        _path("file"), _path("dest"), _query("overwrite", STRING), _query("full_info", STRING)])},
}

ADMIN_403 = _error("forbidden: the tenant is not an admin")

FILE = {"200": {"description": "the file", "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
        "404": _bare("not found")}

# Served as ComfyUI serves them: static folders and its `/internal` sub-app, with no `/api` twin.
STATIC_PATHS: dict[str, dict[str, Schema]] = {
    "/extensions/{path}": {"get": _op("A frontend extension script (the proxy's own, or a pack's from a backend)",
                                      FILE, params=[_path("path")])},
    "/templates/{path}": {"get": _op("A workflow-template package file from a backend", FILE,
                                     params=[_path("path")])},
    "/docs/{path}": {"get": _op("An embedded-docs package file from a backend", FILE, params=[_path("path")])},
    "/api/workflow_templates/{path}": {"get": _op("A custom node pack's example workflow from a backend", FILE,
                                                  params=[_path("path")])},
    "/internal/folder_paths": {"get": _op("Model folder paths over the farm", {"200": _json(OBJECT)})},
    "/internal/files/{directory_type}": {"get": _op("The caller's own uploads of that type, newest first", {
        "200": _json(STRINGS), "400": _json({"type": "object", "properties": {"error": STRING}}, "bad type")},
        params=[{"name": "directory_type", "in": "path", "required": True,
                 "schema": {"enum": ["input", "temp", "output"]}}])},
    "/internal/logs": {"get": _op("The farm's console logs as one text, lines prefixed by backend (admins)", {
        "200": _json(STRING), "403": _error("forbidden")})},
    "/internal/logs/raw": {"get": _op("The farm's console log entries by time, prefixed by backend (admins)", {
        "200": _json({"type": "object", "required": ["entries", "size"], "properties": {
            "entries": {"type": "array", "items": {"type": "object", "properties": {"t": STRING, "m": STRING}}},
            "size": OBJECT}}),
        "403": _error("forbidden")})},
    "/internal/logs/subscribe": {"patch": _op("Push new console lines to a socket as `logs` messages (admins)", {
        "200": _bare("done"), "400": _error("bad_request: clientId and enabled needed"), "403": _error("forbidden")},
        body=_body({"type": "object", "required": ["clientId", "enabled"], "properties": {
            "clientId": STRING, "enabled": {"type": "boolean"}}}))},
}

PROXY_PATHS: dict[str, dict[str, Schema]] = {
    "/proxy/healthz": {"get": _op("Liveness: the process serves", {"200": _json(OBJECT)}, security=OPEN)},
    "/proxy/readyz": {"get": _op("Readiness: the store answers and a backend is available", {
        "200": _json(OBJECT), "503": _json(OBJECT, "not ready, with the problems")}, security=OPEN)},
    "/proxy/backends": {"get": _op("Each backend's state, health (circuit, ejection), load and devices", {
        "200": _json({"type": "object", "properties": {"backends": {
            "type": "array", "items": {"$ref": "#/components/schemas/Backend"}}}}), "403": ADMIN_403}),
        "post": _op("Add a backend to the farm, shared by every replica (admin, or a join token)", {
            "200": _json({"$ref": "#/components/schemas/Member"}, "it was there already (re-registered)"),
            "201": _json({"$ref": "#/components/schemas/Member"}, "added"),
            "400": _error("invalid_backend, or backend_exists (the name has another URL)"), "403": ADMIN_403},
            body=_body({**MEMBER_BODY, "required": ["url"]}, True))},
    "/proxy/backends/{name}": {
        "get": _op("One backend: its membership entry and state (admin, or the join token that added it)", {
            "200": _json({"$ref": "#/components/schemas/Member"}), "403": ADMIN_403,
            "404": _error("no such backend")}, params=[_path("name")]),
        "patch": _op("Change a backend's settings, or renew a join agent's lease", {
            "200": _json({"$ref": "#/components/schemas/Member"}), "400": _error("invalid_backend"),
            "403": ADMIN_403, "404": _error("no such backend")}, params=[_path("name")],
            body=_body(MEMBER_BODY, True)),
        "delete": _op("Remove a backend: drained, then forgotten once idle (202); ?force=1: at once, its "
                      "prompts back in the queue (200)", {
            "200": _json({"$ref": "#/components/schemas/Member"}),
            "202": _json({"$ref": "#/components/schemas/Member"}), "403": ADMIN_403, "404": _error("no such backend")},
            params=[_path("name"), _query("force", {"enum": ["1", "true"]})])},
    "/proxy/backends/{name}/drain": {"post": _op("Stop sending new prompts to a backend", {
        "200": _json({"$ref": "#/components/schemas/Backend"}), "403": ADMIN_403,
        "404": _error("no such backend")}, params=[_path("name")])},
    "/proxy/backends/{name}/undrain": {"post": _op("Send new prompts to a backend again", {
        "200": _json({"$ref": "#/components/schemas/Backend"}), "403": ADMIN_403,
        "404": _error("no such backend")}, params=[_path("name")])},
    "/proxy/reload": {"post": _op("Read the config file again and apply its backends", {
        "200": _json(OBJECT), "400": _error("no config file, or an invalid one"), "403": ADMIN_403})},
    "/proxy/workflows": {"get": _op("List workflow templates", {"200": _json({"type": "object", "properties": {
        "workflows": {"type": "array", "items": OBJECT}}})})},
    "/proxy/workflows/{name}": {"get": _op("A template's inputs as a JSON Schema", {
        "200": _json(OBJECT, "the template"), "404": _error("no such template")}, params=[_path("name")])},
    "/proxy/workflows/{name}/run": {"post": _op("Queue a run of a template with named inputs", {
        "200": _json({"type": "object", "properties": {"prompt_id": STRING, "number": {"type": "number"}}},
                     "queued"),
        "400": _error("a missing, mistyped or out-of-range input, or a refused prompt"),
        "404": _error("no such template"), "429": _error("quota_exceeded")}, params=[_path("name")],
        body=_body({"type": "object", "properties": {"inputs": OBJECT, "client_id": STRING}}, True))},
    "/proxy/jobs/{prompt_id}": {"get": _op("A run's status, progress and output URLs", {
        "200": _json({"$ref": "#/components/schemas/Job"}), "404": _error("no such job")},
        params=[_path("prompt_id")])},
    "/proxy/files/{ref}/{name}": {"get": _op("A signed link to one output file (no key needed until it expires)", {
        "200": {"description": "the file, streamed (Range: 206; If-None-Match: 304)", "content": {"*/*": {
            "schema": {"type": "string", "format": "binary"}}}},
        "403": _error("forbidden: the link was altered or has expired"),
        "404": _error("not_found: the file is no longer kept")},
        params=[_path("ref"), _path("name"), _query("tenant", STRING, True), _query("expires", STRING, True),
                _query("signature", STRING, True)], security=OPEN)},
    "/proxy/run": {"post": _op("Run a prompt and wait for its end: the finished job, or 202 and where to follow it", {
        "200": _json({"$ref": "#/components/schemas/ComfyJob"},
                     "the finished job; each output file with a signed `link` (and `data`, base64, with inline)"),
        "202": _json({"$ref": "#/components/schemas/ComfyJob"}, "not done within wait_s: follow Location"),
        "400": _error("invalid_prompt (a bad wait_s) or ComfyUI's own refusal of the prompt"),
        "429": _error("quota_exceeded"), "503": _error("no_backend_available")},
        params=[_query("inline", {"enum": ["1", "true"]}, description="outputs up to jobs.inline_max_bytes inline")],
        body=_body({"type": "object", "required": ["prompt"], "properties": {
            "prompt": OBJECT, "client_id": STRING, "extra_data": OBJECT, "prompt_id": STRING,
            "wait_s": {"type": "number", "minimum": 0, "maximum": 300, "default": 60}}}, True))},
    "/proxy/webhooks/failed": {"get": _op("Webhook deliveries given up, the latest first (admin)", {
        "200": _json({"type": "object", "properties": {"deliveries": {
            "type": "array", "items": {"$ref": "#/components/schemas/Delivery"}}}}),
        "400": _error("limit is not 1..1000"), "403": ADMIN_403},
        params=[_query("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100})])},
    "/proxy/webhooks/{delivery_id}/redeliver": {"post": _op("Deliver a given-up webhook delivery again (admin)", {
        "200": _json({"$ref": "#/components/schemas/Delivery"}, "back in the outbox, due now, same webhook-id"),
        "403": ADMIN_403, "404": _error("no failed delivery with that id")}, params=[_path("delivery_id")])},
    "/proxy/openapi.json": {"get": _op("This document", {"200": _json(OBJECT)})},
    "/proxy/": {"get": _op("The operator page: backends, the queue by tenant, the latest jobs (its tables "
                           "come from /proxy/ui/farm with an admin key)", {
        "200": {"description": "HTML", "content": {"text/html": {"schema": STRING}}}}, security=OPEN)},
    "/proxy/ui/farm": {"get": _op("The operator page's tables, rendered (admin)", {
        "200": {"description": "an HTML fragment", "content": {"text/html": {"schema": STRING}}},
        "403": ADMIN_403})},
    "/metrics": {"get": _op("Prometheus metrics (auth.metrics_token, when set, as a bearer token)", {
        "200": {"description": "text exposition", "content": {"text/plain": {"schema": STRING}}},
        "401": _error("the metrics token is missing or wrong")}, security=[{"bearer": []}, {}])},
}


COMFYAPI_ERROR = _json({"allOf": [ERROR_REF, {"type": "object", "required": ["detail"], "properties": {
    "detail": STRING}}]}, "FastAPI's `detail`, with ComfyUI's error beside it")


def _comfyapi_error(description: str) -> Schema:
    return {**COMFYAPI_ERROR, "description": description}


COMFYAPI_INPUT = {"type": "object", "required": ["node_id", "value"], "properties": {
    "node_id": {**STRING, "description": "a node id, or the name of an input the template marks"},
    "input": {**STRING, "description": "which of the node's inputs (when it has several)"},
    "value": {"description": "the value; for an image input a file name, an http(s) URL or a data: URL"}}}
_WORKFLOW_LIST = {"get": _op("ComfyAPI: the workflow ids", {"200": _json({"type": "array", "items": STRING})})}
COMFYAPI_PATHS: dict[str, dict[str, Schema]] = {
    "/workflows/": _WORKFLOW_LIST,
    "/workflows": _WORKFLOW_LIST,
    "/workflows/{workflow_id}": {"get": _op("ComfyAPI: a workflow's descriptor (every input by node id, outputs)", {
        "200": _json(OBJECT, "workflow_id, workflow_json, nodes, edges, source_ids, sink_ids, "
                             "external_parameters, inputs, outputs"),
        "404": _comfyapi_error("no such workflow"),
        "422": _comfyapi_error("an editor-format workflow this farm's nodes cannot convert"),
        "503": _comfyapi_error("no node definitions yet to convert an editor-format workflow")},
        params=[_path("workflow_id")])},
    "/workflows/{workflow_id}/queue": {"post": _op("ComfyAPI: queue a run; its progress and result go to the socket", {
        "200": _json({"type": "object", "properties": {"request_id": STRING, "prompt_id": STRING,
                                                       "number": {"type": "number"}}}, "queued"),
        "400": _comfyapi_error("an unknown or expired websocket_cid, a bad input, a refused image URL or prompt"),
        "404": _comfyapi_error("no such workflow"), "422": _comfyapi_error("an unconvertible workflow"),
        "429": _comfyapi_error("quota_exceeded")},
        params=[_path("workflow_id"), _query("websocket_cid", STRING, description="when the body is the list")],
        body=_body({"oneOf": [{"type": "object", "required": ["websocket_cid"], "properties": {
            "websocket_cid": STRING, "inputs": {"type": "array", "items": COMFYAPI_INPUT}}},
            {"type": "array", "items": COMFYAPI_INPUT}]}, True))},
    "/ws/register": {"get": _op("ComfyAPI: a websocket that answers its websocket_cid, then its runs' messages", {
        "101": _bare("switching protocols"), "400": _bare("not a websocket upgrade request")}, params=[
        _query("images", {"enum": ["binary"]}, description="each result image as a binary frame"),
        _query("token", STRING, description="an API key (browsers cannot set headers)")])},
}


def document() -> Schema:
    """The whole document; ComfyUI's routes appear at their path and under `/api`, as they are served."""
    paths: dict[str, dict[str, Schema]] = {}
    for path, ops in COMFY_PATHS.items():
        for prefix in ("", "/api"):
            twin = paths.setdefault(prefix + path, {})
            for method, op in ops.items():
                twin[method] = {**copy.deepcopy(op), "operationId": _operation_id(method, prefix + path)}
    for path, ops in (*STATIC_PATHS.items(), *PROXY_PATHS.items(), *COMFYAPI_PATHS.items()):
        paths[path] = {method: {**op, "operationId": _operation_id(method, path)} for method, op in ops.items()}
    return {
        "openapi": "3.1.0",
        "info": {"title": "comfy-farm-proxy", "version": "1",
                 "description": "ComfyUI's HTTP API in front of a farm of ComfyUI backends, the proxy's "
                                "operator routes, the workflow-template API and ComfyAPI's routes (`/workflows/`, "
                                "`/ws/register`). Errors use ComfyUI's shape (ComfyAPI's add FastAPI's `detail`)."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
            "schemas": SCHEMAS},
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": paths,
    }


def _operation_id(method: str, path: str) -> str:
    words = [w.strip("{}") for w in path.replace(".", "_").split("/") if w]
    return method + "_" + "_".join(words) + ("_" if path.endswith("/") and len(path) > 1 else "")


OPENAPI = document()


async def openapi(request: web.Request) -> web.Response:
    """The document; with `server.public_url` set, that is its `servers` entry (how clients reach the
    proxy, behind an ingress perhaps under a prefix). Without, OpenAPI's default: the document's own host."""
    public_url = services(request).config.server.public_url
    return web.json_response({**OPENAPI, "servers": [{"url": public_url.rstrip("/")}]} if public_url else OPENAPI)
