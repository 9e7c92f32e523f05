"""The proxy's queue → backends, with late binding.

A backend receives a prompt only when it has a free slot (`max_inflight`), so work waits in the proxy's
queue, where it can still go to whichever backend frees first (PRODUCT.md, "Dispatch"). The loop wakes
when a prompt is admitted, a slot frees or a backend's state changes, and at least every `TICK_S` (other
replicas may have changed the shared queue).

A send that fails to connect gives the prompt back to the queue at its old place and marks the backend
down; a backend's 400 ends the prompt with an `execution_error` (the router tells the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aiohttp
import structlog

from proxy.backend_client import BackendClient, BackendUnreachable
from proxy.backends import BackendState, Farm
from proxy.capability import Combos, combo_values
from proxy.config import SchedulerConfig
from proxy.errors import ProxyError, StoreUnavailable
from proxy.files import FileStoreUnavailable
from proxy.metrics import Metrics
from proxy.relay.messages import execution_error
from proxy.relay.router import EventRouter
from proxy.relay.upstream import presence_name
from proxy.scheduler import Demand, Scheduler
from proxy.speed import sampling_steps
from proxy.speed import share as share_speeds
from proxy.store import RUNNING, PromptRecord, Store
from proxy.tasks import TaskOwner
from proxy.tenancy import TenantDirectory
from proxy.uploads import UploadCopier

log = structlog.get_logger(__name__)

TICK_S = 0.5
PRESENCE_TTL_MS = 10_000   # a replica that died is known to have died this long after
# Which prompts are in flight where (not just how many) is read this often: the scheduler drops what
# ended or moved elsewhere (`Backlog.keep_only`); reading thousands of ids every round would cost more.
MEMBERS_EVERY_S = 1.0
LOOKAHEAD = 32          # queued prompts examined per round: one that no free backend can run waits,
MAX_SEND_ATTEMPTS = 5   # the rest still go


def demand_of(prompt: dict[str, Any], pools: tuple[str, ...] = (), combos: Combos | None = None) -> Demand:
    return Demand(node_classes=frozenset(str(node.get("class_type")) for node in prompt.values()
                                         if isinstance(node, dict)), pools=pools,
                  combo_values=combo_values(prompt, combos) if combos is not None else frozenset(),
                  steps=sampling_steps(prompt))


class Dispatcher:
    def __init__(self, *, store: Store, farm: Farm, scheduler: Scheduler, client: BackendClient,
                 router: EventRouter, upstream_ids: dict[str, str], settings: SchedulerConfig, replica: str,
                 metrics: Metrics | None = None, tenants: TenantDirectory | None = None,
                 uploads: UploadCopier | None = None) -> None:
        self.replica = replica
        self.failover_after_s = settings.failover_after_s
        self.retry_max_attempts = settings.retry_max_attempts
        self.tenants = tenants
        self.uploads = uploads
        self.metrics = metrics or Metrics()
        self.store = store
        self.farm = farm
        self.scheduler = scheduler
        self.client = client
        self.router = router
        self.upstream_ids = upstream_ids
        self._tasks = TaskOwner()
        self._members_due = 0.0
        router.observers.append(scheduler)  # prompts' starts and ends teach it backend speeds

    async def start(self) -> None:
        """Announce this replica's presence before its first claim: another replica's sweep takes a claim
        by a replica without presence for one that died (`Upstream.sweep_orphans`)."""
        with contextlib.suppress(ProxyError):   # the store away: the presence task keeps trying
            await self.store.hold_lease(presence_name(self.replica), self.replica, PRESENCE_TTL_MS)
        self._tasks.spawn(self._run(), name="dispatcher")
        self._tasks.spawn(self._announce(), name="dispatcher-presence")

    async def stop(self) -> None:
        await self._tasks.stop()
        with contextlib.suppress(ProxyError):
            await self.store.drop_lease(presence_name(self.replica), self.replica)

    async def _announce(self) -> None:
        """Keep this replica's presence lease: a prompt it claimed but never sent is given back by the
        backend's upstream owner once the lease is gone (`Upstream.sweep_orphans`). On the same beat,
        share backend speeds with the other replicas."""
        while True:
            with contextlib.suppress(ProxyError):
                await self.store.hold_lease(presence_name(self.replica), self.replica, PRESENCE_TTL_MS)
                await share_speeds(self.scheduler.speed, self.store, time.time())
            await asyncio.sleep(PRESENCE_TTL_MS / 3000)

    def wake(self) -> None:
        self.farm.nudge()

    async def fail_over(self) -> None:
        """Prompts pinned to a backend that has been unreachable for `failover_after_s` go back to the
        queue (not started) or run again elsewhere (started, up to `retry_max_attempts` times), else end
        with an `execution_error` that says so. Nothing accepted waits forever on a dead backend."""
        now = time.time()
        dead = [s.name for s in self.farm.snapshot()
                if not s.polled_ok and not s.upstream_connected and now - s.last_ok > self.failover_after_s]
        if not dead:
            return
        for backend in dead:
            await self.move_off(backend, "became unreachable")

    async def move_off(self, backend: str, why: str) -> list[str]:
        """Every prompt pinned to `backend` leaves it: back to the queue (not started), or to run again
        elsewhere (started, up to `retry_max_attempts` times), else ended with an `execution_error` that
        says why. Returns the ids that went back to the queue."""
        moved: list[str] = []
        for rec in await self.store.get_many(await self.store.inflight_at(backend)):
            if rec.backend != backend:
                continue
            self.router.forget(backend, rec.prompt_id)
            if rec.state == RUNNING and rec.attempts > self.retry_max_attempts:
                await self.router.fail(rec, execution_error(
                    rec.prompt_id, f"The prompt was running on {backend}, which {why}; it ran "
                    f"{rec.attempts} time(s) and is not retried again.", "BackendUnreachable"))
                continue
            if await self.store.requeue(rec.prompt_id, from_backend=backend):
                moved.append(rec.prompt_id)
                if rec.state == RUNNING:
                    self.router.announce_retry(rec, backend, f"backend {backend} {why}")
                log.warning("prompt_failed_over", prompt_id=rec.prompt_id, tenant=rec.tenant, backend=backend,
                            was=rec.state)
                self.metrics.backend_errors.labels(backend, "lost").inc()
        return moved

    async def _run(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for around Event.wait can swallow a cancellation
            # that arrives as the event fires, and the task then never stops.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    await self.farm.changed.wait()
            self.farm.changed.clear()
            try:
                await self.fail_over()
                await self.dispatch_round()
            except StoreUnavailable as exc:   # expected while Redis fails over: a line, not a traceback a tick
                log.warning("dispatch_round_failed", error=exc.details)
                await asyncio.sleep(TICK_S)
            except Exception:  # the loop must survive anything one round does; the error is logged
                log.exception("dispatch_round_failed")
                await asyncio.sleep(TICK_S)

    async def dispatch_round(self) -> None:
        """Place as many queued prompts as free slots allow, head first: one store read, picks made
        locally, then every claim in one round trip (a claim another replica beat us to just fails)."""
        states = self.farm.snapshot()
        if not any(s.available for s in states):
            return
        # Records are read only for as many prompts as could be placed (a few more, for ones that must wait).
        capacity = {s.name: s.config.max_inflight for s in states if s.available}
        now = time.monotonic()
        members = now >= self._members_due
        if members:
            self._members_due = now + MEMBERS_EVERY_S
        view = await self.store.dispatch_view(LOOKAHEAD, capacity, members)
        # The farm may have changed while the store answered (an upstream socket dropped, a drain): pick
        # from the state as it is now, or a prompt admitted meanwhile goes to a backend just gone.
        states = self.farm.snapshot()
        self.scheduler.begin_round(view.inflight, states)
        inflight = dict(view.counts)
        free = sum(max(s.config.max_inflight - inflight.get(s.name, 0), 0) for s in states if s.available)
        combos = self.farm.merged_combos()
        picks: list[tuple[PromptRecord, BackendState]] = []
        for rec in view.head:
            if free <= 0:
                break
            started = time.perf_counter()
            pools = self.tenants.get(rec.tenant).pools if self.tenants and rec.tenant else ()
            demand = demand_of(rec.prompt, pools, combos)
            choice = self.scheduler.choose(demand, inflight)
            self.metrics.dispatch_decision.observe(time.perf_counter() - started)
            if choice is None:
                continue
            self.scheduler.placed(choice, rec.prompt_id, demand)
            inflight[choice.state.name] = inflight.get(choice.state.name, 0) + 1
            free -= 1
            picks.append((rec, choice.state))
        if not picks:
            return
        claimed = await self.store.claim_many([(rec.prompt_id, state.name, state.config.max_inflight)
                                               for rec, state in picks], by=self.replica)
        for (rec, state), ok in zip(picks, claimed, strict=True):
            if ok:   # else another replica took the prompt or the slot
                rec.attempts += 1
                if self.farm.holds_upstream(state.name):   # else its events, and its end, arrive elsewhere
                    self.router.expect(state.name, rec)
                self._tasks.spawn(self._send(rec, state.name, state.url))

    async def _send(self, rec: PromptRecord, backend: str, url: str) -> None:
        log_ = log.bind(prompt_id=rec.prompt_id, tenant=rec.tenant, backend=backend)
        prompt = rec.prompt
        if self.uploads is not None:
            try:
                prompt = await self.uploads.prepare(prompt, rec.tenant, url, self.farm.merged_object_info())
            except FileStoreUnavailable as exc:   # not the backend's fault: the prompt waits for the store
                # (each claim counts an attempt, so a long store outage may use up a later failover's retry)
                log_.warning("uploads_unavailable", error=str(exc))
                self.router.forget(backend, rec.prompt_id)
                await self.store.requeue(rec.prompt_id, backend)
                return
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                await self._unreachable(rec, backend, url, f"copying uploads failed: {exc!r}", log_)
                return
        body = {
            "prompt": prompt,
            "prompt_id": rec.prompt_id,
            "client_id": self.upstream_ids[backend],
            "extra_data": {k: v for k, v in rec.extra_data.items() if k not in ("client_id", "create_time")},
            "number": rec.number,
        }
        try:
            # ComfyUI's multi-user header: backends see whose prompt it is (user data, logs).
            headers = {"comfy-user": rec.tenant} if rec.tenant else None
            answer = await self.client.submit(url, body, headers)
        except BackendUnreachable as exc:
            await self._unreachable(rec, backend, url, str(exc), log_)
            return
        self.farm.note_ok(backend)  # it answered: its circuit breaker's failures were not consecutive
        self.farm.touch(backend)    # its queue and memory change: poll it at the next interval
        if answer.status == 200:
            self.metrics.dispatched.labels(backend).inc()
            log_.info("prompt_dispatched")
            return
        error = answer.body.get("error") if isinstance(answer.body, dict) else None
        node_errors = answer.body.get("node_errors") if isinstance(answer.body, dict) else None
        log_.warning("backend_refused_prompt", status=answer.status, error=error)
        self.metrics.backend_errors.labels(backend, "refused").inc()
        self.router.forget(backend, rec.prompt_id)
        await self.router.fail(rec, refusal_error(rec.prompt_id, answer.status, error, node_errors, rec.prompt))


    async def _unreachable(self, rec: PromptRecord, backend: str, url: str, error: str, log_: Any) -> None:
        """The send failed: the backend is down for now, the prompt goes back to its place in the queue."""
        log_.warning("dispatch_failed", error=error)
        self.router.forget(backend, rec.prompt_id)
        self.metrics.backend_errors.labels(backend, "dispatch").inc()
        self.farm.mark_down(backend, error)
        if self.uploads is not None:
            self.uploads.forget(url)
        # Best effort: the backend may have queued it before the failure; never run it twice.
        with contextlib.suppress(BackendUnreachable):
            await self.client.post_bare(url, "/queue", {"delete": [rec.prompt_id]})
        if rec.attempts >= MAX_SEND_ATTEMPTS:   # counted by this claim too
            await self.router.fail(rec, execution_error(
                rec.prompt_id, f"Could not reach a backend after {MAX_SEND_ATTEMPTS} attempts: {error}",
                "BackendUnreachable"))
        else:
            await self.store.requeue(rec.prompt_id)
        self.farm.nudge()


def refusal_error(prompt_id: str, status: int, error: Any, node_errors: Any, prompt: dict[str, Any]
                  ) -> dict[str, Any]:
    """A backend's refusal of a prompt the proxy admitted, as an `execution_error`'s data."""
    node_id = next(iter(node_errors), None) if isinstance(node_errors, dict) else None
    node_type = prompt.get(node_id, {}).get("class_type") if node_id is not None else None
    if isinstance(error, dict):
        text = error.get("message", "") + (f": {error['details']}" if error.get("details") else "")
        type_ = str(error.get("type") or "backend_refused")
    else:
        text, type_ = f"The backend refused the prompt (HTTP {status})", "backend_refused"
    for node in (node_errors or {}).values() if isinstance(node_errors, dict) else ():
        for err in node.get("errors", []) if isinstance(node, dict) else ():
            text += f"\n{err.get('message', '')}: {err.get('details', '')}"
    data = execution_error(prompt_id, text, type_, node_id=node_id, node_type=node_type)
    if isinstance(node_errors, dict) and node_errors:
        data["node_errors"] = node_errors
    return data
