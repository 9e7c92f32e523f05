"""The in-process store: the default for one replica. Each operation runs without an await inside, so
asyncio makes it atomic just as a Lua script does in Redis. Finished records expire after the TTL."""

from __future__ import annotations

import heapq
import itertools
import time
from collections import OrderedDict
from typing import Any

from proxy.store.base import (
    DISPATCHED,
    FINISHED,
    HISTORY_LIMIT,
    QUEUED,
    RETENTION_GRACE_S,
    RUNNING,
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
    backoff,
    quota_windows,
)
from proxy.store.memory_outbox import MemoryOutbox


class MemoryStore(MemoryOutbox):
    def __init__(self, finished_ttl_s: int = 7 * 24 * 3600, clock: Any = time.time) -> None:
        super().__init__()
        self._ttl = finished_ttl_s
        self._clock = clock
        self._records: dict[str, PromptRecord] = {}
        self._queue: dict[str, float] = {}               # prompt_id -> number (lower runs first)
        self._inflight: dict[str, set[str]] = {}
        self._active: dict[tuple[str, str], set[str]] = {}
        self._history: OrderedDict[str, float] = OrderedDict()   # prompt_id -> when its record expires
        self._unannounced: dict[str, float] = {}   # prompt_id -> from when a sweep may announce its end
        self._outputs: dict[str, tuple[OutputRef, float]] = {}   # ref -> (where, when the reference expires)
        self._copies: dict[str, float] = {}        # ref -> when its copy is due
        self._copy_failures: dict[str, int] = {}
        self._expiry: dict[str, float] = {}        # ref of a stored copy -> when retention removes it
        self._kept: dict[str, OutputRef] = {}      # ref of a stored copy -> its reference, until retention
        self._storage: dict[str, int] = {}         # tenant -> bytes of its copies
        self._secrets: dict[str, str] = {}
        self._seq = itertools.count()
        self._drained: set[str] = set()
        self._members: dict[str, Member] = {}
        self._catalogue: dict[str, Any] | None = None
        self._speeds: dict[str, dict[str, float]] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._sockets: dict[str, tuple[str, float]] = {}   # registered socket id → (tenant, until)
        self._tenant_active: dict[str, set[str]] = {}
        self._vclock = 0.0
        self._vfinish: dict[str, float] = {}
        self._claims = 0                       # prompts claimed ever (redis: `claims`)
        self._claimed_at: dict[str, int] = {}  # tenant → `_claims` when one of its prompts was last claimed
        self._windows: dict[tuple[str, str], tuple[int, float]] = {}  # (tenant, kind) -> (window, used)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _used(self, tenant: str, kind: str, window: int) -> float:
        held = self._windows.get((tenant, kind))
        return held[1] if held is not None and held[0] == window else 0.0

    def _add(self, tenant: str, kind: str, window: int, amount: float) -> None:
        self._windows[(tenant, kind)] = (window, self._used(tenant, kind, window) + amount)

    def _check_quota(self, tenant: str, adm: Admission) -> None:
        minute, to_minute, day, to_day = quota_windows(adm.now)
        if adm.max_queued is not None and len(self._tenant_active.get(tenant, ())) >= adm.max_queued:
            raise QuotaRefused("max_queued", 1)
        if adm.per_minute is not None and self._used(tenant, "m", minute) >= adm.per_minute:
            raise QuotaRefused("per_minute", to_minute)
        if adm.per_day is not None and self._used(tenant, "d", day) >= adm.per_day:
            raise QuotaRefused("per_day", to_day)
        if adm.gpu_seconds_per_day is not None and self._used(tenant, "g", day) >= adm.gpu_seconds_per_day:
            raise QuotaRefused("gpu_seconds_per_day", to_day)

    async def admit(self, record: PromptRecord, admission: Admission, *, number: float | None = None,
                    front: bool = False) -> int:
        self._expire()
        if record.prompt_id in self._records:
            raise DuplicatePrompt(record.prompt_id)
        tenant = record.tenant
        self._check_quota(tenant, admission)
        minute, _, day, _ = quota_windows(admission.now)
        self._add(tenant, "m", minute, 1)
        self._add(tenant, "d", day, 1)
        seq = next(self._seq)
        record.number = number if number is not None else (-seq if front else seq)
        if front:
            record.score = self._vclock - admission.credit - 1.0
        else:
            finish = self._vfinish.get(tenant, float("-inf"))
            if admission.credit > 0 and not self._tenant_active.get(tenant) \
                    and self._claims - self._claimed_at.get(tenant, 0) >= admission.credit:
                finish = float("-inf")   # back from idle (Store.admit)
            record.score = max(self._vclock - admission.credit, finish)
            self._vfinish[tenant] = record.score + 1.0 / admission.weight
        record.state = QUEUED
        self._records[record.prompt_id] = record.copy()
        self._queue[record.prompt_id] = record.score
        self._tenant_active.setdefault(tenant, set()).add(record.prompt_id)
        if record.client_id is not None:
            self._active.setdefault((record.tenant, record.client_id), set()).add(record.prompt_id)
        return len(self._tenant_active[tenant])

    async def queued(self, limit: int | None = None) -> list[str]:
        def order(pid: str) -> tuple[float, str]:
            return self._queue[pid], pid
        if limit is None:
            return sorted(self._queue, key=order)
        return heapq.nsmallest(limit, self._queue, key=order)

    async def claim(self, prompt_id: str, backend: str, max_inflight: int, by: str = "") -> bool:
        slots = self._inflight.setdefault(backend, set())
        if len(slots) >= max_inflight or prompt_id not in self._queue or backend in self._drained:
            return False
        score = self._queue.pop(prompt_id)
        self._vclock = max(self._vclock, score)
        slots.add(prompt_id)
        rec = self._records[prompt_id]
        rec.state, rec.backend, rec.attempts = DISPATCHED, backend, rec.attempts + 1
        rec.dispatcher, rec.dispatched_at = by, self._clock()
        self._claims += 1
        self._claimed_at[rec.tenant] = self._claims
        return True

    async def claim_many(self, claims: list[tuple[str, str, int]], by: str = "") -> list[bool]:
        return [await self.claim(*c, by=by) for c in claims]

    async def dispatch_view(self, limit: int, capacity: dict[str, int], members: bool = True) -> DispatchView:
        free = sum(max(0, slots - len(self._inflight.get(b, ()))) for b, slots in capacity.items())
        n = min(limit, 4 * free)
        counts = {name: len(ids) for name, ids in sorted(self._inflight.items())}
        return DispatchView(counts, await self.inflight() if members else None,
                            await self.get_many(await self.queued(n)) if n > 0 else [])

    async def requeue(self, prompt_id: str, from_backend: str | None = None) -> bool:
        rec = self._records.get(prompt_id)
        if rec is None or rec.state == FINISHED or (from_backend is not None and rec.backend != from_backend):
            return False
        if rec.backend is not None:
            self._inflight.get(rec.backend, set()).discard(prompt_id)
        rec.state, rec.backend, rec.current_node, rec.dispatcher, rec.dispatched_at = QUEUED, None, None, None, None
        self._queue[prompt_id] = rec.score
        return True

    async def mark_running(self, prompt_id: str, started_at: float,
                           *, deliveries: list[Delivery] | None = None) -> int | None:
        rec = self._records.get(prompt_id)
        if rec is None or rec.state == FINISHED:
            return None
        rec.state, rec.started_at = RUNNING, started_at
        self._queue_deliveries(deliveries or [])
        return len(self._tenant_active.get(rec.tenant, ()))

    async def set_current_nodes(self, nodes: dict[str, str | None]) -> None:
        for prompt_id, node in nodes.items():
            rec = self._records.get(prompt_id)
            if rec is not None and rec.state != FINISHED:
                rec.current_node = node

    async def finish(self, prompt_id: str, outcome: str, history: dict[str, Any], finished_at: float,
                     refs: dict[str, OutputRef] | None = None,
                     *, deliveries: list[Delivery] | None = None) -> int | None:
        if refs:
            await self.record_outputs(refs)
        rec = self._records.get(prompt_id)
        if rec is None or rec.state == FINISHED:
            return None
        self._queue.pop(prompt_id, None)
        if rec.backend is not None:
            self._inflight.get(rec.backend, set()).discard(prompt_id)
        self._release(rec)
        if rec.started_at is not None:
            _, _, day, _ = quota_windows(finished_at)
            self._add(rec.tenant, "g", day, max(finished_at - rec.started_at, 0.0))
        rec.state, rec.outcome, rec.history, rec.finished_at = FINISHED, outcome, history, finished_at
        rec.current_node = None
        self._history[prompt_id] = self._clock() + self._ttl
        while len(self._history) > HISTORY_LIMIT:
            dropped, _ = self._history.popitem(last=False)
            self._records.pop(dropped, None)
        self._unannounced[prompt_id] = finished_at
        self._queue_deliveries(deliveries or [])
        if len(self._unannounced) > UNANNOUNCED_LIMIT:
            del self._unannounced[min(self._unannounced, key=self._unannounced.__getitem__)]
        return len(self._tenant_active.get(rec.tenant, ()))

    async def ends_to_announce(self, older_than: float, hold_s: float, limit: int = 100) -> list[str]:
        now = self._clock()
        for pid, at in list(self._unannounced.items()):
            if at < now - UNANNOUNCED_MAX_AGE_S:
                del self._unannounced[pid]
        due = sorted((at, pid) for pid, at in self._unannounced.items() if at <= older_than)[:limit]
        for _, pid in due:
            self._unannounced[pid] = now + hold_s
        return [pid for _, pid in due]

    async def ends_announced(self, prompt_ids: list[str]) -> None:
        for pid in prompt_ids:
            self._unannounced.pop(pid, None)

    async def withdraw(self, prompt_id: str, *, deliveries: list[Delivery] | None = None) -> str | None:
        rec = self._records.get(prompt_id)
        if rec is None or rec.state not in (QUEUED, DISPATCHED):
            return None
        self._queue_deliveries(deliveries or [])
        self._queue.pop(prompt_id, None)
        if rec.backend is not None:
            self._inflight.get(rec.backend, set()).discard(prompt_id)
        self._release(rec)
        del self._records[prompt_id]
        return rec.state

    def _release(self, rec: PromptRecord) -> None:
        """Give back the quota slot and the client's queue count: on every way a prompt ends."""
        self._tenant_active.get(rec.tenant, set()).discard(rec.prompt_id)
        if rec.client_id is not None:
            self._active.get((rec.tenant, rec.client_id), set()).discard(rec.prompt_id)

    async def get(self, prompt_id: str) -> PromptRecord | None:
        rec = self._records.get(prompt_id)
        return None if rec is None else rec.copy()

    async def get_many(self, prompt_ids: list[str]) -> list[PromptRecord]:
        return [rec.copy() for pid in prompt_ids if (rec := self._records.get(pid)) is not None]

    async def count_active(self, tenant: str | None) -> int:
        if tenant is None:
            return sum(len(ids) for ids in self._tenant_active.values())
        return len(self._tenant_active.get(tenant, ()))

    async def queued_by_tenant(self) -> dict[str, int]:
        return {tenant: n for tenant, (n, _) in (await self.queue_summary()).items()}

    async def queue_summary(self) -> dict[str, tuple[int, float]]:
        out: dict[str, tuple[int, float]] = {}
        for pid in self._queue:
            rec = self._records[pid]
            n, oldest = out.get(rec.tenant, (0, rec.created_at))
            out[rec.tenant] = (n + 1, min(oldest, rec.created_at))
        return out

    async def inflight(self) -> dict[str, list[str]]:
        return {name: sorted(ids) for name, ids in self._inflight.items()}

    async def inflight_at(self, backend: str) -> list[str]:
        return sorted(self._inflight.get(backend, ()))

    async def active_prompts(self, tenant: str, client_id: str) -> list[str]:
        return sorted(self._active.get((tenant, client_id), ()))

    async def history_ids(self) -> list[str]:
        self._expire()
        return list(self._history)

    async def history_tail(self, limit: int) -> list[str]:
        return list(itertools.islice(reversed(self._history), limit))

    async def forget_history(self, prompt_ids: list[str]) -> None:
        for pid in prompt_ids:
            if self._history.pop(pid, None) is not None:
                self._records.pop(pid, None)

    async def record_outputs(self, refs: dict[str, OutputRef]) -> None:
        now = self._clock()
        for ref, out in refs.items():
            if ref in self._outputs and self._outputs[ref][1] >= now:
                continue   # recorded once: a history read again must not undo a copy
            self._outputs[ref] = (out, now + self._ttl)
            if out.keep:
                self._copies.setdefault(ref, now)

    async def copies_due(self, now: float, lease_s: float, limit: int) -> list[str]:
        due = sorted((at, ref) for ref, at in self._copies.items() if at <= now)[:limit]
        for _, ref in due:
            self._copies[ref] = now + lease_s
        return [ref for _, ref in due]

    async def copy_done(self, ref: str, out: OutputRef) -> bool:
        self._copies.pop(ref, None)
        self._copy_failures.pop(ref, None)
        if ref not in self._outputs or self._outputs[ref][1] < self._clock():
            return False
        self._outputs[ref] = (out, out.expires + RETENTION_GRACE_S)
        if ref not in self._kept:   # counted once, should two copiers both finish it
            self._kept[ref] = out
            self._storage[out.tenant] = self._storage.get(out.tenant, 0) + out.size
        self._expiry[ref] = out.expires
        return True

    async def copy_failed(self, ref: str, now: float, backoff_s: float, cap_s: float) -> int:
        if ref not in self._copies:
            return 0   # done or dropped meanwhile
        failures = self._copy_failures[ref] = self._copy_failures.get(ref, 0) + 1
        self._copies[ref] = now + backoff(failures, backoff_s, cap_s)
        return failures

    async def copy_dropped(self, ref: str) -> None:
        self._copies.pop(ref, None)
        self._copy_failures.pop(ref, None)

    async def copy_backlog(self) -> int:
        return len(self._copies)

    async def files_expired(self, now: float, lease_s: float, limit: int) -> dict[str, OutputRef]:
        due = sorted((at, ref) for ref, at in self._expiry.items() if at <= now)[:limit]
        out: dict[str, OutputRef] = {}
        for _, ref in due:
            self._expiry[ref] = now + lease_s
            if ref in self._kept:
                out[ref] = self._kept[ref]
            else:
                del self._expiry[ref]
        return out

    async def files_removed(self, refs: dict[str, OutputRef]) -> None:
        for ref, out in refs.items():
            self._expiry.pop(ref, None)
            if self._kept.pop(ref, None) is not None:
                self._storage[out.tenant] = max(self._storage.get(out.tenant, 0) - out.size, 0)
            self._outputs.pop(ref, None)

    async def storage_used(self) -> dict[str, int]:
        return {tenant: n for tenant, n in self._storage.items() if n}

    async def shared_secret(self, name: str, candidate: str) -> str:
        return self._secrets.setdefault(name, candidate)

    async def resolve_output(self, ref: str) -> OutputRef | None:
        entry = self._outputs.get(ref)
        now = self._clock()
        if entry is None or entry[1] < now or (entry[0].expires and entry[0].expires <= now):
            return None
        return entry[0]

    async def members(self) -> dict[str, Member]:
        return dict(self._members)

    async def member_put(self, member: Member) -> None:
        self._members[member.name] = member

    async def member_drop(self, name: str) -> None:
        self._members.pop(name, None)

    async def catalogue_put(self, object_info: dict[str, Any]) -> None:
        self._catalogue = object_info

    async def catalogue(self) -> dict[str, Any] | None:
        return self._catalogue

    async def set_drained(self, backend: str, drained: bool) -> None:
        (self._drained.add if drained else self._drained.discard)(backend)

    async def drained(self) -> set[str]:
        return set(self._drained)

    async def share_speeds(self, figures: dict[str, dict[str, float]]) -> None:
        self._speeds.update({backend: dict(f) for backend, f in figures.items()})

    async def shared_speeds(self) -> dict[str, dict[str, float]]:
        return {backend: dict(f) for backend, f in self._speeds.items()}

    async def hold_lease(self, name: str, owner: str, ttl_ms: int) -> bool:
        now = self._clock()
        held = self._leases.get(name)
        if held is not None and held[0] != owner and held[1] > now:
            return False
        self._leases[name] = (owner, now + ttl_ms / 1000)
        return True

    async def drop_lease(self, name: str, owner: str) -> None:
        if self._leases.get(name, ("", 0.0))[0] == owner:
            del self._leases[name]

    async def lease_holders(self) -> dict[str, str]:
        now = self._clock()
        return {name: owner for name, (owner, until) in self._leases.items() if until > now}

    async def hold_socket(self, cid: str, tenant: str, ttl_ms: int) -> None:
        self._sockets[cid] = (tenant, self._clock() + ttl_ms / 1000)

    async def socket_tenant(self, cid: str) -> str | None:
        held = self._sockets.get(cid)
        if held is None or held[1] <= self._clock():
            self._sockets.pop(cid, None)
            return None
        return held[0]

    async def drop_socket(self, cid: str) -> None:
        self._sockets.pop(cid, None)

    def _expire(self) -> None:
        """Drop finished records past their TTL, as Redis expiry does."""
        now = self._clock()
        while self._history:
            pid, until = next(iter(self._history.items()))
            if until > now:
                break
            self._history.popitem(last=False)
            self._records.pop(pid, None)
