"""What this replica has placed at each backend and not yet seen end: the work ahead there, and the model
files that will be loaded once that work has run (model affinity).

It is updated at dispatch, not at the next poll, so a burst of prompts for one checkpoint sees the first
of them already headed for a backend and does not pile every swap onto the same one. Starts and ends
come from the event router; each dispatch round drops what the store no longer lists in flight there
(ended on another replica, requeued after a failure), so nothing stale outlives one round.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

RECENT_ENDS = 32   # end times kept per backend, to discount a queue depth polled before they ended


@dataclass
class Placement:
    """One prompt at a backend, as far as this replica knows."""

    backend: str
    steps: int
    models: frozenset[str]
    weight: float
    loads_model: bool | None   # must load a model first (expected at dispatch, known at start; None: unknown)
    started_at: float | None = None


class Backlog:
    def __init__(self) -> None:
        self._placed: dict[str, Placement] = {}              # prompt_id → placement, in dispatch order
        self._last_placed: dict[str, frozenset[str]] = {}    # backend → models of the last prompt sent there
        self._last_started: dict[str, frozenset[str] | None] = {}  # None: a prompt we did not place started
        self._ends: dict[str, deque[float]] = {}
        self._idle_since: dict[str, float] = {}             # backend → when the last of ours there ended

    # --- changes -------------------------------------------------------------------------------------
    def place(self, prompt_id: str, placement: Placement) -> None:
        self._placed[prompt_id] = placement
        self._idle_since.pop(placement.backend, None)
        if placement.models:
            self._last_placed[placement.backend] = placement.models

    def keep_only(self, inflight: Mapping[str, Sequence[str]]) -> None:
        """Forget placements that the store no longer lists in flight at their backend."""
        live = {backend: set(ids) for backend, ids in inflight.items()}
        stale = [pid for pid, p in self._placed.items() if pid not in live.get(p.backend, ())]
        for pid in stale:
            del self._placed[pid]

    def started(self, backend: str, prompt_id: str, at: float) -> None:
        placement = self._placed.get(prompt_id)
        if placement is None or placement.backend != backend:
            # Someone else's prompt: what it loads is unknown, unless ours with models will run after it.
            self._last_started[backend] = None
            if not any(p.backend == backend and p.started_at is None and p.models for p in self._placed.values()):
                self._last_placed.pop(backend, None)
            return
        before = self._last_started.get(backend)
        placement.started_at = at
        placement.loads_model = None if before is None else bool(placement.models) and not placement.models <= before
        if placement.models:
            self._last_started[backend] = placement.models

    def ended(self, backend: str, prompt_id: str, at: float) -> Placement | None:
        self._ends.setdefault(backend, deque(maxlen=RECENT_ENDS)).append(at)
        placement = self._placed.get(prompt_id)
        if placement is None or placement.backend != backend:
            return None
        del self._placed[prompt_id]
        if not any(p.backend == backend for p in self._placed.values()):
            self._idle_since[backend] = at
        return placement

    # --- reading -------------------------------------------------------------------------------------
    def pending(self, backend: str) -> list[Placement]:
        return [p for p in self._placed.values() if p.backend == backend]

    def models_after(self, backend: str) -> frozenset[str] | None:
        """The model files loaded there once what this replica sent has run; None when unknown."""
        return self._last_placed.get(backend)

    def idle_since(self, backend: str) -> float | None:
        """When the backend ran out of the work this replica sent it; None while it has some."""
        return self._idle_since.get(backend)

    def ended_since(self, backend: str, since: float) -> int:
        return sum(1 for t in self._ends.get(backend, ()) if t >= since)
