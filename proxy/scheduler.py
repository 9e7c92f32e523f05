"""Which backend runs the prompt at the head of the queue: filters, then scorers, then a picker.

Each filter and scorer is a small function over an immutable `BackendState` snapshot and the proxy's own
in-flight counts, so a policy reads like the list it is and a new signal is one new function.

`least_loaded` minimises the prompt's expected completion time: the work ahead at the backend, plus a
checkpoint load if the models loaded there once that work has run differ from the prompt's (model
affinity, `proxy.backlog`), plus the prompt's own steps, all in seconds at that backend's learned speed
(`proxy.speed`). A swap is charged more than its load: the models it evicts are likely wanted back, and
every load is GPU time lost to the whole queue. That extra charge (`EVICTION_COST` loads) is shared by the
backends holding the same models, so the last copy of a model is the dearest to lose, and it fades to
nothing while the backend sits idle (its models are cold). When a backend that is full now would still
finish the prompt clearly sooner than any backend with a free slot, the prompt waits for it (late
binding keeps it in the proxy's queue) and the prompts examined after it in the same round count it
there. The baselines (`round_robin`, `random`, `least_connections`) pick among backends with a free slot.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

from proxy.backends import BackendState
from proxy.backlog import Backlog, Placement
from proxy.capability import model_files, offers
from proxy.speed import SpeedEstimator

MIB = 1024 ** 2
EVICTION_COST = 12.0  # loads charged for evicting a backend's models (shared by the backends holding them)
HOLD_MARGIN = 0.1     # a full backend must beat the best free one by this fraction to be waited for
TIE_MARGIN = 0.02     # scores this close are a tie, broken toward the backend with fewer prompts in flight
PRIOR_STEPS = 20.0    # size of a prompt this replica knows nothing about (another replica's, a client's)


@dataclass(frozen=True)
class Demand:
    """What a prompt needs from a backend, and how big it is."""

    node_classes: frozenset[str]
    pools: tuple[str, ...] = ()   # backend labels the tenant may use; empty = any
    combo_values: frozenset[tuple[str, str, str]] = frozenset()  # (class, input, value): model files etc.
    steps: int = 0                # sampling steps (proxy.speed.sampling_steps)

    @cached_property
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


def has_vram_floor(c: Candidate, d: Demand) -> bool:
    """The backend keeps at least its configured `min_vram_free_mb` free (as last polled)."""
    floor = c.state.config.min_vram_free_mb
    return floor <= 0 or c.state.vram_free >= floor * MIB


def has_node_classes(c: Candidate, d: Demand) -> bool:
    return d.node_classes <= c.state.node_classes


def has_model_files(c: Candidate, d: Demand) -> bool:
    return offers(c.state.combos, d.combo_values)


def in_pools(c: Candidate, d: Demand) -> bool:
    return not d.pools or bool(set(d.pools) & set(c.state.config.labels))


def can_run(c: Candidate, d: Demand) -> bool:
    """The capability filters, spelled out rather than looped over: this runs for each backend a decision
    looks at."""
    return is_available(c, d) and in_pools(c, d) and has_node_classes(c, d) and has_model_files(c, d)


READY_FILTERS: tuple[Filter, ...] = (has_free_slot, has_vram_floor)


def queue_depth(c: Candidate) -> float:
    """Prompts ahead at the backend per unit of weight: its polled queue or what the proxy has sent it,
    whichever is more (the operator's view in `/proxy/backends`; `least_loaded` counts seconds)."""
    return max(c.state.queue_remaining, c.inflight) / c.state.config.weight


def vram_free_fraction(c: Candidate) -> float:
    total = c.state.vram_total
    return -(c.state.vram_free / total) if total else 0.0


def connections(c: Candidate) -> float:
    return float(c.inflight)


@dataclass
class _Round:
    """One dispatch round's view: the available backends in the order of the least their score can be
    (the prompt's own steps at their speed; see `Scheduler._least_loaded`), and their speeds then."""

    order: list[BackendState]
    rates: dict[str, tuple[float, float]]    # name → (seconds per step, load seconds)
    copies: Counter[frozenset[str]] | None = None   # model sets held after the work ahead, by how many backends


class Scheduler:
    """Picks among backends that can run the prompt; `None` means wait.

    The dispatcher opens each round with the backends and the in-flight prompts (`begin_round`), asks for
    each queued prompt in turn (`choose`) and reports each placement (`placed`); the event router tells it
    when prompts start and end (`prompt_started`, `prompt_ended`).
    """

    def __init__(self, policy: str = "least_loaded", rng: random.Random | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.speed = SpeedEstimator()
        self.backlog = Backlog()
        self._clock = clock
        self._rr = itertools.count()
        self._rng = rng or random.Random()
        self._held: dict[str, list[Placement]] = {}   # this round's prompts waiting for a full backend
        self._mean_steps = PRIOR_STEPS
        self._round = _Round([], {})

    # --- what the dispatcher and the router report ------------------------------------------------
    def begin_round(self, inflight: Mapping[str, Sequence[str]] | None,
                    states: Sequence[BackendState] = ()) -> None:
        """A new dispatch round over `states`; with the store's in-flight ids (read every so often),
        placements that ended or moved elsewhere are dropped."""
        self._held.clear()
        if inflight is not None:
            self.backlog.keep_only(inflight)
        self._round = self._prepare(states)

    def placed(self, c: Candidate, prompt_id: str, demand: Demand) -> None:
        before = self.models_after(c)
        self.backlog.place(prompt_id, self._placement(c, demand))
        self._recount(self._round, before, self.models_after(c))
        self._mean_steps += 0.1 * (max(demand.steps, 1) - self._mean_steps)

    def prompt_started(self, backend: str, prompt_id: str, at: float) -> None:
        self.backlog.started(backend, prompt_id, at)

    def prompt_ended(self, backend: str, prompt_id: str, outcome: str, at: float,
                     ran_s: float | None = None) -> None:
        """`ran_s`: the run time by the backend's clock when its history has it, else start to `at`."""
        p = self.backlog.ended(backend, prompt_id, at)
        if p is not None and p.started_at is not None and p.loads_model is not None and outcome == "success":
            self.speed.observe(backend, p.weight, p.steps, at - p.started_at if ran_s is None else ran_s,
                               p.loads_model)

    # --- picking -------------------------------------------------------------------------------------
    def capable(self, candidates: Sequence[Candidate], demand: Demand) -> list[Candidate]:
        return [c for c in candidates if can_run(c, demand)]

    def choose(self, demand: Demand, inflight: Mapping[str, int]) -> Candidate | None:
        """`pick` over this round's backends, `inflight` their prompts now (this round's placements in)."""
        if self.policy == "least_loaded":
            return self._least_loaded(self._round, inflight, demand)
        return self.pick([Candidate(s, inflight.get(s.name, 0)) for s in self._round.order], demand)

    def pick(self, candidates: Sequence[Candidate], demand: Demand) -> Candidate | None:
        if self.policy == "least_loaded":
            return self._least_loaded(self._prepare([c.state for c in candidates]),
                                      {c.state.name: c.inflight for c in candidates}, demand)
        ready = [c for c in self.capable(candidates, demand) if all(f(c, demand) for f in READY_FILTERS)]
        if not ready:
            return None
        if self.policy == "round_robin":
            ordered = sorted(ready, key=lambda c: c.state.name)
            return ordered[next(self._rr) % len(ordered)]
        if self.policy == "random":
            return self._rng.choice(ready)
        return min(ready, key=lambda c: (connections(c), c.state.name))

    def _prepare(self, states: Sequence[BackendState]) -> _Round:
        live = [s for s in states if s.available]
        if self.policy != "least_loaded":   # the baselines score nothing
            return _Round(live, {})
        rates = self.speed.rates((s.name, s.config.weight) for s in live)
        return _Round(sorted(live, key=lambda s: (rates[s.name][0], vram_free_fraction(Candidate(s, 0)), s.name)),
                      rates)

    def _least_loaded(self, rnd: _Round, inflight: Mapping[str, int], demand: Demand) -> Candidate | None:
        """The backend with the least score, scanning in the order of the least score each can have: the
        prompt's own steps at its speed (work ahead, loads and evictions only add). Once that bound
        passes the best free backend's score (and the tie margin), no backend further on can win, tie or be
        waited for. Nor can one past a free backend with nothing ahead and nothing to load (`perfect`): to
        beat it a backend must score as little, be as idle, and come first in the order's tie-break (the
        order is by speed, then free VRAM, then name, as the final choice is). So a farm of hundreds is
        decided after scoring a few, with the choice scoring all would make. The exception is a prompt
        whose checkpoint no backend holds: every backend a load away from the best is scored."""
        now = self._clock()
        steps = max(demand.steps, 1)
        scores: dict[str, float] = {}
        ready: list[Candidate] = []
        full: list[Candidate] = []
        bound = math.inf
        perfect = (math.inf, math.inf)   # (score, seconds a step) of a free backend with nothing ahead or to load
        for state in rnd.order:
            per_step, load = rnd.rates[state.name]
            least = steps * per_step
            if least > bound or least > perfect[0] or (least == perfect[0] and per_step == perfect[1]):
                break
            c = Candidate(state, inflight.get(state.name, 0))
            if not can_run(c, demand) or not has_vram_floor(c, demand):
                continue
            score = scores[state.name] = self._score(c, demand, now, (per_step, load), rnd)
            if has_free_slot(c, demand):
                ready.append(c)
                bound = min(bound, score * (1 + TIE_MARGIN))
                if c.inflight == 0 and score == least and score < perfect[0]:
                    perfect = (score, per_step)
            else:
                full.append(c)
        if not ready:
            return None

        def key(c: Candidate) -> tuple[float, float, str]:
            return scores[c.state.name], vram_free_fraction(c), c.state.name

        best_ready = min(ready, key=key)
        # A tie (say a load there costs what waiting here does) goes to the less busy backend: the same
        # finish for this prompt, and the busy one stays free for the next.
        tied = [c for c in ready if scores[c.state.name] <= scores[best_ready.state.name] * (1 + TIE_MARGIN)]
        best_ready = min(tied, key=lambda c: (c.inflight, *key(c)))
        best_full = min(full, key=key, default=None)
        if best_full is not None and scores[best_full.state.name] < scores[best_ready.state.name] * (1 - HOLD_MARGIN):
            before = self.models_after(best_full)
            self._held.setdefault(best_full.state.name, []).append(self._placement(best_full, demand))
            self._recount(rnd, before, self.models_after(best_full))
            return None
        return best_ready

    # --- scorers (seconds) ---------------------------------------------------------------------------
    def score(self, c: Candidate, demand: Demand, now: float) -> float:
        """Expected completion time of the prompt there, plus what an eviction will cost later."""
        rnd = self._prepare([c.state])
        return self._score(c, demand, now, rnd.rates[c.state.name], rnd)

    def _score(self, c: Candidate, demand: Demand, now: float, rates: tuple[float, float], rnd: _Round) -> float:
        per_step, load = rates
        own = max(demand.steps, 1) * per_step
        swap = (1.0 + self.eviction_cost(c, now, own, self._copies(rnd))) * load if self._swaps(c, demand) else 0.0
        return self.work_ahead(c, now, per_step, load) + own + swap

    def _copies(self, rnd: _Round) -> Counter[frozenset[str]]:
        """How many of the round's backends will hold each set of models (counted once a round, then
        kept up to date as prompts are placed or held)."""
        if rnd.copies is None:
            rnd.copies = Counter(self.models_after(Candidate(s, 0)) for s in rnd.order)
        return rnd.copies

    @staticmethod
    def _recount(rnd: _Round, before: frozenset[str], after: frozenset[str]) -> None:
        copies = rnd.copies
        if copies is not None and before != after:
            copies[before] -= 1
            copies[after] += 1

    def eviction_cost(self, c: Candidate, now: float, own: float, copies: Mapping[frozenset[str], int]) -> float:
        """Loads to charge for evicting the backend's models: none if nothing is known to be loaded there,
        else `EVICTION_COST` shared among the backends that hold the same models (losing the last copy
        costs most; every available backend counts, whether or not it could run this prompt), fading to
        nothing as the backend stays idle (nobody has wanted its models for a prompt's length: they are
        cold)."""
        loaded = self.models_after(c)
        if not loaded:
            return 0.0
        cost = EVICTION_COST / max(copies.get(loaded, 1), 1)
        idle_since = self.backlog.idle_since(c.state.name)
        if idle_since is None or c.inflight > 0:
            return cost
        return cost * max(0.0, 1.0 - (now - idle_since) / max(own, 1e-9))

    def work_ahead(self, c: Candidate, now: float, per_step: float, load: float) -> float:
        """Seconds of work queued or running there before a new prompt could start."""
        name = c.state.name
        seconds, mine = self.backlog.work_ahead(name, now, per_step, load)
        for p in self._held.get(name, ()):
            seconds += max(p.steps, 1) * per_step + (load if p.loads_model else 0.0)
        # Prompts this replica did not place: other replicas' (in the store's count), and any the backend
        # reported in its queue at the last poll beyond those (clients of its own), less those since ended.
        foreign = max(c.state.queue_remaining - c.inflight - self.backlog.ended_since(name, c.state.queue_at), 0)
        unknown = max(c.inflight - mine, 0) + foreign
        return seconds + unknown * self._mean_steps * per_step

    def models_after(self, c: Candidate) -> frozenset[str]:
        """The model files loaded there once the work ahead has run: the last prompt sent there (by this
        replica, updated at dispatch), else the last one seen starting there (the farm's view)."""
        held = self._held.get(c.state.name)
        for p in reversed(held or []):
            if p.models:
                return p.models
        known = self.backlog.models_after(c.state.name)
        return known if known is not None else c.state.loaded

    def _swaps(self, c: Candidate, demand: Demand) -> bool:
        return bool(demand.models) and not demand.models <= self.models_after(c)

    def _placement(self, c: Candidate, demand: Demand) -> Placement:
        return Placement(c.state.name, demand.steps, demand.models, c.state.config.weight, self._swaps(c, demand))
