"""The webhook outbox of the Redis store (`Store.webhooks_*`).

Keys (from `Keys`): `webhooks` (pending delivery ids by when they are due; a claim moves one past its
lease), `webhook-age` (the same ids by when they were queued: depth and oldest age), `webhook-failed`
(given-up ids by when), and one string per delivery (`webhook:<id>`, its JSON) that expires at
`Delivery.keep_until`. Indexes are pruned of ids whose string has expired as they are read.

`finish` and `mark_running` queue their deliveries inside their own scripts (`QUEUE_DELIVERIES`), so only
the call that really ended (or started) a prompt queues its webhook.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import structlog

from proxy.store.base import FAILED, PENDING, Delivery

log = structlog.get_logger(__name__)

# Queue each delivery once (SET NX), due `now`. KEYS from `k`: the outbox, its age index, then one key per
# delivery; ARGV from `a`: per delivery its id, JSON and expiry. `_FINISH` and `_MARK_RUNNING` call it
# where they succeed, with these KEYS and ARGV after their own: one script, so a NOSCRIPT retry after a
# Redis restart (proxy.store.batching) can never run the queueing before the step it depends on.
QUEUE_DELIVERIES = """
local function queue_deliveries(k, a, now)
  if #KEYS < k + 1 then return end
  local outbox, age = KEYS[k], KEYS[k + 1]
  for i = a, #ARGV, 3 do
    if redis.call('SET', KEYS[k + 2 + (i - a) / 3], ARGV[i + 1], 'NX', 'EXAT', ARGV[i + 2]) then
      redis.call('ZADD', outbox, now, ARGV[i]); redis.call('ZADD', age, now, ARGV[i])
    end
  end
end
"""

_QUEUE = QUEUE_DELIVERIES + """
queue_deliveries(1, 2, ARGV[1])   -- ARGV[1]: now
return 1
"""

_DUE = """
local outbox, age = KEYS[1], KEYS[2]
local now, hold_until, limit, prefix = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', outbox, '-inf', now, 'LIMIT', 0, limit)) do
  local raw = redis.call('GET', prefix .. id)
  if raw then
    redis.call('ZADD', outbox, hold_until, id)
    out[#out + 1] = raw
  else
    redis.call('ZREM', outbox, id); redis.call('ZREM', age, id)
  end
end
return out
"""

# Only while the caller's claim holds (its claim time is still the delivery's score); due '' ends it: out of
# the outbox, and into `failed` when failed ('1').
_ATTEMPTED = """
local outbox, age, failed, key = unpack(KEYS, 1, 4)
local id, json, due, is_failed, now, keep_until, claim = unpack(ARGV, 1, 7)

if tonumber(redis.call('ZSCORE', outbox, id)) ~= tonumber(claim) or redis.call('EXISTS', key) == 0 then
  return 0
end
redis.call('SET', key, json, 'EXAT', keep_until)
if due ~= '' then
  redis.call('ZADD', outbox, due, id)
else
  redis.call('ZREM', outbox, id); redis.call('ZREM', age, id)
  if is_failed == '1' then redis.call('ZADD', failed, now, id) end
end
return 1
"""

_DEFER = """
local outbox = KEYS[1]   -- ARGV: per delivery its id, claim and new due time

for i = 1, #ARGV, 3 do
  if tonumber(redis.call('ZSCORE', outbox, ARGV[i])) == tonumber(ARGV[i + 1]) then
    redis.call('ZADD', outbox, ARGV[i + 2], ARGV[i])
  end
end
return 1
"""

_REDELIVER = """
local outbox, age, failed, key = unpack(KEYS, 1, 4)
local id, json, now, keep_until = unpack(ARGV, 1, 4)

if redis.call('ZREM', failed, id) == 0 or redis.call('EXISTS', key) == 0 then return 0 end
redis.call('SET', key, json, 'EXAT', keep_until)
redis.call('ZADD', outbox, now, id); redis.call('ZADD', age, now, id)
return 1
"""


class RedisOutbox:
    redis: Any
    keys: Any
    _ttl: int

    # RedisStore's own, which this mixes into
    async def _call(self, coro: Any) -> Any:
        raise NotImplementedError

    async def _script(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        raise NotImplementedError

    async def _pipelined(self, calls: list[tuple[Any, list[str], list[Any]]], extra: Any = None) -> list[Any]:
        raise NotImplementedError

    def _register_outbox(self) -> None:
        self._webhooks_queue = self.redis.register_script(_QUEUE)
        self._webhooks_due = self.redis.register_script(_DUE)
        self._webhook_attempted = self.redis.register_script(_ATTEMPTED)
        self._webhook_redeliver = self.redis.register_script(_REDELIVER)
        self._webhook_defer = self.redis.register_script(_DEFER)

    def delivery_tail(self, deliveries: list[Delivery]) -> tuple[list[str], list[Any]]:
        """The KEYS and ARGV `queue_deliveries` reads, to append to a script's own (none for none)."""
        if not deliveries:
            return [], []
        k = self.keys
        keys, args = [k.webhooks, k.webhook_age], []
        for d in deliveries:
            keys.append(k.webhook(d.id))
            args += [d.id, d.to_json(), int(d.keep_until(self._ttl))]
        return keys, args

    async def webhooks_queue(self, deliveries: list[Delivery]) -> None:
        if deliveries:
            keys, args = self.delivery_tail(deliveries)
            await self._script(self._webhooks_queue, keys, [repr(max(d.created_at for d in deliveries)), *args])

    async def webhooks_due(self, now: float, lease_s: float, limit: int) -> list[Delivery]:
        k = self.keys
        until = now + lease_s
        rows = await self._script(self._webhooks_due, [k.webhooks, k.webhook_age],
                                  [repr(now), repr(until), limit, k.webhook_prefix])
        out = []
        for raw in rows:
            try:
                out.append(replace(Delivery.from_json(raw), claimed_until=until))
            except (ValueError, TypeError) as exc:   # unreadable: it stays claimed, then comes back; logged
                log.error("webhook_unreadable", error=repr(exc), raw=str(raw)[:200])
        return out

    async def webhook_attempted(self, delivery: Delivery, due: float | None) -> bool:
        k = self.keys
        return bool(await self._script(
            self._webhook_attempted, [k.webhooks, k.webhook_age, k.webhook_failed, k.webhook(delivery.id)],
            [delivery.id, delivery.to_json(), "" if due is None else repr(due),
             "1" if delivery.status == FAILED else "0", repr(delivery.last_attempt_at),
             int(delivery.keep_until(self._ttl)), repr(delivery.claimed_until)]))

    async def webhook_defer(self, deferred: list[tuple[Delivery, float]]) -> None:
        if deferred:
            args: list[Any] = []
            for delivery, due in deferred:
                args += [delivery.id, repr(delivery.claimed_until), repr(due)]
            await self._script(self._webhook_defer, [self.keys.webhooks], args)

    async def webhooks_failed(self, limit: int) -> list[Delivery]:
        k = self.keys
        ids = list(await self._call(self.redis.zrevrange(k.webhook_failed, 0, limit - 1)))
        found = await self.webhook_states(ids)
        gone = set(ids) - {d.id for d in found}
        if gone:
            await self._call(self.redis.zrem(k.webhook_failed, *gone))
        return found

    async def webhook_redeliver(self, delivery_id: str, now: float) -> Delivery | None:
        k = self.keys
        known = await self.webhook_states([delivery_id])
        if not known:
            return None
        again = replace(known[0], status=PENDING, attempts=0, created_at=now)
        ok = await self._script(
            self._webhook_redeliver, [k.webhooks, k.webhook_age, k.webhook_failed, k.webhook(delivery_id)],
            [delivery_id, again.to_json(), repr(now), int(again.keep_until(self._ttl))])
        return again if ok else None

    async def webhook_states(self, delivery_ids: list[str]) -> list[Delivery]:
        if not delivery_ids:
            return []
        rows = await self._call(self.redis.mget([self.keys.webhook(did) for did in delivery_ids]))
        return [Delivery.from_json(raw) for raw in rows if raw]

    async def webhook_outbox(self) -> tuple[int, float | None]:
        k = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(k.webhook_age)
            pipe.zrange(k.webhook_age, 0, 0, withscores=True)
            depth, oldest = await self._call(pipe.execute())
        return int(depth), (float(oldest[0][1]) if oldest else None)
