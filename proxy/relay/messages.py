"""Websocket messages the proxy writes itself, in ComfyUI's shapes (protocol §8)."""

from __future__ import annotations

import functools
import re
import time
from typing import Any

from proxy.jsoncodec import dumps_comfyui as dumps


def message(type_: str, data: dict[str, Any]) -> str:
    return dumps({"type": type_, "data": data})


def status(queue_remaining: int, sid: str | None = None) -> str:
    if sid is None:
        return _status(queue_remaining)
    return message("status", {"status": {"exec_info": {"queue_remaining": queue_remaining}}, "sid": sid})


QUEUE_REMAINING = re.compile(r'"queue_remaining"\s*:\s*(\d+)')   # exec_info's count (protocol §8 "status")


def queue_remaining_of(raw_status: str) -> int | None:
    """The queue count of a backend's `status` frame, read without parsing the whole message (three per
    prompt per backend)."""
    found = QUEUE_REMAINING.search(raw_status)
    return int(found.group(1)) if found else None


@functools.lru_cache(maxsize=4096)
def _status(queue_remaining: int) -> str:
    """Sent on every queue change to every socket of a tenant: made once per count."""
    return message("status", {"status": {"exec_info": {"queue_remaining": queue_remaining}}})


def executing(node: str | None, prompt_id: str | None = None, display_node: str | None = None) -> str:
    data: dict[str, Any] = {"node": node}
    if display_node is not None:
        data["display_node"] = display_node
    if prompt_id is not None:
        data["prompt_id"] = prompt_id
    return message("executing", data)


def now_ms() -> int:
    return int(time.time() * 1000)


def execution_error(prompt_id: str, exception_message: str, exception_type: str, *,
                    node_id: str | None = None, node_type: str | None = None) -> dict[str, Any]:
    """The data of an `execution_error` the proxy reports for a prompt a backend never ran."""
    return {
        "prompt_id": prompt_id, "node_id": node_id, "node_type": node_type, "executed": [],
        "exception_message": exception_message, "exception_type": exception_type, "traceback": [],
        "current_inputs": {}, "current_outputs": [], "timestamp": now_ms(),
    }


def prefixed(backend: str, entries: Any) -> list[dict[str, Any]]:
    """A backend's log entries with its name in front of each line."""
    out = []
    for entry in entries if isinstance(entries, list) else ():
        if isinstance(entry, dict) and isinstance(entry.get("m"), str):
            out.append({**entry, "m": f"[{backend}] {entry['m']}"})
    return out
