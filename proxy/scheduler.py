"""Which backend runs the prompt at the head of the queue: filters, then scorers, then a picker.

Each filter and scorer is a small function over an immutable `BackendState` snapshot and the proxy's own
in-flight counts, so a policy reads like the list it is and a new signal is one new function.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from proxy.backends import BackendState
from proxy.capability import model_files, offers


@dataclass(frozen=True)
class Demand:
    """What a prompt needs from a backend (grows with capability-aware scheduling)."""

    node_classes: frozenset[str]
    pools: tuple[str, ...] = ()   # backend labels the tenant may use; empty = any
    combo_values: frozenset[tuple[str, str, str]] = frozenset()  # (class, input, value): model files etc.

    @property
    def models(self) -> frozenset[str]:
        return model_files(self.combo_values)


@dataclass(frozen=True)
class Candidate:
    state: BackendState
    inflight: int            # prompts the proxy has at this backend now (fresh, from the store)

    @property
    def free_slots(self) -> int:
        return self.state.config.max_inflight - self.inflight


Filter = Callable[[Candidate, Demand], bool]


def is_available(c: Candidate, d: Demand) -> bool:
    return c.state.available


def has_free_slot(c: Candidate, d: Demand) -> bool:
    return c.free_slots > 0


def has_node_classes(c: Candidate, d: Demand) -> bool:
    return d.node_classes <= c.state.node_classes


def has_model_files(c: Candidate, d: Demand) -> bool:
    return offers(c.state.combos, d.combo_values)


def in_pools(c: Candidate, d: Demand) -> bool:
    return not d.pools or bool(set(d.pools) & set(c.state.config.labels))


CAPABILITY_FILTERS: tuple[Filter, ...] = (is_available, in_pools, has_node_classes, has_model_files)


def queue_depth(c: Candidate) -> float:
    """Work ahead at the backend: its own queue (polled) plus what the proxy has sent since (fresh)."""
    return (max(c.state.queue_remaining, 0) + c.inflight) / c.state.config.weight


def vram_free_fraction(c: Candidate) -> float:
    total = c.state.vram_total
    return -(c.state.vram_free / total) if total else 0.0


# A checkpoint swap costs seconds to tens of seconds: about as much as one prompt waiting ahead.
SWAP_PENALTY = 1.0


def model_swap(c: Candidate, d: Demand) -> float:
    """1 when the backend would have to load a model file the prompt needs (model affinity), else 0."""
    return 0.0 if d.models <= c.state.loaded else 1.0


def connections(c: Candidate) -> float:
    return float(c.inflight)


class Scheduler:
    """Picks among backends with a free slot that can run the prompt; `None` means wait."""

    def __init__(self, policy: str = "least_loaded", rng: random.Random | None = None) -> None:
        self.policy = policy
        self._rr = itertools.count()
        self._rng = rng or random.Random()

    def capable(self, candidates: Sequence[Candidate], demand: Demand) -> list[Candidate]:
        return [c for c in candidates if all(f(c, demand) for f in CAPABILITY_FILTERS)]

    def pick(self, candidates: Sequence[Candidate], demand: Demand) -> Candidate | None:
        ready = [c for c in self.capable(candidates, demand) if has_free_slot(c, demand)]
        if not ready:
            return None
        if self.policy == "round_robin":
            ordered = sorted(ready, key=lambda c: c.state.name)
            return ordered[next(self._rr) % len(ordered)]
        if self.policy == "random":
            return self._rng.choice(ready)
        if self.policy == "least_connections":
            return min(ready, key=lambda c: (connections(c), c.state.name))
        return min(ready, key=lambda c: (queue_depth(c) + SWAP_PENALTY * model_swap(c, demand),
                                         vram_free_fraction(c), c.state.name))
