"""Per-node progress of the running prompt and its `progress_state` messages (comfy_execution/progress.py).

Each change sends the state of every node that is not pending. Entries start as ints (0 of 1) and become
floats when a node starts, which is why a cached output node reports `1` and an executed one `1.0`
(traces/run_cached.json, run_normal.json).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PENDING, RUNNING, FINISHED = "pending", "running", "finished"


class ProgressRegistry:
    def __init__(self, prompt_id: str, send: Callable[[dict[str, Any]], None]) -> None:
        self.prompt_id = prompt_id
        self._send = send
        self.nodes: dict[str, dict[str, Any]] = {}

    def _entry(self, node_id: str) -> dict[str, Any]:
        if node_id not in self.nodes:
            self.nodes[node_id] = {"state": PENDING, "value": 0, "max": 1}
        return self.nodes[node_id]

    def start(self, node_id: str) -> None:
        self._entry(node_id).update(state=RUNNING, value=0.0, max=1.0)
        self._publish()

    def update(self, node_id: str, value: float, max_value: float) -> None:
        self._entry(node_id).update(state=RUNNING, value=value, max=max_value)
        self._publish()

    def finish(self, node_id: str) -> None:
        entry = self._entry(node_id)
        entry.update(state=FINISHED, value=entry["max"])
        self._publish()

    def _publish(self) -> None:
        nodes = {
            node_id: {"value": s["value"], "max": s["max"], "state": s["state"], "node_id": node_id,
                      "prompt_id": self.prompt_id, "display_node_id": node_id, "parent_node_id": None,
                      "real_node_id": node_id}
            for node_id, s in self.nodes.items() if s["state"] != PENDING
        }
        self._send({"prompt_id": self.prompt_id, "nodes": nodes})
