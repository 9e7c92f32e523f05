"""Per-pool figures for autoscalers (KEDA, an HPA on an external metric): how many prompts of a pool wait
in the proxy's queue or run, its slots, and the oldest wait. A pool is a backend label; backends without
labels form the pool `default`. A waiting prompt counts in every pool its tenant may use (all of them for
a tenant without `pools`), since any of those could take it; a prompt in flight counts in the pools of the
backend that holds it. Pools are known from the backends, the tenants' pools and `discovery.dns` labels,
so a pool scaled to zero still reports its waiting prompts, the signal that scales it up again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from proxy.backends import BackendState

DEFAULT_POOL = "default"


@dataclass(frozen=True)
class PoolFigures:
    waiting: int = 0
    running: int = 0        # in flight at its backends: dispatched or running
    slots: int = 0          # max_inflight of its available backends
    oldest_wait_s: float = 0.0


def pools_of(state: BackendState) -> tuple[str, ...]:
    return tuple(state.config.labels) or (DEFAULT_POOL,)


def pool_figures(*, backends: Iterable[BackendState], inflight: dict[str, list[str]],
                 queued: dict[str, tuple[int, float]], tenant_pools: Callable[[str], tuple[str, ...]],
                 known: Iterable[str], now: float) -> dict[str, PoolFigures]:
    """`queued`: per tenant (waiting prompts, when the oldest was admitted), as `Store.queue_summary`."""
    states = list(backends)
    names = set(known) | {pool for s in states for pool in pools_of(s)}
    out: dict[str, PoolFigures] = {}
    for pool in sorted(names):
        members = [s for s in states if pool in pools_of(s)]
        waiting, oldest = 0, None
        for tenant, (count, since) in queued.items():
            allowed = tenant_pools(tenant)
            if not allowed or pool in allowed:
                waiting += count
                oldest = since if oldest is None else min(oldest, since)
        out[pool] = PoolFigures(
            waiting=waiting,
            running=sum(len(inflight.get(s.name, ())) for s in members),
            slots=sum(s.config.max_inflight for s in members if s.available),
            oldest_wait_s=0.0 if oldest is None else max(now - oldest, 0.0))
    return out
