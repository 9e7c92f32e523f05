"""How fast each backend really is, learned online from the prompts it runs.

Prompts differ in their number of sampling steps (known at dispatch from the graph), so the comparable
figure is seconds per step: an EWMA of `(end - execution_start) / steps` per backend, fed only by prompts
that loaded no model (a checkpoint load is learned apart, as an EWMA of the seconds a load adds). Until a
backend has finished such a prompt, its configured `weight` is the prior: the seconds per step of a
weight-1 backend (learned from the backends observed so far, else `PRIOR_SECONDS_PER_STEP`) ÷ its weight.

Only the replica that holds a backend's upstream socket sees its prompts start and end, so each replica
learns in memory from what it sees, and every few seconds (`share`) writes what it learned to the store
and adopts what the others learned for the backends it has seen nothing of. A figure nobody renewed for
`SHARED_MAX_AGE_S` is dropped, so a backend whose socket moved to a replica that has not learned it yet
falls back to the prior only once the old figure has aged out.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.store import Store

ALPHA = 0.3                    # weight of the newest observation in each EWMA
SHARED_MAX_AGE_S = 600.0       # another replica's figure older than this is not used
PRIOR_SECONDS_PER_STEP = 0.1   # a weight-1 backend before anything was observed
PRIOR_LOAD_STEPS = 10.0        # a checkpoint load before one was observed: this many sampling steps


def sampling_steps(prompt: Mapping[str, Any]) -> int:
    """The sampling steps a prompt will run: the literal `steps` inputs of its nodes (KSampler,
    BasicScheduler, …; KSamplerAdvanced counts `start_at_step`..`end_at_step`). 0 when it samples nothing."""
    total = 0
    for node in prompt.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        steps = inputs.get("steps")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
            continue
        start, end = inputs.get("start_at_step"), inputs.get("end_at_step")
        if isinstance(start, int) and isinstance(end, int):
            steps = max(0, min(end, steps) - start)
        total += steps
    return total


def _ewma(old: float | None, sample: float) -> float:
    return sample if old is None else old + ALPHA * (sample - old)


class SpeedEstimator:
    """Seconds per sampling step and seconds per model load, per backend."""

    def __init__(self) -> None:
        self._per_step: dict[str, float] = {}
        self._weights: dict[str, float] = {}
        self._load: dict[str, float] = {}
        self._shared_step: dict[str, float] = {}   # other replicas' figures, for backends not observed here
        self._shared_load: dict[str, float] = {}

    def learned(self, now: float) -> dict[str, dict[str, float]]:
        """What this replica observed, to share: per backend its seconds per step (as a weight-1 backend's,
        with the weight), its load seconds when known, and when."""
        return {b: {"per_step": s, "weight": self._weights[b], "at": now,
                    **({"load": self._load[b]} if b in self._load else {})}
                for b, s in self._per_step.items()}

    def adopt(self, shared: Mapping[str, Mapping[str, float]], now: float) -> None:
        """Other replicas' figures, used for the backends this one has observed nothing of."""
        fresh = {b: f for b, f in shared.items()
                 if b not in self._per_step and now - f.get("at", 0.0) <= SHARED_MAX_AGE_S and f.get("per_step")}
        self._shared_step = {b: f["per_step"] for b, f in fresh.items()}
        self._shared_load = {b: f["load"] for b, f in fresh.items() if f.get("load") is not None}
        for b, f in fresh.items():
            self._weights.setdefault(b, f.get("weight", 1.0))

    def observe(self, backend: str, weight: float, steps: int, seconds: float, loaded_model: bool) -> None:
        """A prompt of `steps` steps ran for `seconds`; `loaded_model`: it had to load a model first. A run
        timed at nothing (ComfyUI answered it from its cache; its clock has milliseconds) teaches nothing: a
        speed of 0 s a step would make every backend's score a division by zero."""
        if seconds <= 0:
            return
        steps = max(steps, 1)
        if not loaded_model:
            self._per_step[backend] = _ewma(self._per_step.get(backend), seconds / steps)
            self._weights[backend] = weight
        elif backend in self._per_step:  # the load is what the run took beyond its steps
            extra = max(seconds - steps * self._per_step[backend], 0.0)
            self._load[backend] = _ewma(self._load.get(backend), extra)

    def observed(self, backend: str) -> bool:
        return backend in self._per_step

    def reference(self) -> float:
        """Seconds per step of a weight-1 backend: the median over known backends, scaled by weight."""
        known = {**self._shared_step, **self._per_step}
        if not known:
            return PRIOR_SECONDS_PER_STEP
        return statistics.median(s * self._weights.get(b, 1.0) for b, s in known.items())

    def seconds_per_step(self, backend: str, weight: float) -> float:
        learned = self._per_step.get(backend, self._shared_step.get(backend))
        return learned if learned is not None else self.reference() / weight

    def load_seconds(self, backend: str, weight: float) -> float:
        """What loading a checkpoint costs there: learned, else the farm's median load scaled by
        relative speed, else `PRIOR_LOAD_STEPS` of its steps."""
        return self.rates([(backend, weight)])[backend][1]

    def rates(self, backends: Iterable[tuple[str, float]]) -> dict[str, tuple[float, float]]:
        """(seconds per step, load seconds) of each (backend, weight) at once: the farm-wide medians the
        unlearned ones fall back on are computed once, not once per backend (a dispatch round over
        hundreds of backends)."""
        reference = self.reference()
        loads = {**self._shared_load, **self._load}
        steps_of = {**self._shared_step, **self._per_step}

        def per_step(b: str, weight: float) -> float:
            learned = steps_of.get(b)
            return learned if learned is not None else reference / weight
        # Other backends' loads, in their own steps, applied to an unlearned backend's step time.
        load_steps = statistics.median(load / per_step(b, self._weights.get(b, 1.0)) for b, load in loads.items()) \
            if loads else PRIOR_LOAD_STEPS
        out: dict[str, tuple[float, float]] = {}
        for b, weight in backends:
            step = per_step(b, weight)
            load = loads.get(b)
            out[b] = (step, load if load is not None else step * load_steps)
        return out


async def share(estimator: SpeedEstimator, store: Store, now: float) -> None:
    """Write what this replica learned, and take up what the others did (called every few seconds)."""
    await store.share_speeds(estimator.learned(now))
    estimator.adopt(await store.shared_speeds(), now)
