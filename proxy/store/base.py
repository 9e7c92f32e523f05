"""The state store's contract: prompt records, the proxy's queue, backend slots, pins and the output index.

Two implementations keep the same promises (`memory` for one replica, `redis` for many); the behavioural
tests run against both. Operations are named for what they mean in the life of a prompt (PRODUCT.md):
`admit` → `claim` (a backend slot) → `mark_running` → `finish`, with `requeue` when a dispatch fails.
Each is atomic: a Lua script in Redis, one lock-free step (no await inside) in memory.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Protocol

from proxy import jsoncodec

QUEUED = "queued"          # in the proxy's own queue
DISPATCHED = "dispatched"  # sent to a backend, not started there yet
RUNNING = "running"        # the backend sent execution_start
FINISHED = "finished"      # ended: success, error or interrupted (see `outcome`)

HISTORY_LIMIT = 10_000     # ComfyUI keeps at most this many history entries (protocol §4)
UNANNOUNCED_LIMIT = 10_000  # ends awaiting their announcement at most (the oldest go first)
UNANNOUNCED_MAX_AGE_S = 3600.0   # an end not announced within this is dropped: its client has gone
# A stored copy's reference outlives its retention by this much, so the sweeper still finds what to delete
# (a reference is unusable from `expires` on all the same).
RETENTION_GRACE_S = 86400.0
# A webhook delivery is kept this long after it was queued at least (retries go on for about a day), and as
# long as finished records otherwise, so a job's delivery state lives as long as the job.
DELIVERY_KEEP_S = 3 * 86400.0
PENDING, DELIVERED, STOPPED, FAILED = "pending", "delivered", "stopped", "failed"   # a delivery's status


def backoff(failures: int, base_s: float, cap_s: float, jitter: float | None = None) -> float:
    """Seconds to wait after the `failures`-th failure: doubling from `base_s` up to `cap_s`, then scaled by
    a jitter in [0.5, 1) so copies that failed together do not come back together."""
    spread = random.uniform(0.5, 1.0) if jitter is None else jitter
    return min(cap_s, base_s * 2 ** min(failures - 1, 30)) * spread


class DuplicatePrompt(Exception):
    """A prompt_id that the store already holds."""


class QuotaRefused(Exception):
    """Admission would break a tenant's quota: which limit, and seconds until it frees."""

    def __init__(self, limit: str, retry_after: int) -> None:
        super().__init__(limit)
        self.limit = limit
        self.retry_after = retry_after


@dataclass(frozen=True)
class Admission:
    """How to admit one prompt: its tenant's share and limits, and the clock used for quota windows."""

    weight: float = 1.0
    credit: float = 0.0   # virtual time an idle tenant may start behind the clock (`idle_tenant_credit`)
    max_queued: int | None = None
    per_minute: int | None = None
    per_day: int | None = None
    gpu_seconds_per_day: float | None = None
    now: float = 0.0

    @property
    def minute(self) -> int:
        return int(self.now // 60)

    @property
    def day(self) -> int:
        return int(self.now // 86400)


def quota_windows(now: float) -> tuple[int, int, int, int]:
    """(minute, seconds to the next minute, day, seconds to the next UTC day)."""
    minute, day = int(now // 60), int(now // 86400)
    return minute, max(1, int((minute + 1) * 60 - now)), day, max(1, int((day + 1) * 86400 - now))


@dataclass
class PromptRecord:
    """Everything the proxy knows about one prompt, from admission until its record expires."""

    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs_to_execute: list[str]
    client_id: str | None = None
    tenant: str = ""
    number: float = 0                      # shown to clients (ComfyUI's queue number)
    score: float = 0.0                     # order in the proxy's queue: fair virtual start time
    state: str = QUEUED
    backend: str | None = None
    outcome: str | None = None            # success | error | interrupted, once finished
    current_node: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    history: dict[str, Any] | None = None  # the client-facing history entry once finished
    attempts: int = 0
    dispatcher: str | None = None          # the replica that claimed it for its backend (`claim`'s `by`)
    dispatched_at: float | None = None
    webhook: dict[str, Any] | None = None  # {url, events, base} (proxy.webhooks.subscription)

    def to_fields(self) -> dict[str, str]:
        """Flat string fields, so Redis can update one field of a record without rewriting the rest."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = jsoncodec.dumps_compact(value)
        return out

    @classmethod
    def from_fields(cls, raw: dict[str, str]) -> PromptRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: jsoncodec.loads(v) for k, v in raw.items() if k in known})

    def copy(self) -> PromptRecord:
        """A shallow copy: the store's own record can change without changing the caller's. Nested values
        (the graph, extra_data, history) are shared and treated as immutable everywhere."""
        return replace(self)


def encode_field(value: Any) -> str:
    return jsoncodec.dumps_compact(value)


@dataclass(frozen=True)
class DispatchView:
    counts: dict[str, int]                 # backend → prompts in flight there
    inflight: dict[str, list[str]] | None  # backend → their ids, sorted (when asked for)
    head: list[PromptRecord]               # the first queued prompts


@dataclass(frozen=True)
class OutputRef:
    """Where a file a client was shown really lives: which backend, under which name, and whose it is;
    once copied into the file store (`proxy.files`), under which key, how large, and until when."""

    backend: str
    filename: str
    subfolder: str
    type: str
    tenant: str = ""
    prompt_id: str = ""
    keep: bool = False     # to be copied into the file store (an output, with a store configured)
    stored: str = ""       # its key in the file store once copied
    size: int = 0          # bytes, once copied
    expires: float = 0.0   # when retention removes the copy (unix time), once copied

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> OutputRef:
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class Delivery:
    """One webhook event of one prompt, in the outbox until its receiver took it (or it was given up).
    `id` is the `webhook-id` every attempt carries, so receivers drop retries they already have."""

    id: str
    prompt_id: str
    event: str             # job.started, job.completed, ...
    tenant: str
    url: str
    base: str = ""         # the proxy's address as the prompt's client saw it: links in the body start there
    created_at: float = 0.0
    admitted_at: float = 0.0   # the prompt's `created_at`: a prompt_id admitted again later is another job
    job: dict[str, Any] | None = None   # the job as it was, for events whose record is gone (a withdrawn prompt)
    status: str = PENDING  # pending | delivered | stopped (410 Gone) | failed (given up, or refused)
    attempts: int = 0
    last_error: str = ""
    last_attempt_at: float = 0.0
    delivered_at: float = 0.0
    claimed_until: float = 0.0   # set by `webhooks_due`: the claim a report must still hold to be recorded

    def to_json(self) -> str:
        return jsoncodec.dumps_compact(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Delivery:
        """Fields this version does not know (a newer replica's) are left out."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in jsoncodec.loads(raw).items() if k in known})

    def keep_until(self, ttl_s: float) -> float:
        """Kept this long after it was queued or last tried, so a delivery still being retried never expires."""
        return max(self.created_at, self.last_attempt_at) + max(ttl_s, DELIVERY_KEEP_S)


@dataclass(frozen=True)
class Member:
    """A backend in the farm's shared membership (proxy.membership): added through the API, by DNS
    discovery or by a join agent, or a config backend changed or deleted through the API."""

    name: str
    url: str
    max_inflight: int = 2
    weight: float = 1.0
    labels: tuple[str, ...] = ()
    min_vram_free_mb: int = 0
    source: str = "api"                # api | config | join | dns:<name>
    lease_until: float | None = None   # a join agent renews it; once it lapses, the backend is dead
    leaving: bool = False              # deleted: drained, and forgotten once nothing runs there
    removed: bool = False              # gone: a config backend that must not come back from the file

    def to_json(self) -> str:
        return jsoncodec.dumps_compact(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Member:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in jsoncodec.loads(raw).items() if k in known}
        values["labels"] = tuple(values.get("labels", ()))
        return cls(**values)


class Store(Protocol):
    """What the proxy needs from shared state. Every method may raise `StoreUnavailable`."""

    async def ping(self) -> None: ...

    async def close(self) -> None: ...

    async def admit(self, record: PromptRecord, admission: Admission, *, number: float | None = None,
                    front: bool = False) -> int:
        """Check the tenant's quota, record the prompt and enqueue it, setting `record.number`; returns the
        tenant's count of active prompts with it (for the `status` that follows).

        The queue is ordered by start-time fair queueing over tenants: a prompt's score is
        max(virtual clock - credit, its tenant's last virtual finish), and each prompt advances its tenant's
        finish by 1/weight; claiming a prompt moves the virtual clock to its score. One tenant's flood
        therefore queues behind itself, not in front of another tenant's next prompt. The credit is Linux
        CFS's sleeper credit: a tenant back from idle places its first `credit x weight` prompts ahead of a
        backlogged tenant's queue instead of interleaving with it, while a tenant that never goes idle runs
        ahead of the clock and never gains it. `front` puts a prompt before every credited one (next for
        dispatch) without consuming its tenant's share.

        Idleness is also counted in service, not only in virtual time: a tenant with no prompt active whose
        last prompt was claimed at least `credit` claims ago has its last finish forgotten. Virtual time
        stands still while credited prompts (scored behind the clock) are claimed, so a flood that began
        with its own credit would otherwise keep that lead over every tenant that was served just before
        it, and such a tenant's next batch would interleave with the flood instead of going ahead. Going
        idle for an instant gains nothing: the farm must first have served `credit` other prompts.

        Raises DuplicatePrompt when the prompt_id is taken, QuotaRefused when a limit would be broken.
        """
        ...

    async def queued(self, limit: int | None = None) -> list[str]:
        """Prompt ids waiting in the proxy's queue, head first."""
        ...

    async def claim(self, prompt_id: str, backend: str, max_inflight: int, by: str = "") -> bool:
        """Take a queued prompt off the queue into a free slot of `backend`, on behalf of replica `by`
        (recorded with the time, so a prompt whose replica died before sending it can be found); false if
        the prompt or the slot is gone, or the backend is drained (`set_drained`: a drain takes effect on
        every replica at once, not at each one's next poll)."""
        ...

    async def claim_many(self, claims: list[tuple[str, str, int]], by: str = "") -> list[bool]:
        """`claim` for each (prompt_id, backend, max_inflight), in order, in one round trip; each is atomic
        on its own (a dispatch round places several prompts at once)."""
        ...

    async def dispatch_view(self, limit: int, capacity: dict[str, int], members: bool = True) -> DispatchView:
        """What a dispatch round reads, in one round trip: how many prompts each backend has in flight
        (and which, with `members`: `inflight()`), and the records of the first queued prompts, head first:
        at most `limit`, and at most four per free slot of `capacity` (backend → max_inflight of the
        backends that take prompts now), so a full farm reads none."""
        ...

    async def requeue(self, prompt_id: str, from_backend: str | None = None) -> bool:
        """Give a prompt back to the queue at its old place, freeing its slot; with `from_backend`, only
        if it is still pinned there (another replica may have moved it already). True if it moved."""
        ...

    async def mark_running(self, prompt_id: str, started_at: float,
                           *, deliveries: list[Delivery] | None = None) -> int | None:
        """The backend started it; returns its tenant's active count (None if it is gone or ended). The
        `deliveries` (its webhook's job.started) are queued with it, only if this call started it."""
        ...

    async def set_current_nodes(self, nodes: dict[str, str | None]) -> None:
        """Record the node each prompt is executing (for clients that reconnect), for many prompts in one
        round trip; prompts that are gone or finished are left alone."""
        ...

    async def finish(self, prompt_id: str, outcome: str, history: dict[str, Any], finished_at: float,
                     refs: dict[str, OutputRef] | None = None,
                     *, deliveries: list[Delivery] | None = None) -> int | None:
        """End a prompt: store its history entry, free its slot, drop it from its client's active set,
        remember the file references its history hands out (`record_outputs`), and queue its webhook's
        `deliveries` (only if this call ended it), in one round trip: a replica that dies right after
        cannot leave an ended prompt without its webhook.

        Returns its tenant's count of prompts still active (for the `status` that follows), or None if it
        had already finished (a second terminal event changes nothing).

        The end is also recorded as not yet announced, in the same step: the replica that finishes a prompt
        may die before its `executing` null leaves the process, and then another replica must tell the
        client (`ends_to_announce`). The event bus confirms the announcement (`ends_announced`).
        """
        ...

    async def ends_to_announce(self, older_than: float, hold_s: float, limit: int = 100) -> list[str]:
        """Prompts that ended before `older_than` and whose end no event bus has confirmed sent, claimed for
        the caller: each is hidden from other callers for `hold_s`, so two replicas sweeping at once do not
        both announce it, and it comes back if the claimer dies before confirming. Ends older than
        UNANNOUNCED_MAX_AGE_S are dropped unannounced."""
        ...

    async def ends_announced(self, prompt_ids: list[str]) -> None:
        """The ends of these prompts have been sent to every replica (their `executing` null is out)."""
        ...

    async def withdraw(self, prompt_id: str, *, deliveries: list[Delivery] | None = None) -> str | None:
        """Delete a prompt that has not started (queued here, or dispatched and pending at a backend),
        freeing its slot; it never reaches history. Returns the state it had, or None if it could not.
        The `deliveries` (its webhook's job.cancelled) are queued in the same step, only if it was withdrawn."""
        ...

    async def get(self, prompt_id: str) -> PromptRecord | None: ...

    async def get_many(self, prompt_ids: list[str]) -> list[PromptRecord]: ...

    async def count_active(self, tenant: str | None) -> int:
        """Prompts not yet finished (queued, dispatched or running) of a tenant, or of all when None: O(1)-ish,
        for `GET /prompt` and status counts on busy farms."""
        ...

    async def queued_by_tenant(self) -> dict[str, int]:
        """How many prompts wait in the proxy's queue, per tenant (for the queue-depth gauge)."""
        ...

    async def queue_summary(self) -> dict[str, tuple[int, float]]:
        """Per tenant: (prompts waiting in the proxy's queue, when the oldest of them was admitted)."""
        ...

    async def inflight(self) -> dict[str, list[str]]:
        """Prompt ids holding a slot, per backend."""
        ...

    async def inflight_at(self, backend: str) -> list[str]:
        """Prompt ids holding a slot at one backend (a farm of hundreds: not every backend's to find one's)."""
        ...

    async def active_prompts(self, tenant: str, client_id: str) -> list[str]:
        """A client's prompts that have not finished (queued, dispatched or running)."""
        ...

    async def history_ids(self) -> list[str]:
        """Finished prompts, oldest first, at most HISTORY_LIMIT."""
        ...

    async def history_tail(self, limit: int) -> list[str]:
        """The last `limit` finished prompts, newest first (some may have expired: `get_many` skips them),
        without `history_ids`' check of every entry."""
        ...

    async def forget_history(self, prompt_ids: list[str]) -> None:
        """Drop finished prompts from history (POST /history delete or clear)."""
        ...

    async def record_outputs(self, refs: dict[str, OutputRef]) -> None:
        """Remember file references handed to clients (ref → where the file is), for `/view`."""
        ...

    async def resolve_output(self, ref: str) -> OutputRef | None:
        """Where a reference points; None once it expired or retention removed its file."""
        ...

    # --- copies into the file store and their retention (proxy.keeping) ------------------------------
    # `record_outputs` and `finish` record a reference once (a second recording of the same reference, say
    # from a history read again, changes nothing), and queue a copy of each one marked `keep`.

    async def copies_due(self, now: float, lease_s: float, limit: int) -> list[str]:
        """Claim up to `limit` queued copies that are due: each is hidden from other callers for `lease_s`,
        and comes back if the claimer dies before it reports (`copy_done`, `copy_failed`, `copy_dropped`)."""
        ...

    async def copy_done(self, ref: str, out: OutputRef) -> bool:
        """The copy is in the file store: record where (`out.stored`, `size`, `expires`), count its bytes to
        the tenant and schedule its removal. False when the reference is gone (the caller deletes the copy)."""
        ...

    async def copy_failed(self, ref: str, now: float, backoff_s: float, cap_s: float) -> int:
        """Try again later: due after `backoff_s` doubled per failure so far (at most `cap_s`, with jitter);
        returns the failures counted, this one included (0 when the copy is no longer queued)."""
        ...

    async def copy_dropped(self, ref: str) -> None:
        """Give a copy up (its file is gone from the backend, or too many failures)."""
        ...

    async def copy_backlog(self) -> int:
        """Copies queued or in progress."""
        ...

    async def files_expired(self, now: float, lease_s: float, limit: int) -> dict[str, OutputRef]:
        """Claim up to `limit` stored files whose retention has passed (hidden for `lease_s`, as above)."""
        ...

    async def files_removed(self, refs: dict[str, OutputRef]) -> None:
        """Their copies are deleted: forget the references and uncount their bytes."""
        ...

    async def storage_used(self) -> dict[str, int]:
        """Bytes of copies each tenant has in the file store."""
        ...

    # --- the webhook outbox (proxy.webhooks) ---------------------------------------------------------
    # A delivery is queued once per id (queueing it again changes nothing), claimed with a lease like a
    # copy, and kept with its outcome for `Delivery.keep_until`.

    async def webhooks_queue(self, deliveries: list[Delivery]) -> None:
        """Queue deliveries, due now (those whose id is known already are left as they are)."""
        ...

    async def webhooks_due(self, now: float, lease_s: float, limit: int) -> list[Delivery]:
        """Claim up to `limit` pending deliveries that are due, each hidden from other callers until its
        `claimed_until` (now + `lease_s`): it comes back if the claimer dies before it reports."""
        ...

    async def webhook_attempted(self, delivery: Delivery, due: float | None) -> bool:
        """Record an attempt (its status, attempts, error); pending again at `due`, or out of the outbox
        when `due` is None (delivered, stopped, failed: failed ones are listed by `webhooks_failed`). Only
        while the claim `delivery.claimed_until` still holds: False when it lapsed (another replica may be
        delivering it now), or the delivery left the outbox meanwhile."""
        ...

    async def webhook_defer(self, deferred: list[tuple[Delivery, float]]) -> None:
        """Put claimed deliveries back, each due at its time, without an attempt (their receiver's host is
        busy); those whose claim lapsed are left alone."""
        ...

    async def webhooks_failed(self, limit: int) -> list[Delivery]:
        """Deliveries given up, the latest first."""
        ...

    async def webhook_redeliver(self, delivery_id: str, now: float) -> Delivery | None:
        """A failed delivery back in the outbox, due now, with its attempts counted afresh; None when no
        failed delivery has that id."""
        ...

    async def webhook_states(self, delivery_ids: list[str]) -> list[Delivery]:
        """The deliveries known under these ids (any status), in their order."""
        ...

    async def webhook_outbox(self) -> tuple[int, float | None]:
        """(pending deliveries, when the oldest of them was queued)."""
        ...

    async def shared_secret(self, name: str, candidate: str) -> str:
        """A secret every replica agrees on: `candidate` if none was kept under `name` yet, else the kept one."""
        ...

    # --- the farm's membership and catalogue (proxy.membership) -------------------------------------
    async def members(self) -> dict[str, Member]:
        """Every backend in the shared membership, by name."""
        ...

    async def member_put(self, member: Member) -> None:
        """Add or replace one."""
        ...

    async def member_drop(self, name: str) -> None:
        """Forget one (a config backend of that name comes back from the file)."""
        ...

    async def catalogue_put(self, object_info: dict[str, Any]) -> None:
        """Keep the farm's merged `/object_info`, so prompts are validated while no backend is up."""
        ...

    async def catalogue(self) -> dict[str, Any] | None:
        """The last kept catalogue, if any."""
        ...

    async def set_drained(self, backend: str, drained: bool) -> None:
        """Operators' drain flag, shared by every replica: a drained backend gets no new prompts."""
        ...

    async def drained(self) -> set[str]: ...

    async def share_speeds(self, figures: dict[str, dict[str, float]]) -> None:
        """Merge in what a replica learned of backends' speeds (backend → figures; `proxy.speed`)."""
        ...

    async def shared_speeds(self) -> dict[str, dict[str, float]]:
        """Every backend's speed figures as last shared by any replica."""
        ...

    async def hold_lease(self, name: str, owner: str, ttl_ms: int) -> bool:
        """Take or renew a lease (e.g. on a backend's upstream socket); false while another owner holds it."""
        ...

    async def drop_lease(self, name: str, owner: str) -> None:
        """Give a lease back early (graceful shutdown), only if `owner` still holds it."""
        ...

    async def lease_holders(self) -> dict[str, str]:
        """Every live lease: name → owner."""
        ...

    async def hold_socket(self, cid: str, tenant: str, ttl_ms: int) -> None:
        """Keep a registered socket's id (ComfyAPI's `websocket_cid`) known to every replica, for its tenant,
        for `ttl_ms` more (renewed while it is open; not among the leases `lease_holders` lists)."""
        ...

    async def socket_tenant(self, cid: str) -> str | None:
        """The tenant of a registered socket still known; None once it closed or lapsed."""
        ...

    async def drop_socket(self, cid: str) -> None:
        ...
