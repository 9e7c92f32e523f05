"""What this replica has placed at each backend and not yet seen end: the work ahead there, and the model
files that will be loaded once that work has run (model affinity).

It is updated at dispatch, not at the next poll, so a burst of prompts for one checkpoint sees the first
of them already headed for a backend and does not pile every swap onto the same one. Starts and ends
come from the event router; the dispatcher drops what the store no longer lists in flight there (ended on
a replica that holds the backend's socket, requeued after a failure) once a second
(`dispatch.MEMBERS_EVERY_S`), so nothing stale outlives that.
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


class _AtBackend:
    """One backend's placements, with running sums over those not started, so the work ahead there costs
    the same to score with three prompts in flight or three thousand (deep backend queues)."""

    def __init__(self) -> None:
        self.placed: dict[str, Placement] = {}    # in dispatch order
        self.started: dict[str, Placement] = {}
        self.waiting_steps = 0                      # Σ max(steps, 1) over placements not started
        self.waiting_loads = 0                      # how many of those are expected to load a model

    def add(self, prompt_id: str, p: Placement) -> None:
        self.placed[prompt_id] = p
        if p.started_at is None:
            self._count(p, 1)
        else:
            self.started[prompt_id] = p

    def remove(self, prompt_id: str) -> Placement | None:
        p = self.placed.pop(prompt_id, None)
        if p is not None and self.started.pop(prompt_id, None) is None:
            self._count(p, -1)
        return p

    def start(self, prompt_id: str, p: Placement) -> None:
        if prompt_id not in self.started:
            self._count(p, -1)
            self.started[prompt_id] = p

    def _count(self, p: Placement, sign: int) -> None:
        self.waiting_steps += sign * max(p.steps, 1)
        self.waiting_loads += sign * bool(p.loads_model)


class Backlog:
    def __init__(self) -> None:
        self._at: dict[str, _AtBackend] = {}                  # backend → its placements
        self._backend_of: dict[str, str] = {}                 # prompt_id → backend
        self._last_placed: dict[str, frozenset[str]] = {}    # backend → models of the last prompt sent there
        self._last_started: dict[str, frozenset[str] | None] = {}  # None: a prompt we did not place started
        self._ends: dict[str, deque[float]] = {}
        self._idle_since: dict[str, float] = {}             # backend → when the last of ours there ended

    def _backend(self, backend: str) -> _AtBackend:
        at = self._at.get(backend)
        if at is None:
            at = self._at[backend] = _AtBackend()
        return at

    def _get(self, backend: str, prompt_id: str) -> Placement | None:
        at = self._at.get(backend)
        return at.placed.get(prompt_id) if at is not None else None

    # --- changes -------------------------------------------------------------------------------------
    def place(self, prompt_id: str, placement: Placement) -> None:
        previous = self._backend_of.get(prompt_id)
        if previous is not None:
            self._at[previous].remove(prompt_id)
        self._backend_of[prompt_id] = placement.backend
        self._backend(placement.backend).add(prompt_id, placement)
        self._idle_since.pop(placement.backend, None)
        if placement.models:
            self._last_placed[placement.backend] = placement.models

    def keep_only(self, inflight: Mapping[str, Sequence[str]]) -> None:
        """Forget placements that the store no longer lists in flight at their backend."""
        for backend, at in self._at.items():
            if not at.placed:
                continue
            live = set(inflight.get(backend, ()))
            for pid in [pid for pid in at.placed if pid not in live]:
                at.remove(pid)
                del self._backend_of[pid]

    def started(self, backend: str, prompt_id: str, at: float) -> None:
        placement = self._get(backend, prompt_id)
        if placement is None:
            # Someone else's prompt: what it loads is unknown, unless ours with models will run after it.
            self._last_started[backend] = None
            mine = self._at.get(backend)
            if mine is None or not any(p.started_at is None and p.models for p in mine.placed.values()):
                self._last_placed.pop(backend, None)
            return
        before = self._last_started.get(backend)
        mine = self._at[backend]
        mine.start(prompt_id, placement)   # out of the waiting sums before loads_model changes
        placement.started_at = at
        placement.loads_model = None if before is None else bool(placement.models) and not placement.models <= before
        if placement.models:
            self._last_started[backend] = placement.models

    def ended(self, backend: str, prompt_id: str, at: float) -> Placement | None:
        self._ends.setdefault(backend, deque(maxlen=RECENT_ENDS)).append(at)
        if self._get(backend, prompt_id) is None:
            return None
        mine = self._at[backend]
        placement = mine.remove(prompt_id)
        del self._backend_of[prompt_id]
        if not mine.placed:
            self._idle_since[backend] = at
        return placement

    # --- reading -------------------------------------------------------------------------------------
    def pending(self, backend: str) -> list[Placement]:
        at = self._at.get(backend)
        return list(at.placed.values()) if at is not None else []

    def work_ahead(self, backend: str, now: float, per_step: float, load: float) -> tuple[float, int]:
        """Seconds of this replica's work placed there and not yet ended, and how many prompts that is."""
        at = self._at.get(backend)
        if at is None:
            return 0.0, 0
        seconds = at.waiting_steps * per_step + at.waiting_loads * load
        for p in at.started.values():
            cost = max(p.steps, 1) * per_step + (load if p.loads_model else 0.0)
            seconds += max(cost - (now - (p.started_at or now)), 0.0)
        return seconds, len(at.placed)

    def models_after(self, backend: str) -> frozenset[str] | None:
        """The model files loaded there once what this replica sent has run; None when unknown."""
        return self._last_placed.get(backend)

    def idle_since(self, backend: str) -> float | None:
        """When the backend ran out of the work this replica sent it; None while it has some."""
        return self._idle_since.get(backend)

    def ended_since(self, backend: str, since: float) -> int:
        return sum(1 for t in self._ends.get(backend, ()) if t >= since)
