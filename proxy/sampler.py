"""Refreshes the gauges that mirror shared state (queue depth per tenant, backend state, in-flight
counts, client sockets) once per poll interval, off the request and message hot paths."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from proxy.backends import Farm
from proxy.errors import ProxyError
from proxy.metrics import Metrics
from proxy.pools import pool_figures
from proxy.relay.hub import ClientHub
from proxy.store import Store
from proxy.tasks import TaskOwner

log = structlog.get_logger(__name__)


def tenant_label(tenant: str) -> str:
    return tenant or "anonymous"


class GaugeSampler:
    def __init__(self, metrics: Metrics, store: Store, farm: Farm, hub: ClientHub, interval_s: float, *,
                 tenant_pools: Callable[[str], tuple[str, ...]] = lambda tenant: (),
                 known_pools: tuple[str, ...] = ()) -> None:
        self.metrics = metrics
        self.store = store
        self.farm = farm
        self.hub = hub
        self.interval_s = interval_s
        self.tenant_pools = tenant_pools
        self.known_pools = known_pools
        self._tasks = TaskOwner()
        self._tenants_seen: set[str] = set()

    def start(self) -> None:
        self._tasks.spawn(self._run(), name="gauge-sampler")

    async def stop(self) -> None:
        await self._tasks.stop()

    async def _run(self) -> None:
        while True:
            try:
                await self.sample()
            except ProxyError as exc:  # the store is down: keep the last values, try again next tick
                log.warning("gauge_sample_failed", error=exc.message)
            await asyncio.sleep(self.interval_s)

    async def sample(self) -> None:
        m = self.metrics
        m.ws_clients.set(self.hub.count())
        m.asyncio_tasks.set(len(asyncio.all_tasks()))
        inflight = await self.store.inflight()
        for state in self.farm.snapshot():
            m.backend_up.labels(state.name).set(1 if state.available else 0)
            m.backend_queue.labels(state.name).set(state.queue_remaining)
            m.backend_inflight.labels(state.name).set(len(inflight.get(state.name, ())))
            m.backend_slots.labels(state.name).set(state.config.max_inflight)
            m.vram_free.labels(state.name).set(state.vram_free)
            m.vram_total.labels(state.name).set(state.vram_total)
        queued = await self.store.queue_summary()
        depth = {tenant_label(t): n for t, (n, _) in queued.items()}
        # Tenants whose queue emptied must read 0, not keep their last value.
        for tenant in self._tenants_seen | set(depth):
            m.queue_depth.labels(tenant).set(depth.get(tenant, 0))
        self._tenants_seen |= set(depth)
        figures = pool_figures(backends=self.farm.snapshot(), inflight=inflight, queued=queued,
                               tenant_pools=self.tenant_pools, known=self.known_pools, now=time.time())
        for pool, f in figures.items():   # a pool once seen stays known (its labels come from config)
            m.pool_waiting.labels(pool).set(f.waiting)
            m.pool_running.labels(pool).set(f.running)
            m.pool_slots.labels(pool).set(f.slots)
            m.pool_oldest_wait.labels(pool).set(f.oldest_wait_s)
