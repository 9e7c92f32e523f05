"""Faults a test can switch on in a running simulator; all off by default.

They are set at run time through simulator-only routes (never ComfyUI's, see `control.py`):
- `error_at_node`: a class_type whose node raises when it runs → `execution_error` (None: off);
- `reject_prompts`: `POST /prompt` answers ComfyUI's 400 `prompt_outputs_failed_validation`, as a
  backend missing the prompt's models would;
- `slow_factor`: multiplies every simulated duration (1.0: normal);
- `drop_sockets`: one-shot: every websocket connection is cut when it is set (reads back false).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


class FaultError(ValueError):
    """A fault request naming an unknown fault or a value of the wrong type."""


@dataclass
class Faults:
    error_at_node: str | None = None
    reject_prompts: bool = False
    slow_factor: float = 1.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drop_sockets": False}

    def update(self, changes: dict[str, Any]) -> bool:
        """Apply a `POST /sim/faults` body; True when the sockets are to be dropped now."""
        unknown = set(changes) - {"error_at_node", "reject_prompts", "slow_factor", "drop_sockets", "reset"}
        if unknown:
            raise FaultError(f"unknown faults: {sorted(unknown)}")
        if changes.get("reset"):
            self.error_at_node, self.reject_prompts, self.slow_factor = None, False, 1.0
        if "error_at_node" in changes:
            value = changes["error_at_node"]
            if value is not None and not isinstance(value, str):
                raise FaultError("error_at_node must be a class_type or null")
            self.error_at_node = value
        if "reject_prompts" in changes:
            self.reject_prompts = _flag(changes, "reject_prompts")
        if "slow_factor" in changes:
            value = changes["slow_factor"]
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise FaultError("slow_factor must be a positive number")
            self.slow_factor = float(value)
        return "drop_sockets" in changes and _flag(changes, "drop_sockets")


def _flag(changes: dict[str, Any], name: str) -> bool:
    if not isinstance(changes[name], bool):
        raise FaultError(f"{name} must be true or false")
    return bool(changes[name])
