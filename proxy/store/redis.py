"""The Redis store: shared state for several proxy replicas.

Every key is built by `Keys` under one prefix wrapped in a hash tag (`{prefix}:…`), so all keys of one
deployment live in one Redis Cluster slot and the Lua scripts below may touch several of them at once.
Finished prompt records and output references expire after `finished_ttl_s`.

Each script opens by naming its KEYS and ARGV as locals, in the order the Python beside it passes them.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from proxy import jsoncodec
from proxy.errors import StoreUnavailable
from proxy.store.base import (
    HISTORY_LIMIT,
    RETENTION_GRACE_S,
    UNANNOUNCED_LIMIT,
    UNANNOUNCED_MAX_AGE_S,
    Admission,
    Delivery,
    DispatchView,
    DuplicatePrompt,
    Member,
    OutputRef,
    PromptRecord,
    QuotaRefused,
    encode_field,
    quota_windows,
)
from proxy.store.batching import RoundTrips
from proxy.store.connect import redis_client
from proxy.store.redis_outbox import QUEUE_DELIVERIES, RedisOutbox

log = structlog.get_logger(__name__)


class Keys:
    """Every Redis key (and the event channel) of one deployment: the one place that spells them.

    A script that learns a prompt, backend or tenant only from a record it reads (which backend holds
    the prompt, whose it is) is handed the key's `…_prefix` from here and appends what it read, as the
    helper of the same name does.
    """

    def __init__(self, prefix: str) -> None:
        self.base = "{" + prefix + "}"   # the hash tag: one Cluster slot for the whole deployment
        self.seq = self._key("seq")             # prompts admitted ever: the next prompt number
        self.hseq = self._key("hseq")           # prompts finished ever: their order in `history`
        self.queue = self._key("queue")         # queued prompt_ids by score
        self.history = self._key("history")     # finished prompt_ids by `hseq`
        self.backends = self._key("backends")   # the `inflight` sets there are
        self.vclock = self._key("vclock")       # the fair-share clock: score of the last claimed prompt
        self.drained = self._key("drained")     # backends drained by an operator
        self.leases = self._key("leases")       # names of the leases held, to list their holders
        self.events = self._key("events")       # the event bus's stream, or its pub/sub channel (proxy.relay.bus)
        self.vfinish = self._key("vfinish")     # tenant → virtual finish time of its last admitted prompt
        self.claims = self._key("claims")       # prompts claimed ever: the farm's service, counted
        self.vclaimed = self._key("vclaimed")   # tenant → `claims` when one of its prompts was last claimed
        self.speeds = self._key("speeds")       # backend → its speed figures (JSON), as last shared
        self.unannounced = self._key("unannounced")   # ends not yet confirmed sent: prompt_id by time
        self.copies = self._key("copies")       # output refs whose copy into the file store is queued: by due time
        self.copy_failures = self._key("copy-failures")   # ref → failed copy attempts so far
        self.expiry = self._key("expiry")       # refs of stored copies by when retention removes them
        self.storage = self._key("storage")     # tenant → bytes of its copies in the file store
        self.kept = self._key("kept")           # ref → its stored copy's reference (JSON), until retention
        self.secrets = self._key("secrets")     # name → a secret every replica shares (signed links)
        self.members = self._key("members")     # backend name → its membership entry (JSON; proxy.membership)
        self.catalogue = self._key("catalogue")   # the farm's merged /object_info, for admission with no backend
        self.webhooks = self._key("webhooks")   # the webhook outbox: pending delivery ids by due time
        self.webhook_age = self._key("webhook-age")         # the same ids by when they were queued
        self.webhook_failed = self._key("webhook-failed")   # given-up delivery ids by when
        self.webhook_prefix = self._key("webhook:")         # + id: the delivery (JSON), until it expires
        self.prompt_prefix = self._key("prompt:")
        self.inflight_prefix = self._key("inflight:")
        self.tenant_active_prefix = self._key("tactive:")
        self.active_prefix = self._key("active:")
        self.quota_prefix = self._key("quota:")
        self.lease_prefix = self._key("lease:")
        self.socket_prefix = self._key("socket:")   # + a registered socket's id: its tenant, while it is open
        self.output_prefix = self._key("out:")
        self.events_sent_prefix = self._key("events-sent:")

    def _key(self, name: str) -> str:
        return f"{self.base}:{name}"

    def webhook(self, delivery_id: str) -> str:
        return self.webhook_prefix + delivery_id

    def prompt(self, prompt_id: str) -> str:
        """The prompt's record (a hash of `PromptRecord` fields, JSON-encoded)."""
        return self.prompt_prefix + prompt_id

    def inflight(self, backend: str) -> str:
        """The prompt_ids dispatched to `backend` and not yet ended."""
        return self.inflight_prefix + backend

    def backend(self, inflight_key: str) -> str:
        """The backend whose `inflight` set this is."""
        return inflight_key[len(self.inflight_prefix):]

    def tenant_active(self, tenant: str) -> str:
        """The tenant's prompts queued or running."""
        return self.tenant_active_prefix + tenant

    def active(self, tenant: str, client_id: str) -> str:
        """One client's prompts queued or running (`_RELEASE` appends `tenant:client_id` the same way)."""
        return f"{self.active_prefix}{tenant}:{client_id}"

    def quota(self, tenant: str, kind: str, window: int) -> str:
        """A tenant's use in one quota window: `m` prompts a minute, `d` a day, `g` GPU seconds a day
        (`_FINISH` appends `tenant:g:day` the same way)."""
        return f"{self.quota_prefix}{tenant}:{kind}:{window}"

    def events_sent(self, origin: str) -> str:
        """One replica's marker: the seq of the last batch its bus wrote to the `events` stream
        (proxy.relay.streams)."""
        return self.events_sent_prefix + origin

    def lease(self, name: str) -> str:
        return self.lease_prefix + name

    def socket(self, cid: str) -> str:
        """A registered socket's tenant (ComfyAPI's `websocket_cid`), expiring unless renewed."""
        return self.socket_prefix + cid

    def output(self, ref: str) -> str:
        """Where the output a client knows as `ref` really lives (`OutputRef`, JSON)."""
        return self.output_prefix + ref


_ADMIT = """
local seq, queue, prompt, tenant_active, vclock, vfinish, claims, vclaimed = unpack(KEYS, 1, 8)
local minute_quota, day_quota, gpu_quota = KEYS[9], KEYS[10], KEYS[11]
local active = KEYS[12]   -- the client's set; none without a client_id
local number, front, prompt_id, tenant, weight = ARGV[1], ARGV[2] == '1', ARGV[3], ARGV[4], ARGV[5]
local max_queued, per_minute, per_day, gpu_per_day = ARGV[6], ARGV[7], ARGV[8], ARGV[9]   -- '' for no limit
local to_minute, to_day, credit = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local FIELDS = 13   -- ARGV[13...]: the record's field / value pairs

if redis.call('EXISTS', prompt) == 1 then return {'duplicate'} end
if max_queued ~= '' and redis.call('SCARD', tenant_active) >= tonumber(max_queued) then return {'max_queued', 1} end
local used_m = tonumber(redis.call('GET', minute_quota) or '0')
if per_minute ~= '' and used_m >= tonumber(per_minute) then return {'per_minute', to_minute} end
local used_d = tonumber(redis.call('GET', day_quota) or '0')
if per_day ~= '' and used_d >= tonumber(per_day) then return {'per_day', to_day} end
local used_g = tonumber(redis.call('GET', gpu_quota) or '0')
if gpu_per_day ~= '' and used_g >= tonumber(gpu_per_day) then return {'gpu_seconds_per_day', to_day} end
redis.call('INCR', minute_quota); redis.call('EXPIRE', minute_quota, 120)
redis.call('INCR', day_quota); redis.call('EXPIRE', day_quota, 172800)
local admitted = redis.call('INCR', seq) - 1
if number == '' then
  if front then number = tostring(-admitted) else number = tostring(admitted) end
end
local clock = tonumber(redis.call('GET', vclock) or '0') - credit
local score = clock - 1
if not front then
  score = clock
  local finish = redis.call('HGET', vfinish, tenant)
  if finish and credit > 0 and redis.call('SCARD', tenant_active) == 0 then
    local served = tonumber(redis.call('GET', claims) or '0') - tonumber(redis.call('HGET', vclaimed, tenant) or '0')
    if served >= credit then finish = nil end
  end
  if finish and tonumber(finish) > score then score = tonumber(finish) end
  redis.call('HSET', vfinish, tenant, tostring(score + 1.0 / tonumber(weight)))
end
redis.call('HSET', prompt, unpack(ARGV, FIELDS))
redis.call('HSET', prompt, 'number', number, 'score', tostring(score), 'state', '"queued"')
redis.call('ZADD', queue, score, prompt_id)
redis.call('SADD', tenant_active, prompt_id)
if active then redis.call('SADD', active, prompt_id) end
return {'ok', number, redis.call('SCARD', tenant_active)}
"""

_CLAIM = """
local queue, inflight, prompt, backends, vclock, claims, vclaimed, drained = unpack(KEYS, 1, 8)
local prompt_id, max_inflight, backend, dispatcher, dispatched_at, name = unpack(ARGV, 1, 6)   -- 3..5 JSON

if redis.call('SCARD', inflight) >= tonumber(max_inflight) then return 0 end
if redis.call('SISMEMBER', drained, name) == 1 then return 0 end   -- drained on any replica: at once
local score = redis.call('ZSCORE', queue, prompt_id)
if not score then return 0 end
redis.call('ZREM', queue, prompt_id)
if tonumber(score) > tonumber(redis.call('GET', vclock) or '0') then redis.call('SET', vclock, score) end
redis.call('SADD', inflight, prompt_id)
redis.call('SADD', backends, inflight)
redis.call('HSET', prompt, 'state', '"dispatched"', 'backend', backend, 'dispatcher', dispatcher,
           'dispatched_at', dispatched_at)
redis.call('HINCRBY', prompt, 'attempts', 1)
redis.call('HSET', vclaimed, cjson.decode(redis.call('HGET', prompt, 'tenant') or '""'), redis.call('INCR', claims))
return 1
"""

_REQUEUE = """
local queue, prompt = KEYS[1], KEYS[2]
local prompt_id, inflight_prefix, from_backend = ARGV[1], ARGV[2], ARGV[3]   -- from_backend: JSON, '' for any

local st = redis.call('HMGET', prompt, 'state', 'backend', 'score')
if not st[1] or st[1] == '"finished"' then return 0 end
if from_backend ~= '' and st[2] ~= from_backend then return 0 end
if st[2] and st[2] ~= 'null' then
  redis.call('SREM', inflight_prefix .. cjson.decode(st[2]), prompt_id)
end
redis.call('HSET', prompt, 'state', '"queued"', 'backend', 'null', 'current_node', 'null', 'dispatcher', 'null',
           'dispatched_at', 'null')
redis.call('ZADD', queue, st[3], prompt_id)
return 1
"""

# Shared by the scripts that end a prompt: its queue entry, slot, quota slot and client count go.
# `st` is HMGET state, backend, client_id, tenant of the prompt's record.
_RELEASE = """
local function release(prompt_id, st, queue, inflight_prefix, tenant_active_prefix, active_prefix)
  redis.call('ZREM', queue, prompt_id)
  local tenant = cjson.decode(st[4])
  redis.call('SREM', tenant_active_prefix .. tenant, prompt_id)
  if st[2] and st[2] ~= 'null' then redis.call('SREM', inflight_prefix .. cjson.decode(st[2]), prompt_id) end
  if st[3] and st[3] ~= 'null' then
    redis.call('SREM', active_prefix .. tenant .. ':' .. cjson.decode(st[3]), prompt_id)
  end
end
"""

# Returns 0 if it had finished already, else 1 + the tenant's prompts still active. The end is recorded
# as unannounced in the same step (Store.finish).
_FINISH = _RELEASE + QUEUE_DELIVERIES + """
local queue, prompt, history, hseq, unannounced = unpack(KEYS, 1, 5)
local prompt_id, ttl, outcome, history_json, finished_at, day = unpack(ARGV, 1, 6)   -- the middle three JSON
local inflight_prefix, tenant_active_prefix, active_prefix, quota_prefix = unpack(ARGV, 7, 10)

local st = redis.call('HMGET', prompt, 'state', 'backend', 'client_id', 'tenant', 'started_at')
if not st[1] or st[1] == '"finished"' then return 0 end
local tenant = cjson.decode(st[4])
if st[5] and st[5] ~= 'null' then
  local gpu = tonumber(finished_at) - tonumber(st[5])
  if gpu > 0 then
    local gpu_quota = quota_prefix .. tenant .. ':g:' .. day
    redis.call('INCRBYFLOAT', gpu_quota, gpu); redis.call('EXPIRE', gpu_quota, 172800)
  end
end
release(prompt_id, st, queue, inflight_prefix, tenant_active_prefix, active_prefix)
redis.call('HSET', prompt, 'state', '"finished"', 'outcome', outcome, 'history', history_json,
           'finished_at', finished_at, 'current_node', 'null')
redis.call('EXPIRE', prompt, tonumber(ttl))
redis.call('ZADD', history, redis.call('INCR', hseq), prompt_id)
local n = redis.call('ZCARD', history)
if n > $HISTORY_LIMIT then redis.call('ZREMRANGEBYRANK', history, 0, n - $HISTORY_LIMIT - 1) end
redis.call('ZADD', unannounced, finished_at, prompt_id)
redis.call('EXPIRE', unannounced, tonumber(ttl))
queue_deliveries(6, 11, finished_at)
local u = redis.call('ZCARD', unannounced)
if u > $UNANNOUNCED_LIMIT then redis.call('ZREMRANGEBYRANK', unannounced, 0, u - $UNANNOUNCED_LIMIT - 1) end
return 1 + redis.call('SCARD', tenant_active_prefix .. tenant)
""".replace("$HISTORY_LIMIT", str(HISTORY_LIMIT)).replace("$UNANNOUNCED_LIMIT", str(UNANNOUNCED_LIMIT))

# Claims the due ends by scoring them `hidden_until` (Store.ends_to_announce).
_ENDS_TO_ANNOUNCE = """
local unannounced = KEYS[1]
local older_than, hidden_until, limit, dropped_before = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]

redis.call('ZREMRANGEBYSCORE', unannounced, '-inf', '(' .. dropped_before)
local ids = redis.call('ZRANGEBYSCORE', unannounced, '-inf', older_than, 'LIMIT', 0, limit)
for _, prompt_id in ipairs(ids) do redis.call('ZADD', unannounced, hidden_until, prompt_id) end
return ids
"""

# Reads the records of at most min(limit, 4 x free slots) queued prompts: none when every slot is taken.
# Returns {inflight key, count, members or 0, ...}, {ids}, {HGETALL rows}.
_DISPATCH_VIEW = """
local backends, queue = KEYS[1], KEYS[2]
local limit, members, prompt_prefix = tonumber(ARGV[1]), ARGV[2] == '1', ARGV[3]
-- Then KEYS[i] (i >= 3): the inflight set of a backend available, and ARGV[i + 1]: its max_inflight.

local inflight = {}
for _, key in ipairs(redis.call('SMEMBERS', backends)) do
  inflight[#inflight + 1] = key
  inflight[#inflight + 1] = redis.call('SCARD', key)
  if members then inflight[#inflight + 1] = redis.call('SMEMBERS', key) else inflight[#inflight + 1] = 0 end
end
local free = 0
for i = 3, #KEYS do
  local left = tonumber(ARGV[i + 1]) - redis.call('SCARD', KEYS[i])
  if left > 0 then free = free + left end
end
local n = math.min(limit, 4 * free)
local ids, rows = {}, {}
if n > 0 then ids = redis.call('ZRANGE', queue, 0, n - 1) end
for i, prompt_id in ipairs(ids) do rows[i] = redis.call('HGETALL', prompt_prefix .. prompt_id) end
return {inflight, ids, rows}
"""

# Finished or missing records are left alone.
_SET_CURRENT_NODES = """
local prompts, current_nodes = KEYS, ARGV   -- each prompt's record, and its current_node (JSON)

for i, prompt in ipairs(prompts) do
  local state = redis.call('HGET', prompt, 'state')
  if state and state ~= '"finished"' then redis.call('HSET', prompt, 'current_node', current_nodes[i]) end
end
return 1
"""

# Returns the tenant's active count, -1 if gone or ended.
_MARK_RUNNING = QUEUE_DELIVERIES + """
local prompt = KEYS[1]
local started_at, tenant_active_prefix = ARGV[1], ARGV[2]   -- started_at: JSON

local st = redis.call('HMGET', prompt, 'state', 'tenant')
if not st[1] or st[1] == '"finished"' then return -1 end
redis.call('HSET', prompt, 'state', '"running"', 'started_at', started_at)
queue_deliveries(2, 3, started_at)
return redis.call('SCARD', tenant_active_prefix .. cjson.decode(st[2]))
"""

# Take when free, renew when ours.
_HOLD_LEASE = """
local lease, leases = KEYS[1], KEYS[2]
local owner, ttl_ms, name = ARGV[1], tonumber(ARGV[2]), ARGV[3]

local holder = redis.call('GET', lease)
if holder and holder ~= owner then return 0 end
redis.call('SET', lease, owner, 'PX', ttl_ms)
redis.call('SADD', leases, name)
return 1
"""

_DROP_LEASE = """
local lease = KEYS[1]
local owner = ARGV[1]

if redis.call('GET', lease) == owner then redis.call('DEL', lease) end
return 1
"""

# Only finished prompts (those in history) are deleted.
_FORGET = """
local history = KEYS[1]   -- then KEYS[i + 1]: the record of prompt_ids[i]
local prompt_ids = ARGV

for i, prompt_id in ipairs(prompt_ids) do
  if redis.call('ZREM', history, prompt_id) == 1 then redis.call('DEL', KEYS[i + 1]) end
end
return 1
"""

# Returns the state it withdrew the prompt from, false if none or past dispatch.
_WITHDRAW = _RELEASE + QUEUE_DELIVERIES + """
local queue, prompt = KEYS[1], KEYS[2]
local prompt_id, inflight_prefix, tenant_active_prefix, active_prefix, now = unpack(ARGV, 1, 5)

local st = redis.call('HMGET', prompt, 'state', 'backend', 'client_id', 'tenant')
if not st[1] or (st[1] ~= '"queued"' and st[1] ~= '"dispatched"') then return false end
release(prompt_id, st, queue, inflight_prefix, tenant_active_prefix, active_prefix)
redis.call('DEL', prompt)
queue_deliveries(3, 6, now)
return cjson.decode(st[1])
"""

# Queued prompts per tenant as {tenant (JSON), count, ...}: one round trip and no per-prompt reply however
# long the queue (the gauge sampler reads it every poll).
_QUEUED_BY_TENANT = """
local queue = KEYS[1]
local prompt_prefix = ARGV[1]

local counts, oldest = {}, {}
for _, prompt_id in ipairs(redis.call('ZRANGE', queue, 0, -1)) do
  local row = redis.call('HMGET', prompt_prefix .. prompt_id, 'tenant', 'created_at')
  local tenant = row[1]
  if tenant then
    counts[tenant] = (counts[tenant] or 0) + 1
    local created = tonumber(row[2]) or 0
    if not oldest[tenant] or created < oldest[tenant] then oldest[tenant] = created end
  end
end
local out = {}
for tenant, n in pairs(counts) do
  out[#out + 1] = tenant; out[#out + 1] = n; out[#out + 1] = string.format('%.6f', oldest[tenant])
end
return out
"""


# Each reference is recorded once (SET NX): a history read again must not undo a recorded copy. A new one
# marked `keep` queues its copy, due now.
_RECORD = """
local copies = KEYS[1]
local ttl, now = ARGV[1], ARGV[2]   -- then per reference key: its JSON, keep ('1' or '0'), the ref

for i = 2, #KEYS do
  local j = 3 + (i - 2) * 3
  if redis.call('SET', KEYS[i], ARGV[j], 'NX', 'EX', ttl) and ARGV[j + 1] == '1' then
    redis.call('ZADD', copies, 'NX', now, ARGV[j + 2])
  end
end
return #KEYS - 1
"""

# Claim due members of a schedule (copies, expiry): each moves to `hold_until`, so it comes back to
# whoever sweeps next if its claimer dies. With a `kept` hash (the expiry schedule), each comes with the
# copy's reference as it was recorded, and members without one leave the schedule.
_CLAIM_DUE = """
local schedule, kept = KEYS[1], KEYS[2]   -- kept: none for the copy queue
local now, hold_until, limit = ARGV[1], ARGV[2], ARGV[3]

local out = {}
for _, ref in ipairs(redis.call('ZRANGEBYSCORE', schedule, '-inf', now, 'LIMIT', 0, limit)) do
  local raw = kept and redis.call('HGET', kept, ref)
  if kept and not raw then
    redis.call('ZREM', schedule, ref)
  else
    redis.call('ZADD', schedule, hold_until, ref)
    out[#out + 1] = ref
    if raw then out[#out + 1] = raw end
  end
end
return out
"""

# `kept` holds every stored copy's reference without expiry, so retention finds what to delete and whose
# bytes to uncount even if the reference itself has expired meanwhile.
_COPY_DONE = """
local out, copies, failures, expiry, storage, kept = unpack(KEYS, 1, 6)
local ref, json, expires, keep_until, tenant, size = unpack(ARGV, 1, 6)

redis.call('ZREM', copies, ref)
redis.call('HDEL', failures, ref)
if redis.call('EXISTS', out) == 0 then return 0 end
redis.call('SET', out, json, 'EXAT', keep_until)
if redis.call('HSETNX', kept, ref, json) == 1 then   -- counted once, should two replicas both copy it
  redis.call('HINCRBY', storage, tenant, size)
end
redis.call('ZADD', expiry, expires, ref)
return 1
"""

_COPY_FAILED = """
local copies, failures = KEYS[1], KEYS[2]
local ref, now, base, cap, jitter = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])

if not redis.call('ZSCORE', copies, ref) then return 0 end   -- done or dropped meanwhile
local n = redis.call('HINCRBY', failures, ref, 1)
redis.call('ZADD', copies, now + math.min(cap, base * 2 ^ math.min(n - 1, 30)) * jitter, ref)   -- base.backoff
return n
"""

_FILES_REMOVED = """
local expiry, storage, kept = KEYS[1], KEYS[2], KEYS[3]
local out_prefix = ARGV[1]   -- then per file: ref, tenant, size

for i = 2, #ARGV, 3 do
  local ref, tenant, size = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  redis.call('ZREM', expiry, ref)
  if redis.call('HDEL', kept, ref) == 1 and redis.call('HINCRBY', storage, tenant, -size) < 0 then
    redis.call('HSET', storage, tenant, 0)
  end
  redis.call('DEL', out_prefix .. ref)
end
return 1
"""


class RedisStore(RedisOutbox):
    def __init__(self, url: str, key_prefix: str = "comfy-proxy", finished_ttl_s: int = 7 * 24 * 3600,
                 client: aioredis.Redis | None = None, *, replica_acks: int = 0) -> None:
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
        self._record = self.redis.register_script(_RECORD)
        self._claim_due = self.redis.register_script(_CLAIM_DUE)
        self._copy_done = self.redis.register_script(_COPY_DONE)
        self._copy_failed = self.redis.register_script(_COPY_FAILED)
        self._files_removed = self.redis.register_script(_FILES_REMOVED)
        self._register_outbox()
        if replica_acks and isinstance(self.redis, RedisCluster):
            log.warning("replica_acks_not_on_cluster", replica_acks=replica_acks)
            replica_acks = 0
        self._round_trips = RoundTrips(self.redis, replica_acks)
        self._closed = False

    async def _call(self, coro: Any) -> Any:
        if self._closed:
            coro.close()
            raise StoreUnavailable("The state store is closed", "the proxy is stopping")
        try:
            return await coro
        except (RedisError, OSError) as exc:
            raise StoreUnavailable("The state store is unavailable", str(exc)) from exc

    async def _pipelined(self, calls: list[tuple[Any, list[str], list[Any]]],
                         extra: Callable[[Any], None] | None = None) -> list[Any]:
        """Script calls (and `extra` plain commands after them) in one round trip, shared with whatever
        else this turn of the event loop asks the store (proxy.store.batching)."""
        if self._closed:
            raise StoreUnavailable("The state store is closed", "the proxy is stopping")
        return await self._round_trips.submit(calls, extra)

    async def _script(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        return (await self._pipelined([(script, keys, args)]))[0]

    async def ping(self) -> None:
        """The server that holds the deployment's keys answers: on a Cluster, the primary of their slot (any
        node would answer while that one is down)."""
        await self._call(self._ping_slot() if isinstance(self.redis, RedisCluster) else self.redis.ping())

    async def _ping_slot(self) -> None:
        cluster: RedisCluster = self.redis   # type: ignore[assignment]
        try:
            await cluster.initialize()   # the slot map, learnt on the first call
            node = cluster.get_node_from_key(self.keys.base)
        except RedisClusterException as exc:   # no node serves the slot now (not a RedisError)
            raise RedisError(str(exc)) from exc
        await cluster.execute_command("PING", target_nodes=node)

    async def close(self) -> None:
        """A call after this is refused: redis-py's pool would quietly open a new connection for it (a
        write-behind task finishing while the proxy stops), which nothing would ever close."""
        self._closed = True
        await self._round_trips.close()
        await self.redis.aclose()

    async def admit(self, record: PromptRecord, admission: Admission, *, number: float | None = None,
                    front: bool = False) -> int:
        k = self.keys
        t = record.tenant
        pairs: list[str] = []
        for name, value in record.to_fields().items():
            pairs += [name, value]
        minute, to_minute, day, to_day = quota_windows(admission.now)

        def limit(value: float | None) -> str:
            return "" if value is None else repr(value)

        keys = [k.seq, k.queue, k.prompt(record.prompt_id), k.tenant_active(t), k.vclock, k.vfinish, k.claims,
                k.vclaimed, k.quota(t, "m", minute), k.quota(t, "d", day), k.quota(t, "g", day)]
        if record.client_id is not None:   # none without: an empty name hashes to a slot a Cluster refuses
            keys.append(k.active(t, record.client_id))
        result = await self._script(
            self._admit, keys,
            ["" if number is None else repr(number), "1" if front else "0", record.prompt_id, t,
             repr(admission.weight), limit(admission.max_queued), limit(admission.per_minute),
             limit(admission.per_day), limit(admission.gpu_seconds_per_day), to_minute, to_day,
             repr(admission.credit), *pairs])
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
                                k.vclaimed, k.drained],
                  [pid, max_inflight, encode_field(backend), encode_field(by), now, backend])
                 for pid, backend, max_inflight in claims]
        return [bool(ok) for ok in await self._pipelined(calls)] if calls else []

    async def dispatch_view(self, limit: int, capacity: dict[str, int], members: bool = True) -> DispatchView:
        k = self.keys
        keys = [k.backends, k.queue, *(k.inflight(backend) for backend in capacity)]
        args: list[Any] = [limit, "1" if members else "0", k.prompt_prefix, *capacity.values()]
        triples, _, rows = await self._script(self._dispatch_view, keys, args)
        names = [k.backend(triples[i]) for i in range(0, len(triples), 3)]
        counts = {name: int(triples[i * 3 + 1]) for i, name in enumerate(names)}
        inflight = {name: sorted(triples[i * 3 + 2]) for i, name in enumerate(names)} if members else None
        records = [PromptRecord.from_fields(dict(zip(row[::2], row[1::2], strict=True))) for row in rows if row]
        return DispatchView(dict(sorted(counts.items())), dict(sorted(inflight.items())) if inflight is not None
                            else None, records)

    async def requeue(self, prompt_id: str, from_backend: str | None = None) -> bool:
        k = self.keys
        expected = "" if from_backend is None else encode_field(from_backend)
        return bool(await self._script(self._requeue, [k.queue, k.prompt(prompt_id)],
                                       [prompt_id, k.inflight_prefix, expected]))

    async def mark_running(self, prompt_id: str, started_at: float,
                           *, deliveries: list[Delivery] | None = None) -> int | None:
        k = self.keys
        tail_keys, tail_args = self.delivery_tail(deliveries or [])
        count = await self._script(self._mark_running, [k.prompt(prompt_id), *tail_keys],
                                   [encode_field(started_at), k.tenant_active_prefix, *tail_args])
        return None if count is None or int(count) < 0 else int(count)

    async def set_current_nodes(self, nodes: dict[str, str | None]) -> None:
        if not nodes:
            return
        await self._script(self._set_current_nodes, [self.keys.prompt(prompt_id) for prompt_id in nodes],
                           [encode_field(node) for node in nodes.values()])

    async def finish(self, prompt_id: str, outcome: str, history: dict[str, Any], finished_at: float,
                     refs: dict[str, OutputRef] | None = None,
                     *, deliveries: list[Delivery] | None = None) -> int | None:
        k = self.keys
        tail_keys, tail_args = self.delivery_tail(deliveries or [])
        keys = [k.queue, k.prompt(prompt_id), k.history, k.hseq, k.unannounced, *tail_keys]
        args = [prompt_id, self._ttl, encode_field(outcome), encode_field(history), encode_field(finished_at),
                quota_windows(finished_at)[2], k.inflight_prefix, k.tenant_active_prefix, k.active_prefix,
                k.quota_prefix, *tail_args]
        ok, *_ = await self._pipelined([(self._finish, keys, args), *self._recording(refs or {}, finished_at)])
        return int(ok) - 1 if ok else None

    def _recording(self, refs: dict[str, OutputRef], now: float) -> list[tuple[Any, list[str], list[Any]]]:
        """The `_RECORD` call for `refs` (none for no refs)."""
        if not refs:
            return []
        keys, args = [self.keys.copies], [self._ttl, repr(now)]
        for ref, out in refs.items():
            keys.append(self.keys.output(ref))
            args += [out.to_json(), "1" if out.keep else "0", ref]
        return [(self._record, keys, args)]

    async def ends_to_announce(self, older_than: float, hold_s: float, limit: int = 100) -> list[str]:
        now = time.time()
        ids = await self._script(self._ends_to_announce, [self.keys.unannounced],
                                 [repr(older_than), repr(now + hold_s), limit, repr(now - UNANNOUNCED_MAX_AGE_S)])
        return [str(pid) for pid in ids]

    async def ends_announced(self, prompt_ids: list[str]) -> None:
        if prompt_ids:
            await self._pipelined([], lambda pipe: pipe.zrem(self.keys.unannounced, *prompt_ids))

    async def withdraw(self, prompt_id: str, *, deliveries: list[Delivery] | None = None) -> str | None:
        k = self.keys
        tail_keys, tail_args = self.delivery_tail(deliveries or [])
        now = max((d.created_at for d in deliveries or ()), default=time.time())
        state = await self._script(self._withdraw, [k.queue, k.prompt(prompt_id), *tail_keys],
                                   [prompt_id, k.inflight_prefix, k.tenant_active_prefix, k.active_prefix,
                                    repr(now), *tail_args])
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
        return {tenant: n for tenant, (n, _) in (await self.queue_summary()).items()}

    async def queue_summary(self) -> dict[str, tuple[int, float]]:
        flat = await self._script(self._queued_by_tenant, [self.keys.queue], [self.keys.prompt_prefix])
        return {json.loads(flat[i]): (int(flat[i + 1]), float(flat[i + 2])) for i in range(0, len(flat), 3)}

    async def inflight(self) -> dict[str, list[str]]:
        keys = sorted(await self._call(self.redis.smembers(self.keys.backends)))
        if not keys:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.smembers(key)
            rows = await self._call(pipe.execute())
        return {self.keys.backend(key): sorted(ids) for key, ids in zip(keys, rows, strict=True)}

    async def inflight_at(self, backend: str) -> list[str]:
        return sorted(await self._call(self.redis.smembers(self.keys.inflight(backend))))

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

    async def history_tail(self, limit: int) -> list[str]:
        return list(await self._call(self.redis.zrevrange(self.keys.history, 0, limit - 1)))

    async def forget_history(self, prompt_ids: list[str]) -> None:
        if prompt_ids:
            await self._script(self._forget, [self.keys.history, *(self.keys.prompt(pid) for pid in prompt_ids)],
                               prompt_ids)

    async def record_outputs(self, refs: dict[str, OutputRef]) -> None:
        if refs:
            await self._pipelined(self._recording(refs, time.time()))

    async def copies_due(self, now: float, lease_s: float, limit: int) -> list[str]:
        return [str(ref) for ref in await self._script(self._claim_due, [self.keys.copies],
                                                       [repr(now), repr(now + lease_s), limit])]

    async def copy_done(self, ref: str, out: OutputRef) -> bool:
        k = self.keys
        return bool(await self._script(
            self._copy_done, [k.output(ref), k.copies, k.copy_failures, k.expiry, k.storage, k.kept],
            [ref, out.to_json(), repr(out.expires), int(out.expires + RETENTION_GRACE_S), out.tenant, out.size]))

    async def copy_failed(self, ref: str, now: float, backoff_s: float, cap_s: float) -> int:
        return int(await self._script(self._copy_failed, [self.keys.copies, self.keys.copy_failures],
                                      [ref, repr(now), repr(backoff_s), repr(cap_s), repr(random.uniform(0.5, 1))]))

    async def copy_dropped(self, ref: str) -> None:
        def drop(pipe: Any) -> None:
            pipe.zrem(self.keys.copies, ref)
            pipe.hdel(self.keys.copy_failures, ref)
        await self._pipelined([], drop)

    async def copy_backlog(self) -> int:
        return int(await self._call(self.redis.zcard(self.keys.copies)))

    async def files_expired(self, now: float, lease_s: float, limit: int) -> dict[str, OutputRef]:
        flat = await self._script(self._claim_due, [self.keys.expiry, self.keys.kept],
                                  [repr(now), repr(now + lease_s), limit])
        return {str(flat[i]): OutputRef.from_json(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def files_removed(self, refs: dict[str, OutputRef]) -> None:
        if not refs:
            return
        args: list[Any] = [self.keys.output_prefix]
        for ref, out in refs.items():
            args += [ref, out.tenant, out.size]
        await self._script(self._files_removed, [self.keys.expiry, self.keys.storage, self.keys.kept], args)

    async def storage_used(self) -> dict[str, int]:
        raw = await self._call(self.redis.hgetall(self.keys.storage))
        return {tenant: int(n) for tenant, n in raw.items() if int(n) > 0}

    async def shared_secret(self, name: str, candidate: str) -> str:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hsetnx(self.keys.secrets, name, candidate)
            pipe.hget(self.keys.secrets, name)
            _, kept = await self._call(pipe.execute())
        return str(kept)

    async def members(self) -> dict[str, Member]:
        raw = await self._call(self.redis.hgetall(self.keys.members))
        return {name: Member.from_json(value) for name, value in raw.items()}

    async def member_put(self, member: Member) -> None:
        await self._call(self.redis.hset(self.keys.members, member.name, member.to_json()))

    async def member_drop(self, name: str) -> None:
        await self._call(self.redis.hdel(self.keys.members, name))

    async def catalogue_put(self, object_info: dict[str, Any]) -> None:
        await self._call(self.redis.set(self.keys.catalogue, encode_field(object_info)))

    async def catalogue(self) -> dict[str, Any] | None:
        raw = await self._call(self.redis.get(self.keys.catalogue))
        return None if raw is None else dict(jsoncodec.loads(raw))

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

    async def hold_socket(self, cid: str, tenant: str, ttl_ms: int) -> None:
        await self._call(self.redis.set(self.keys.socket(cid), tenant, px=ttl_ms))

    async def socket_tenant(self, cid: str) -> str | None:
        tenant = await self._call(self.redis.get(self.keys.socket(cid)))
        return None if tenant is None else str(tenant)

    async def drop_socket(self, cid: str) -> None:
        await self._call(self.redis.delete(self.keys.socket(cid)))

    async def resolve_output(self, ref: str) -> OutputRef | None:
        raw = await self._call(self.redis.get(self.keys.output(ref)))
        out = OutputRef.from_json(raw) if raw else None
        return None if out is None or (out.expires and out.expires <= time.time()) else out

