"""The webhook outbox of the in-process store (`Store.webhooks_*`)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from typing import Any

from proxy.store.base import FAILED, PENDING, Delivery


class MemoryOutbox:
    """Deliveries are kept in order of `keep_until`: queueing appends, and an attempt, which moves a
    delivery's `keep_until` to the latest, moves it to the end."""

    _ttl: int
    _clock: Any

    def __init__(self) -> None:
        self._deliveries: OrderedDict[str, Delivery] = OrderedDict()
        self._outbox: dict[str, float] = {}        # pending delivery id -> when it is due
        self._failed: dict[str, float] = {}        # given-up delivery id -> when

    def _expire_deliveries(self) -> None:
        now = self._clock()
        while self._deliveries:
            first = next(iter(self._deliveries.values()))
            if first.keep_until(self._ttl) > now:
                return
            self._deliveries.popitem(last=False)
            self._outbox.pop(first.id, None)
            self._failed.pop(first.id, None)

    def _queue_deliveries(self, deliveries: list[Delivery]) -> None:
        """Each due when it was made (the step that made it: an end, a start, a withdrawal)."""
        self._expire_deliveries()
        for delivery in deliveries:
            if delivery.id not in self._deliveries:
                self._deliveries[delivery.id] = delivery
                self._outbox[delivery.id] = delivery.created_at

    async def webhooks_queue(self, deliveries: list[Delivery]) -> None:
        self._queue_deliveries(deliveries)

    async def webhooks_due(self, now: float, lease_s: float, limit: int) -> list[Delivery]:
        self._expire_deliveries()
        due = sorted((at, did) for did, at in self._outbox.items() if at <= now)[:limit]
        for _, did in due:
            self._outbox[did] = now + lease_s
        return [replace(self._deliveries[did], claimed_until=now + lease_s) for _, did in due]

    def _claimed(self, delivery: Delivery) -> bool:
        return delivery.id in self._deliveries and self._outbox.get(delivery.id) == delivery.claimed_until

    async def webhook_attempted(self, delivery: Delivery, due: float | None) -> bool:
        if not self._claimed(delivery):
            return False
        self._deliveries[delivery.id] = delivery
        self._deliveries.move_to_end(delivery.id)   # its keep_until moved to the latest
        if due is not None:
            self._outbox[delivery.id] = due
            return True
        del self._outbox[delivery.id]
        if delivery.status == FAILED:
            self._failed[delivery.id] = delivery.last_attempt_at
        return True

    async def webhook_defer(self, deferred: list[tuple[Delivery, float]]) -> None:
        for delivery, due in deferred:
            if self._claimed(delivery):
                self._outbox[delivery.id] = due

    async def webhooks_failed(self, limit: int) -> list[Delivery]:
        self._expire_deliveries()
        latest = sorted(self._failed.items(), key=lambda item: item[1], reverse=True)[:limit]
        return [self._deliveries[did] for did, _ in latest]

    async def webhook_redeliver(self, delivery_id: str, now: float) -> Delivery | None:
        if self._failed.pop(delivery_id, None) is None or delivery_id not in self._deliveries:
            return None
        again = replace(self._deliveries[delivery_id], status=PENDING, attempts=0, created_at=now)
        self._deliveries[delivery_id] = again
        self._deliveries.move_to_end(delivery_id)
        self._outbox[delivery_id] = now
        return again

    async def webhook_states(self, delivery_ids: list[str]) -> list[Delivery]:
        return [self._deliveries[did] for did in delivery_ids if did in self._deliveries]

    async def webhook_outbox(self) -> tuple[int, float | None]:
        oldest = min((self._deliveries[did].created_at for did in self._outbox), default=None)
        return len(self._outbox), oldest
