"""Admission: check a `POST /prompt` body the way ComfyUI would, record the prompt and enqueue it.

The body is validated against the merged `/object_info` of the farm, so a bad workflow gets ComfyUI's
400 with `node_errors` at once instead of an error event later. Invalid JSON, which ComfyUI answers with
a bare 500 (traces/validation_errors.json `invalid_json`), gets a 400 in ComfyUI's error shape.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from proxy import jsoncodec
from proxy.backends import BackendState
from proxy.capability import Combos, combo_values, offers
from proxy.comfy.validation import validate_prompt
from proxy.errors import BadRequest, NoBackendAvailable, PromptRejected, QuotaExceeded
from proxy.store import DuplicatePrompt, PromptRecord, Store
from proxy.store.base import Admission, QuotaRefused
from proxy.tenancy import ANONYMOUS_IDENTITY, Identity

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Admitted:
    record: PromptRecord
    node_errors: dict[str, Any]
    active: int = 0   # the tenant's prompts queued, at backends or running, this one included

    def answer(self) -> dict[str, Any]:
        return {"prompt_id": self.record.prompt_id, "number": self.record.number, "node_errors": self.node_errors}


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = jsoncodec.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("invalid_prompt", "Invalid JSON in request body", str(exc)) from exc
    if isinstance(body, (list, str)) and "prompt" not in body:
        # ComfyUI tests `"prompt" in json_data`, which a list or a string answers too: no_prompt, as it says.
        raise BadRequest("no_prompt", "No prompt provided", "No prompt provided")
    if not isinstance(body, dict):
        raise BadRequest("invalid_prompt", "Request body must be a JSON object", type(body).__name__)
    return body


UploadExists = Callable[[str], bool]


def _image_exists(options: list[Any], uploaded: UploadExists) -> Any:
    """LoadImage's own check (ComfyUI's VALIDATE_INPUTS): the file must exist — on a backend already,
    or among the tenant's uploads, which the proxy copies to the backend at dispatch."""
    known = set(options)

    def check(class_type: str, inputs: dict[str, Any]) -> str | bool:
        name = inputs.get("image")
        if name in known or (isinstance(name, str) and uploaded(name)):
            return True
        return f"Invalid image file: {name}"
    return check


def custom_checks(object_info: Mapping[str, Any], uploaded: UploadExists) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    for cls in ("LoadImage", "LoadImageMask"):
        spec = object_info.get(cls, {}).get("input", {}).get("required", {}).get("image")
        if isinstance(spec, list) and spec:
            options = spec[0] if isinstance(spec[0], list) else (spec[1] or {}).get("options", [])
            checks[cls] = (("image",), _image_exists(options, uploaded))
    return checks


def _check_one_backend_can_run(prompt: dict[str, Any], targets: list[str] | None,
                               backends: list[tuple[BackendState, Mapping[str, Any]]], checks: dict[str, Any],
                               combos: Combos) -> None:
    """The merged farm may offer every class and file while no single backend does (a checkpoint only on
    A, a node class only on B, or a backend pool without them): refuse at once, with ComfyUI's 400 as
    the backend closest to running it would give it, instead of leaving the prompt to rot in the queue."""
    classes = {str(n.get("class_type")) for n in prompt.values() if isinstance(n, dict)}
    wanted = combo_values(prompt, combos)
    if any(classes <= state.node_classes and offers(state.combos, wanted) for state, _ in backends):
        return
    results = [validate_prompt(copy.deepcopy(prompt), info, targets, checks) for _, info in backends]
    failed = [r for r in results if not r.ok]
    if not failed:
        raise NoBackendAvailable("No backend can run this prompt", "its node classes or model files are "
                                 "spread over backends that cannot run it alone, or outside your pools")
    best = min(failed, key=lambda r: sum(len(e.get("errors", [])) for e in r.node_errors.values()) or 1)
    assert best.error is not None
    raise PromptRejected(best.error, best.node_errors)


QUOTA_MESSAGES = {
    "max_queued": "Too many prompts queued or running: at most {max_queued}",
    "per_minute": "Too many prompts this minute: at most {per_minute}",
    "per_day": "Too many prompts today: at most {per_day}",
    "gpu_seconds_per_day": "GPU time used up for today: at most {gpu_seconds_per_day} s",
    "storage_mb": "Stored outputs take more than {storage_mb} MB",
}
STORAGE_RETRY_S = 60   # outputs leave the store only as their retention ends: a guess, said as one


def quota_error(who: Identity, refused: QuotaRefused) -> QuotaExceeded:
    limits = who.quota
    message = QUOTA_MESSAGES[refused.limit].format(**vars(limits))
    when = {"max_queued": "when one of your prompts ends",
            "storage_mb": "as your oldest outputs expire"}.get(refused.limit, f"in {refused.retry_after} s")
    return QuotaExceeded(f"Quota exceeded ({refused.limit})", f"{message}; it frees {when}.",
                         extra_info={"limit": refused.limit, "retry_after": refused.retry_after},
                         headers={"Retry-After": str(refused.retry_after)})


def _read_envelope(body: dict[str, Any]) -> tuple[float | None, dict[str, Any], list[Any] | None]:
    """The fields around the graph, checked as ComfyUI reads them: `number`, `extra_data`, and
    `partial_execution_targets`."""
    if "prompt" not in body:
        raise BadRequest("no_prompt", "No prompt provided", "No prompt provided")
    number: float | None = None
    if "number" in body:
        try:
            number = float(body["number"])
        except (TypeError, ValueError) as exc:
            raise BadRequest("invalid_prompt", "number must be a number", repr(body["number"])) from exc
    extra_data = body.get("extra_data", {})
    if not isinstance(extra_data, dict):
        raise BadRequest("invalid_prompt", "extra_data must be an object", type(extra_data).__name__)
    targets = body.get("partial_execution_targets")
    if targets is not None and not isinstance(targets, list):
        raise BadRequest("invalid_prompt", "partial_execution_targets must be a list", type(targets).__name__)
    return number, extra_data, targets


async def admit(body: dict[str, Any], *, store: Store, object_info: Mapping[str, Any],
                who: Identity = ANONYMOUS_IDENTITY, uploaded: UploadExists = lambda name: False,
                backends: list[tuple[BackendState, Mapping[str, Any]]] | None = None,
                combos: Combos | None = None, idle_credit: float = 0.0,
                webhook: dict[str, Any] | None = None) -> Admitted:
    """Validate and enqueue; raises a ComfyUI-shaped error for every refusal."""
    number, extra_data, targets = _read_envelope(body)
    if not object_info:
        raise NoBackendAvailable("No backend is available to validate and run prompts",
                                 "every backend is down, draining or not yet polled")
    checks = custom_checks(object_info, uploaded)
    result = validate_prompt(body["prompt"], object_info, targets, checks)
    if not result.ok:
        assert result.error is not None
        raise PromptRejected(result.error, result.node_errors)
    if backends is not None:
        _check_one_backend_can_run(body["prompt"], targets, backends, checks, combos or {})
    client_id = body.get("client_id")
    extra = dict(extra_data)
    if client_id is not None:
        client_id = str(client_id)
        extra["client_id"] = client_id
    extra["create_time"] = int(time.time() * 1000)
    record = PromptRecord(
        prompt_id=str(body.get("prompt_id") or uuid.uuid4()),
        prompt=body["prompt"],
        extra_data=extra,
        outputs_to_execute=result.outputs,
        client_id=client_id,
        tenant=who.tenant,
        created_at=time.time(),
        webhook=webhook,
    )
    q = who.quota
    if q.storage_mb is not None and (await store.storage_used()).get(who.tenant, 0) > q.storage_mb * 1024 * 1024:
        raise quota_error(who, QuotaRefused("storage_mb", STORAGE_RETRY_S))
    admission = Admission(weight=who.weight, credit=idle_credit, max_queued=q.max_queued, per_minute=q.per_minute,
                          per_day=q.per_day, gpu_seconds_per_day=q.gpu_seconds_per_day, now=record.created_at)
    try:
        active = await store.admit(record, admission, number=number,
                                   front=bool(body.get("front")) and number is None)
    except QuotaRefused as refused:
        raise quota_error(who, refused) from None
    except DuplicatePrompt as exc:
        raise BadRequest("invalid_prompt", "A prompt with this prompt_id already exists",
                         record.prompt_id) from exc
    log.info("prompt_admitted", prompt_id=record.prompt_id, tenant=who.tenant, number=record.number)
    return Admitted(record, result.node_errors, active)
