"""One job model over the proxy's prompt records: ComfyUI's Jobs API (`/api/jobs`, later ComfyUI,
protocol §17) served over the whole farm, whatever ComfyUI version the backends run.

A job is a prompt as later ComfyUI's `comfy_execution/jobs.py` describes it: `pending` (in the proxy's
queue or waiting at a backend), `in_progress` (the backend sent `execution_start`), then `completed`,
`failed` or `cancelled` (an interrupted run) from its history entry. Keys without a value are left out,
as ComfyUI prunes them; a job still queued has no outputs and no execution times.
"""

from __future__ import annotations

from typing import Any

from proxy.relay.router import prompt_item
from proxy.store import FINISHED, RUNNING, PromptRecord
from proxy.webhooks.subscription import ended_as

PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = "pending", "in_progress", "completed", "failed", "cancelled"
STATUSES = (PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED)
SORT_BY = ("created_at", "execution_duration")
SORT_ORDER = ("asc", "desc")
TERMINAL = ("execution_success", "execution_error", "execution_interrupted")
# ComfyUI's previewable media: these keys of a node's ui output, or a file whose format or name says so
PREVIEWABLE_KEYS = frozenset({"images", "video", "audio", "3d", "text"})
PREVIEWABLE_SUFFIXES = (".obj", ".fbx", ".gltf", ".glb", ".usdz", ".txt", ".md", ".json")
TEXT_SUFFIXES = (".txt", ".md", ".json")


def _pruned(job: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in job.items() if value is not None}


def _metadata(rec: PromptRecord) -> tuple[Any, Any]:
    """(create_time, workflow_id) from extra_data, as ComfyUI reads them."""
    extra = rec.extra_data or {}
    pnginfo = extra.get("extra_pnginfo")
    workflow = pnginfo.get("workflow") if isinstance(pnginfo, dict) else None
    return extra.get("create_time"), workflow.get("id") if isinstance(workflow, dict) else None


def run_error(history: dict[str, Any]) -> dict[str, Any] | None:
    """Why a run did not succeed, from its history: its `execution_error` or `execution_interrupted`
    message as `{"type", …data}`, or None."""
    found = None
    for event, data in (history.get("status") or {}).get("messages", []):
        if event in ("execution_error", "execution_interrupted") and isinstance(data, dict):
            found = {"type": event, **data}
    return found


def status_of(rec: PromptRecord) -> str:
    if rec.state != FINISHED or rec.history is None:
        return IN_PROGRESS if rec.state == RUNNING else PENDING
    return ended_as(rec.history)


def _previewable(key: str, item: dict[str, Any]) -> bool:
    fmt = str(item.get("format") or "")
    name = str(item.get("filename") or "").lower()
    return key in PREVIEWABLE_KEYS or fmt.startswith(("video/", "audio/")) or name.endswith(PREVIEWABLE_SUFFIXES)


def outputs_summary(outputs: dict[str, Any]) -> tuple[int, int, dict[str, Any] | None]:
    """(outputs_count, previewable_outputs_count, preview_output): saved visual media first, then other
    previewable media (temp previews), then text files, as ComfyUI's frontend picks the preview."""
    count = previewable = 0
    picks: dict[str, dict[str, Any]] = {}
    for node_id, ui in outputs.items():
        for key, items in (ui.items() if isinstance(ui, dict) else ()):
            if key == "animated" or not isinstance(items, list):
                continue
            for item in items:
                if not isinstance(item, dict):
                    continue
                count += 1
                if not _previewable(key, item):
                    continue
                previewable += 1
                rank = ("text" if key == "text" or str(item.get("filename", "")).lower().endswith(TEXT_SUFFIXES)
                        else "saved" if item.get("type") == "output" else "other")
                picks.setdefault(rank, {**item, "nodeId": node_id, "mediaType": item.get("mediaType", key)})
    preview = picks.get("saved") or picks.get("other") or picks.get("text")
    return count, previewable, preview


def _times(history: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(execution_start_time, execution_end_time, execution_error) from the history's messages."""
    start = end = error = None
    for entry in (history.get("status") or {}).get("messages", []):
        if not (isinstance(entry, list) and len(entry) >= 2 and isinstance(entry[1], dict)):
            continue
        event, data = entry[0], entry[1]
        if event == "execution_start":
            start = data.get("timestamp")
        elif event in TERMINAL:
            end = data.get("timestamp")
            error = data if event == "execution_error" else error
    return start, end, error


def job(rec: PromptRecord, *, detail: bool = False) -> dict[str, Any]:
    """The job as `GET /api/jobs` lists it, or with `detail` as `GET /api/jobs/{id}` gives it."""
    create_time, workflow_id = _metadata(rec)
    summary: dict[str, Any] = {"id": rec.prompt_id, "status": status_of(rec), "priority": rec.number,
                               "create_time": create_time}
    if rec.state != FINISHED or rec.history is None:
        return _pruned({**summary, "outputs_count": 0, "previewable_outputs_count": 0, "workflow_id": workflow_id})
    outputs = rec.history.get("outputs") or {}
    start, end, error = _times(rec.history)
    count, previewable, preview = outputs_summary(outputs)
    out = _pruned({**summary, "execution_start_time": start, "execution_end_time": end, "execution_error": error,
                   "outputs_count": count, "previewable_outputs_count": previewable, "preview_output": preview,
                   "workflow_id": workflow_id})
    if detail:
        _, _, prompt, extra_data, _ = prompt_item(rec)
        out |= {"outputs": outputs, "execution_status": rec.history.get("status"),
                "workflow": {"prompt": prompt, "extra_data": extra_data}}
    return out


def sort_key(sort_by: str) -> Any:
    if sort_by == "execution_duration":
        def duration(j: dict[str, Any]) -> float:
            start, end = j.get("execution_start_time"), j.get("execution_end_time")
            return end - start if start and end else 0
        return duration
    return lambda j: j.get("create_time") or 0
