"""Refreshes the gauges that mirror shared state (queue depth per tenant, backend state, in-flight
counts, client sockets) once per poll interval, off the request and message hot paths."""

from __future__ import annotations

import asyncio

import structlog

from proxy.backends import Farm
from proxy.errors import ProxyError
from proxy.metrics import Metrics
from proxy.relay.hub import ClientHub
from proxy.store import Store
from proxy.tasks import TaskOwner

log = structlog.get_logger(__name__)


def tenant_label(tenant: str) -> str:
    return tenant or "anonymous"


class GaugeSampler:
    def __init__(self, metrics: Metrics, store: Store, farm: Farm, hub: ClientHub, interval_s: float) -> None:
        self.metrics = metrics
        self.store = store
        self.farm = farm
        self.hub = hub
        self.interval_s = interval_s
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
        depth = {tenant_label(t): n for t, n in (await self.store.queued_by_tenant()).items()}
        # Tenants whose queue emptied must read 0, not keep their last value.
        for tenant in self._tenants_seen | set(depth):
            m.queue_depth.labels(tenant).set(depth.get(tenant, 0))
        self._tenants_seen |= set(depth)
