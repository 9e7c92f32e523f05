"""The Redis store: shared state for several proxy replicas.

Every key is built by `Keys` under one prefix wrapped in a hash tag (`{prefix}:…`), so all keys of one
deployment live in one Redis Cluster slot and the Lua scripts below may touch several of them at once.
Finished prompt records and output references expire after `finished_ttl_s`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.errors import StoreUnavailable
from proxy.store.base import (
    HISTORY_LIMIT,
    UNANNOUNCED_LIMIT,
    UNANNOUNCED_MAX_AGE_S,
    Admission,
    DispatchView,
    DuplicatePrompt,
    OutputRef,
    PromptRecord,
    QuotaRefused,
    encode_field,
    quota_windows,
)
from proxy.store.batching import RoundTrips
from proxy.store.connect import redis_client


class Keys:
    def __init__(self, prefix: str) -> None:
        self.base = "{" + prefix + "}"
        self.seq = f"{self.base}:seq"
        self.hseq = f"{self.base}:hseq"
        self.queue = f"{self.base}:queue"
        self.history = f"{self.base}:history"
        self.backends = f"{self.base}:backends"
        self.vclock = f"{self.base}:vclock"
        self.drained = f"{self.base}:drained"
        self.leases = f"{self.base}:leases"
        self.events = f"{self.base}:events"
        self.vfinish = f"{self.base}:vfinish"
        self.claims = f"{self.base}:claims"       # prompts claimed ever: the farm's service, counted
        self.vclaimed = f"{self.base}:vclaimed"   # tenant → `claims` when one of its prompts was last claimed
        self.speeds = f"{self.base}:speeds"   # backend → its speed figures (JSON), as last shared
        self.unannounced = f"{self.base}:unannounced"   # ends not yet confirmed sent: prompt_id by time

    def lease(self, name: str) -> str:
        return f"{self.base}:lease:{name}"

    def tenant_active(self, tenant: str) -> str:
        return f"{self.base}:tactive:{tenant}"

    def quota(self, tenant: str, kind: str, window: int) -> str:
        return f"{self.base}:quota:{tenant}:{kind}:{window}"

    def prompt(self, prompt_id: str) -> str:
        return f"{self.base}:prompt:{prompt_id}"

    def inflight(self, backend: str) -> str:
        return f"{self.base}:inflight:{backend}"

    def active(self, tenant: str, client_id: str) -> str:
        return f"{self.base}:active:{tenant}:{client_id}"

    def output(self, ref: str) -> str:
        return f"{self.base}:out:{ref}"


# KEYS: seq, queue, prompt hash, active set ('' if none), tenant active set, vclock, vfinish hash, claims,
#       vclaimed hash
# ARGV: number or '', front flag, prompt_id, tenant, weight, max_queued, per_minute, per_day, gpu_per_day,
#       minute key, day key, gpu key, to_minute, to_day, credit, field/value pairs...
_ADMIT = """
if redis.call('EXISTS', KEYS[3]) == 1 then return {'duplicate'} end
local tenant = ARGV[4]
if ARGV[6] ~= '' and redis.call('SCARD', KEYS[5]) >= tonumber(ARGV[6]) then return {'max_queued', 1} end
local used_m = tonumber(redis.call('GET', ARGV[10]) or '0')
if ARGV[7] ~= '' and used_m >= tonumber(ARGV[7]) then return {'per_minute', tonumber(ARGV[13])} end
local used_d = tonumber(redis.call('GET', ARGV[11]) or '0')
if ARGV[8] ~= '' and used_d >= tonumber(ARGV[8]) then return {'per_day', tonumber(ARGV[14])} end
local used_g = tonumber(redis.call('GET', ARGV[12]) or '0')
if ARGV[9] ~= '' and used_g >= tonumber(ARGV[9]) then return {'gpu_seconds_per_day', tonumber(ARGV[14])} end
redis.call('INCR', ARGV[10]); redis.call('EXPIRE', ARGV[10], 120)
redis.call('INCR', ARGV[11]); redis.call('EXPIRE', ARGV[11], 172800)
local seq = redis.call('INCR', KEYS[1]) - 1
local number = ARGV[1]
if number == '' then
  if ARGV[2] == '1' then number = tostring(-seq) else number = tostring(seq) end
end
local vclock = tonumber(redis.call('GET', KEYS[6]) or '0') - tonumber(ARGV[15])
local score = vclock - 1
if ARGV[2] ~= '1' then
  score = vclock
  local finish = redis.call('HGET', KEYS[7], tenant)
  if finish and tonumber(ARGV[15]) > 0 and redis.call('SCARD', KEYS[5]) == 0 then
    local served = tonumber(redis.call('GET', KEYS[8]) or '0') - tonumber(redis.call('HGET', KEYS[9], tenant) or '0')
    if served >= tonumber(ARGV[15]) then finish = nil end
  end
  if finish and tonumber(finish) > score then score = tonumber(finish) end
  redis.call('HSET', KEYS[7], tenant, tostring(score + 1.0 / tonumber(ARGV[5])))
end
redis.call('HSET', KEYS[3], unpack(ARGV, 16))
redis.call('HSET', KEYS[3], 'number', number, 'score', tostring(score), 'state', '"queued"')
redis.call('ZADD', KEYS[2], score, ARGV[3])
redis.call('SADD', KEYS[5], ARGV[3])
if KEYS[4] ~= '' then redis.call('SADD', KEYS[4], ARGV[3]) end
return {'ok', number, redis.call('SCARD', KEYS[5])}
"""

# KEYS: queue, inflight set, prompt hash, backends set, vclock, claims, vclaimed hash
# ARGV: prompt_id, max_inflight, backend (JSON), dispatcher (JSON), dispatched_at (JSON)
_CLAIM = """
if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[2]) then return 0 end
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
if tonumber(score) > tonumber(redis.call('GET', KEYS[5]) or '0') then redis.call('SET', KEYS[5], score) end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[4], KEYS[2])
redis.call('HSET', KEYS[3], 'state', '"dispatched"', 'backend', ARGV[3], 'dispatcher', ARGV[4],
           'dispatched_at', ARGV[5])
redis.call('HINCRBY', KEYS[3], 'attempts', 1)
redis.call('HSET', KEYS[7], cjson.decode(redis.call('HGET', KEYS[3], 'tenant') or '""'), redis.call('INCR', KEYS[6]))
return 1
"""

# KEYS: queue, prompt hash | ARGV: prompt_id, base key
_REQUEUE = """
local st = redis.call('HMGET', KEYS[2], 'state', 'backend', 'score')
if not st[1] or st[1] == '"finished"' then return 0 end
if ARGV[3] ~= '' and st[2] ~= ARGV[3] then return 0 end
if st[2] and st[2] ~= 'null' then
  redis.call('SREM', ARGV[2] .. ':inflight:' .. cjson.decode(st[2]), ARGV[1])
end
redis.call('HSET', KEYS[2], 'state', '"queued"', 'backend', 'null', 'current_node', 'null', 'dispatcher', 'null',
           'dispatched_at', 'null')
redis.call('ZADD', KEYS[1], st[3], ARGV[1])
return 1
"""

# Shared by the scripts that end a prompt: its queue entry, slot, quota slot and client count go.
# `st` is HMGET state, backend, client_id, tenant of the prompt hash; `queue` is KEYS[1].
_RELEASE = """
local function release(base, pid, st)
  redis.call('ZREM', KEYS[1], pid)
  local tenant = cjson.decode(st[4])
  redis.call('SREM', base .. ':tactive:' .. tenant, pid)
  if st[2] and st[2] ~= 'null' then redis.call('SREM', base .. ':inflight:' .. cjson.decode(st[2]), pid) end
  if st[3] and st[3] ~= 'null' then
    redis.call('SREM', base .. ':active:' .. tenant .. ':' .. cjson.decode(st[3]), pid)
  end
end
"""

# KEYS: queue, prompt hash, history zset, hseq, unannounced zset
# ARGV: prompt_id, base, ttl, outcome, history, finished_at, day
# Returns 0 if it had finished already, else 1 + the tenant's prompts still active. The end is recorded
# as unannounced in the same step (Store.finish).
_FINISH = _RELEASE + """
local st = redis.call('HMGET', KEYS[2], 'state', 'backend', 'client_id', 'tenant', 'started_at')
if not st[1] or st[1] == '"finished"' then return 0 end
local tenant = cjson.decode(st[4])
if st[5] and st[5] ~= 'null' then
  local gpu = tonumber(ARGV[6]) - tonumber(st[5])
  if gpu > 0 then
    local gkey = ARGV[2] .. ':quota:' .. tenant .. ':g:' .. ARGV[7]
    redis.call('INCRBYFLOAT', gkey, gpu); redis.call('EXPIRE', gkey, 172800)
  end
end
release(ARGV[2], ARGV[1], st)
redis.call('HSET', KEYS[2], 'state', '"finished"', 'outcome', ARGV[4], 'history', ARGV[5],
           'finished_at', ARGV[6], 'current_node', 'null')
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
redis.call('ZADD', KEYS[3], redis.call('INCR', KEYS[4]), ARGV[1])
local n = redis.call('ZCARD', KEYS[3])
if n > LIMIT then redis.call('ZREMRANGEBYRANK', KEYS[3], 0, n - LIMIT - 1) end
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[1])
redis.call('EXPIRE', KEYS[5], tonumber(ARGV[3]))
local u = redis.call('ZCARD', KEYS[5])
if u > UNANNOUNCED then redis.call('ZREMRANGEBYRANK', KEYS[5], 0, u - UNANNOUNCED - 1) end
return 1 + redis.call('SCARD', ARGV[2] .. ':tactive:' .. tenant)
""".replace("UNANNOUNCED", str(UNANNOUNCED_LIMIT)).replace("LIMIT", str(HISTORY_LIMIT))

# KEYS: unannounced zset | ARGV: older_than, hidden until, limit, dropped before. Claims the due ends by
# scoring them `hidden until` (Store.ends_to_announce).
_ENDS_TO_ANNOUNCE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[4])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, pid in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], pid) end
return ids
"""

# KEYS: backends set, queue | ARGV: limit, base, members flag, then backend / max_inflight pairs (the
# available ones). Reads the records of at most min(limit, 4 x free slots) queued prompts: none when every
# slot is taken. Returns {backend key, count, members or 0, ...}, {ids}, {HGETALL rows}.
_DISPATCH_VIEW = """
local inflight = {}
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  inflight[#inflight + 1] = key
  inflight[#inflight + 1] = redis.call('SCARD', key)
  if ARGV[3] == '1' then inflight[#inflight + 1] = redis.call('SMEMBERS', key) else inflight[#inflight + 1] = 0 end
end
local free = 0
for i = 4, #ARGV, 2 do
  local left = tonumber(ARGV[i + 1]) - redis.call('SCARD', ARGV[2] .. ':inflight:' .. ARGV[i])
  if left > 0 then free = free + left end
end
local n = math.min(tonumber(ARGV[1]), 4 * free)
local ids, rows = {}, {}
if n > 0 then ids = redis.call('ZRANGE', KEYS[2], 0, n - 1) end
for i, pid in ipairs(ids) do rows[i] = redis.call('HGETALL', ARGV[2] .. ':prompt:' .. pid) end
return {inflight, ids, rows}
"""

# KEYS: queue (only to route the call to the slot in a Cluster)
# ARGV: base, then prompt_id / current_node (JSON) pairs. Finished or missing records are left alone.
_SET_CURRENT_NODES = """
for i = 2, #ARGV, 2 do
  local key = ARGV[1] .. ':prompt:' .. ARGV[i]
  local state = redis.call('HGET', key, 'state')
  if state and state ~= '"finished"' then redis.call('HSET', key, 'current_node', ARGV[i + 1]) end
end
return 1
"""

# KEYS: prompt hash | ARGV: started_at (JSON), base. Returns the tenant's active count, -1 if gone or ended.
_MARK_RUNNING = """
local st = redis.call('HMGET', KEYS[1], 'state', 'tenant')
if not st[1] or st[1] == '"finished"' then return -1 end
redis.call('HSET', KEYS[1], 'state', '"running"', 'started_at', ARGV[1])
return redis.call('SCARD', ARGV[2] .. ':tactive:' .. cjson.decode(st[2]))
"""

# KEYS: lease key, lease index set | ARGV: owner, ttl ms, name. Take when free, renew when ours.
_HOLD_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
redis.call('SADD', KEYS[2], ARGV[3])
return 1
"""

# KEYS: lease key | ARGV: owner
_DROP_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

# KEYS: history zset | ARGV: base, prompt ids. Only finished prompts (those in history) are deleted.
_FORGET = """
for i = 2, #ARGV do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then redis.call('DEL', ARGV[1] .. ':prompt:' .. ARGV[i]) end
end
return 1
"""

# KEYS: queue, prompt hash | ARGV: prompt_id, base
_WITHDRAW = _RELEASE + """
local st = redis.call('HMGET', KEYS[2], 'state', 'backend', 'client_id', 'tenant')
if not st[1] or (st[1] ~= '"queued"' and st[1] ~= '"dispatched"') then return false end
release(ARGV[2], ARGV[1], st)
redis.call('DEL', KEYS[2])
return cjson.decode(st[1])
"""

# KEYS: queue | ARGV: base. Queued prompts per tenant as {tenant (JSON), count, ...}: one round trip and
# no per-prompt reply however long the queue (the gauge sampler reads it every poll).
_QUEUED_BY_TENANT = """
local counts = {}
for _, pid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local tenant = redis.call('HGET', ARGV[1] .. ':prompt:' .. pid, 'tenant')
  if tenant then counts[tenant] = (counts[tenant] or 0) + 1 end
end
local out = {}
for tenant, n in pairs(counts) do out[#out + 1] = tenant; out[#out + 1] = n end
return out
"""


class RedisStore:
    def __init__(self, url: str, key_prefix: str = "comfy-proxy", finished_ttl_s: int = 7 * 24 * 3600,
                 client: aioredis.Redis | None = None) -> None:
        self.redis = client or redis_client(url, decode_responses=True, socket_timeout=5,
                                            socket_connect_timeout=5, health_check_interval=15)
        self.keys = Keys(key_prefix)
        self._ttl = finished_ttl_s
        self._admit = self.redis.register_script(_ADMIT)
        self._claim = self.redis.register_script(_CLAIM)
        self._requeue = self.redis.register_script(_REQUEUE)
        self._finish = self.redis.register_script(_FINISH)
        self._ends_to_announce = self.redis.register_script(_ENDS_TO_ANNOUNCE)
        self._withdraw = self.redis.register_script(_WITHDRAW)
        self._hold_lease = self.redis.register_script(_HOLD_LEASE)
        self._drop_lease = self.redis.register_script(_DROP_LEASE)
        self._forget = self.redis.register_script(_FORGET)
        self._dispatch_view = self.redis.register_script(_DISPATCH_VIEW)
        self._set_current_nodes = self.redis.register_script(_SET_CURRENT_NODES)
        self._mark_running = self.redis.register_script(_MARK_RUNNING)
        self._queued_by_tenant = self.redis.register_script(_QUEUED_BY_TENANT)
        self._round_trips = RoundTrips(self.redis)

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except (RedisError, OSError) as exc:
            raise StoreUnavailable("The state store is unavailable", str(exc)) from exc

    async def _pipelined(self, calls: list[tuple[Any, list[str], list[Any]]],
                         extra: Callable[[Any], None] | None = None) -> list[Any]:
        """Script calls (and `extra` plain commands after them) in one round trip, shared with whatever
        else this turn of the event loop asks the store (proxy.store.batching)."""
        return await self._round_trips.submit(calls, extra)

    async def _script(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        return (await self._pipelined([(script, keys, args)]))[0]

    async def ping(self) -> None:
        await self._call(self.redis.ping())

    async def close(self) -> None:
        await self.redis.aclose()

    async def admit(self, record: PromptRecord, admission: Admission, *, number: float | None = None,
                    front: bool = False) -> int:
        k = self.keys
        t = record.tenant
        pairs: list[str] = []
        for name, value in record.to_fields().items():
            pairs += [name, value]
        active = k.active(t, record.client_id) if record.client_id is not None else ""
        minute, to_minute, day, to_day = quota_windows(admission.now)

        def limit(value: float | None) -> str:
            return "" if value is None else repr(value)

        result = await self._script(
            self._admit, [k.seq, k.queue, k.prompt(record.prompt_id), active, k.tenant_active(t), k.vclock, k.vfinish,
                          k.claims, k.vclaimed],
            ["" if number is None else repr(number), "1" if front else "0", record.prompt_id, t,
             repr(admission.weight), limit(admission.max_queued), limit(admission.per_minute),
             limit(admission.per_day), limit(admission.gpu_seconds_per_day), k.quota(t, "m", minute),
             k.quota(t, "d", day), k.quota(t, "g", day), to_minute, to_day, repr(admission.credit), *pairs])
        if result[0] == "duplicate":
            raise DuplicatePrompt(record.prompt_id)
        if result[0] != "ok":
            raise QuotaRefused(str(result[0]), int(result[1]))
        assigned = float(result[1])
        record.number = int(assigned) if assigned.is_integer() and number is None else assigned
        return int(result[2])

    async def queued(self, limit: int | None = None) -> list[str]:
        end = -1 if limit is None else limit - 1
        return list(await self._call(self.redis.zrange(self.keys.queue, 0, end)))

    async def claim(self, prompt_id: str, backend: str, max_inflight: int, by: str = "") -> bool:
        return (await self.claim_many([(prompt_id, backend, max_inflight)], by))[0]

    async def claim_many(self, claims: list[tuple[str, str, int]], by: str = "") -> list[bool]:
        k = self.keys
        now = encode_field(time.time())
        calls = [(self._claim, [k.queue, k.inflight(backend), k.prompt(pid), k.backends, k.vclock, k.claims,
                                k.vclaimed],
                  [pid, max_inflight, encode_field(backend), encode_field(by), now])
                 for pid, backend, max_inflight in claims]
        return [bool(ok) for ok in await self._pipelined(calls)] if calls else []

    async def dispatch_view(self, limit: int, capacity: dict[str, int], members: bool = True) -> DispatchView:
        k = self.keys
        args: list[Any] = [limit, k.base, "1" if members else "0"]
        for backend, slots in capacity.items():
            args += [backend, slots]
        triples, _, rows = await self._script(self._dispatch_view, [k.backends, k.queue], args)
        cut = len(f"{k.base}:inflight:")
        names = [triples[i][cut:] for i in range(0, len(triples), 3)]
        counts = {name: int(triples[i * 3 + 1]) for i, name in enumerate(names)}
        inflight = {name: sorted(triples[i * 3 + 2]) for i, name in enumerate(names)} if members else None
        records = [PromptRecord.from_fields(dict(zip(row[::2], row[1::2], strict=True))) for row in rows if row]
        return DispatchView(dict(sorted(counts.items())), dict(sorted(inflight.items())) if inflight is not None
                            else None, records)

    async def requeue(self, prompt_id: str, from_backend: str | None = None) -> bool:
        k = self.keys
        expected = "" if from_backend is None else encode_field(from_backend)
        return bool(await self._script(self._requeue, [k.queue, k.prompt(prompt_id)], [prompt_id, k.base, expected]))

    async def mark_running(self, prompt_id: str, started_at: float) -> int | None:
        k = self.keys
        count = await self._script(self._mark_running, [k.prompt(prompt_id)], [encode_field(started_at), k.base])
        return None if count is None or int(count) < 0 else int(count)

    async def set_current_nodes(self, nodes: dict[str, str | None]) -> None:
        if not nodes:
            return
        args: list[str] = [self.keys.base]
        for prompt_id, node in nodes.items():
            args += [prompt_id, encode_field(node)]
        await self._script(self._set_current_nodes, [self.keys.queue], args)  # the key routes it

    async def finish(self, prompt_id: str, outcome: str, history: dict[str, Any], finished_at: float,
                     refs: dict[str, OutputRef] | None = None) -> int | None:
        k = self.keys

        def record(pipe: Any) -> None:
            for ref, out in (refs or {}).items():
                pipe.set(k.output(ref), out.to_json(), ex=self._ttl)

        ok, *_ = await self._pipelined([(self._finish, [k.queue, k.prompt(prompt_id), k.history, k.hseq,
                                                        k.unannounced],
                                         [prompt_id, k.base, self._ttl, encode_field(outcome), encode_field(history),
                                          encode_field(finished_at), quota_windows(finished_at)[2]])], record)
        return int(ok) - 1 if ok else None

    async def ends_to_announce(self, older_than: float, hold_s: float, limit: int = 100) -> list[str]:
        now = time.time()
        ids = await self._script(self._ends_to_announce, [self.keys.unannounced],
                                 [repr(older_than), repr(now + hold_s), limit, repr(now - UNANNOUNCED_MAX_AGE_S)])
        return [str(pid) for pid in ids]

    async def ends_announced(self, prompt_ids: list[str]) -> None:
        if prompt_ids:
            await self._pipelined([], lambda pipe: pipe.zrem(self.keys.unannounced, *prompt_ids))

    async def withdraw(self, prompt_id: str) -> str | None:
        k = self.keys
        state = await self._script(self._withdraw, [k.queue, k.prompt(prompt_id)], [prompt_id, k.base])
        return str(state) if state else None

    async def get(self, prompt_id: str) -> PromptRecord | None:
        raw = await self._call(self.redis.hgetall(self.keys.prompt(prompt_id)))
        return PromptRecord.from_fields(raw) if raw else None

    async def get_many(self, prompt_ids: list[str]) -> list[PromptRecord]:
        if not prompt_ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for pid in prompt_ids:
                pipe.hgetall(self.keys.prompt(pid))
            rows = await self._call(pipe.execute())
        return [PromptRecord.from_fields(raw) for raw in rows if raw]

    async def count_active(self, tenant: str | None) -> int:
        if tenant is not None:
            return int(await self._call(self.redis.scard(self.keys.tenant_active(tenant))))
        queued = int(await self._call(self.redis.zcard(self.keys.queue)))
        return queued + sum(len(ids) for ids in (await self.inflight()).values())

    async def queued_by_tenant(self) -> dict[str, int]:
        flat = (await self._pipelined([(self._queued_by_tenant, [self.keys.queue], [self.keys.base])]))[0]
        return {json.loads(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def inflight(self) -> dict[str, list[str]]:
        keys = sorted(await self._call(self.redis.smembers(self.keys.backends)))
        if not keys:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.smembers(key)
            rows = await self._call(pipe.execute())
        prefix = f"{self.keys.base}:inflight:"
        return {key[len(prefix):]: sorted(ids) for key, ids in zip(keys, rows, strict=True)}

    async def active_prompts(self, tenant: str, client_id: str) -> list[str]:
        return sorted(await self._call(self.redis.smembers(self.keys.active(tenant, client_id))))

    async def history_ids(self) -> list[str]:
        ids = list(await self._call(self.redis.zrange(self.keys.history, 0, -1)))
        if not ids:
            return ids
        # Records expire on their own; drop index entries whose record is gone.
        async with self.redis.pipeline(transaction=False) as pipe:
            for pid in ids:
                pipe.exists(self.keys.prompt(pid))
            alive = await self._call(pipe.execute())
        gone = [pid for pid, ok in zip(ids, alive, strict=True) if not ok]
        if gone:
            await self._call(self.redis.zrem(self.keys.history, *gone))
        return [pid for pid, ok in zip(ids, alive, strict=True) if ok]

    async def forget_history(self, prompt_ids: list[str]) -> None:
        if prompt_ids:
            await self._script(self._forget, [self.keys.history], [self.keys.base, *prompt_ids])

    async def record_outputs(self, refs: dict[str, OutputRef]) -> None:
        if not refs:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for ref, out in refs.items():
                pipe.set(self.keys.output(ref), out.to_json(), ex=self._ttl)
            await self._call(pipe.execute())

    async def set_drained(self, backend: str, drained: bool) -> None:
        op = self.redis.sadd if drained else self.redis.srem
        await self._call(op(self.keys.drained, backend))

    async def drained(self) -> set[str]:
        return set(await self._call(self.redis.smembers(self.keys.drained)))

    async def share_speeds(self, figures: dict[str, dict[str, float]]) -> None:
        if figures:
            await self._call(self.redis.hset(self.keys.speeds, mapping={
                backend: encode_field(f) for backend, f in figures.items()}))

    async def shared_speeds(self) -> dict[str, dict[str, float]]:
        raw = await self._call(self.redis.hgetall(self.keys.speeds))
        return {backend: json.loads(value) for backend, value in raw.items()}

    async def hold_lease(self, name: str, owner: str, ttl_ms: int) -> bool:
        k = self.keys
        return bool(await self._script(self._hold_lease, [k.lease(name), k.leases], [owner, ttl_ms, name]))

    async def drop_lease(self, name: str, owner: str) -> None:
        await self._script(self._drop_lease, [self.keys.lease(name)], [owner])

    async def lease_holders(self) -> dict[str, str]:
        names = sorted(await self._call(self.redis.smembers(self.keys.leases)))
        if not names:
            return {}
        owners = await self._call(self.redis.mget([self.keys.lease(n) for n in names]))
        gone = [n for n, o in zip(names, owners, strict=True) if o is None]
        if gone:   # expired leases (replicas that went away) leave the index too
            await self._call(self.redis.srem(self.keys.leases, *gone))
        return {n: o for n, o in zip(names, owners, strict=True) if o is not None}

    async def resolve_output(self, ref: str) -> OutputRef | None:
        raw = await self._call(self.redis.get(self.keys.output(ref)))
        return OutputRef.from_json(raw) if raw else None

