"""Attribution of backend events to prompts, the bookkeeping they trigger, and delivery to clients.

Upstream sockets hand every frame to `EventRouter`. Text messages name their prompt (`prompt_id`);
binary frames (previews, progress text) and the reconnect `executing` carry none, so they belong to the
prompt running on that backend (protocol §8, §9). Frames that need no rewrite are passed on as the exact
text or bytes received; only `executed` (file references) and the end of a prompt are rewritten.

The end of a prompt is `executing` with `node: null`. ComfyUI stores its history entry before sending it
(main.py: task_done, then executing null), so at that moment the router fetches the entry, makes it the
client's (its number, its client_id, rewritten file references), stores it and frees the slot, then
sends the client a `status` with its own queue count and the `executing` null — the order of
traces/run_normal.json — so a client that asks `/history/{id}` right after it gets the answer.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, NamedTuple, Protocol

import structlog

from proxy import jsoncodec
from proxy.backend_client import BackendClient, BackendUnreachable
from proxy.comfy import frames
from proxy.errors import ProxyError
from proxy.metrics import Metrics
from proxy.outputs import marked_to_keep, rewrite_outputs, rewrite_ui_output
from proxy.relay import messages
from proxy.relay.hub import LOGS, RETRY, ClientEvent
from proxy.store import DISPATCHED, FINISHED, RUNNING, OutputRef, PromptRecord, Store
from proxy.store.base import Delivery
from proxy.webhooks.subscription import ENDED, STARTED, deliveries_for

log = structlog.get_logger(__name__)

TERMINAL = {"execution_success": "success", "execution_error": "error", "execution_interrupted": "interrupted"}
# Backend-wide messages the proxy replaces with its own (status) or must not forward to tenants.
NOT_RELAYED = frozenset({"status", "feature_flags"})
STATUS_PREFIX = '{"type": "status", '   # json.dumps of send_sync's {"type": ..., "data": ...}, as ComfyUI sends it

Publish = Callable[[ClientEvent], None]


class Message(NamedTuple):
    """A backend's text message after the quick parse (`jsoncodec.peek`): read, never re-serialised."""

    backend: str
    raw: str                 # exactly as received: relayed as is unless rewritten
    type: str
    data: dict[str, Any]


Handler = Callable[["EventRouter", Message], Awaitable[None]]


class PromptObserver(Protocol):
    """Told when a prompt starts and ends at a backend (the scheduler learns speeds from it)."""

    def prompt_started(self, backend: str, prompt_id: str, at: float) -> None: ...

    def prompt_ended(self, backend: str, prompt_id: str, outcome: str, at: float,
                     ran_s: float | None = None) -> None: ...


@dataclass
class Route:
    """A prompt's record cached while it runs at a backend, so per-message work is a dict lookup and its
    end needs no store read. The immutable parts (graph, client, tenant, number) cannot change while it
    runs; what does (state, start time) is written here and in the store alike."""

    record: PromptRecord
    outcome: str | None = None
    recorded: set[str] = field(default_factory=set)   # file references already in the store

    @property
    def prompt_id(self) -> str:
        return self.record.prompt_id

    @property
    def tenant(self) -> str:
        return self.record.tenant

    @property
    def client_id(self) -> str | None:
        return self.record.client_id


@dataclass
class BackendProgress:
    running: str | None = None
    node: str | None = None
    routes: dict[str, Route] = field(default_factory=dict)


class EventRouter:
    def __init__(self, *, store: Store, client: BackendClient, publish: Publish,
                 backend_url: Callable[[str], str | None], on_slot_freed: Callable[[], None],
                 metrics: Metrics | None = None,
                 on_started: Callable[[str, dict[str, Any]], None] | None = None,
                 on_finished: Callable[[str, str], None] | None = None) -> None:
        self.metrics = metrics or Metrics()
        self._on_started = on_started
        self._on_finished = on_finished   # (backend, outcome): outlier ejection (proxy.health)
        self.store = store
        self.client = client
        self.publish = publish
        self._backend_url = backend_url
        self._on_slot_freed = on_slot_freed
        self._log_marks: dict[str, str] = {}   # backend → time (its own clock) of the last console line relayed
        self.observers: list[PromptObserver] = []
        self._progress: dict[str, BackendProgress] = {}
        self._nodes = CurrentNodes(store)
        self.queue_status = QueueStatus(store, publish)
        # Set when outputs are copied into a file store (proxy.keeping): called once copies are queued.
        self.on_outputs: Callable[[], None] | None = None
        self.on_deliveries: Callable[[], None] | None = None   # webhook deliveries were queued

    def progress(self, backend: str) -> BackendProgress:
        prog = self._progress.get(backend)
        if prog is None:
            prog = self._progress[backend] = BackendProgress()
        return prog

    def expect(self, backend: str, rec: PromptRecord) -> None:
        """The dispatcher on this replica sent `rec` to `backend`: its events need no store read. (When
        another replica owns the backend's upstream socket, the first event reads the record instead.)"""
        self.progress(backend).routes[rec.prompt_id] = Route(replace(rec, backend=backend, state=DISPATCHED))

    def socket_closed(self, backend: str) -> None:
        """This replica's socket to `backend` closed: another replica may hold the next, and tell the ends of
        the prompts cached here, so the cache keeps only the running prompt (its previews carry no id)."""
        prog = self.progress(backend)
        prog.routes = {pid: route for pid, route in prog.routes.items() if pid == prog.running}

    def forget(self, backend: str, prompt_id: str) -> None:
        """The prompt left this backend (failover): its later frames from there are not relayed."""
        prog = self.progress(backend)
        prog.routes.pop(prompt_id, None)
        if prog.running == prompt_id:
            prog.running, prog.node = None, None

    def announce_retry(self, rec: PromptRecord, backend: str, reason: str) -> None:
        """Before a prompt that was running runs again elsewhere, tell its client why a second
        `execution_start` will come: a `proxy_retry` message (ComfyUI clients ignore unknown types)."""
        data = {"prompt_id": rec.prompt_id, "backend": backend, "reason": reason, "attempt": rec.attempts + 1}
        self.publish(ClientEvent(rec.tenant, rec.client_id, messages.message(RETRY, data), RETRY,
                                 end_of=rec.prompt_id))

    # --- client-facing helpers ------------------------------------------------------------------------
    def queue_changed(self, tenant: str) -> None:
        """A prompt of `tenant` left the queue outside the event flow (deleted): its sockets get a `status`."""
        self.queue_status.changed(tenant)

    # --- upstream frames ------------------------------------------------------------------------------
    async def on_text(self, backend: str, raw: str) -> None:
        """One text message from `backend`, handled by its `type` (`_HANDLERS`; any other type is relayed
        as received to the client of the prompt it names)."""
        if raw.startswith(STATUS_PREFIX):   # three per prompt, never relayed: not worth parsing
            return
        msg = _peek(backend, raw)
        if msg is not None:
            await self._HANDLERS.get(msg.type, EventRouter._on_prompt_message)(self, msg)

    async def _ignore(self, msg: Message) -> None:
        """A backend-wide message the proxy replaces with its own (status) or keeps from tenants."""

    async def _on_logs(self, msg: Message) -> None:
        """Console lines this backend pushes since a client subscribed (proxy.api.logs)."""
        data = _exact(msg.raw)["data"]
        self._relay_logs(msg.backend, data, data.get("entries"))

    def relay_missed_logs(self, backend: str, raw: dict[str, Any], since: str) -> None:
        """Console lines a backend wrote while its socket was away (its subscription went with it), from its
        `/internal/logs/raw` answer: those after the last line relayed from it, or else after `since` (when
        the socket dropped), sent as the `logs` message it would have pushed (`{entries, size}`)."""
        mark = max(since, self._log_marks.get(backend, ""))
        entries = raw.get("entries")
        missed = [e for e in entries if isinstance(e, dict) and str(e.get("t", "")) > mark] \
            if isinstance(entries, list) else []
        self._relay_logs(backend, {**raw, "entries": missed}, missed)

    def _relay_logs(self, backend: str, data: dict[str, Any], entries: Any) -> None:
        lines = messages.prefixed(backend, entries)
        if lines:
            self._log_marks[backend] = max(self._log_marks.get(backend, ""), *(str(e.get("t", "")) for e in lines))
            self.publish(ClientEvent("", None, messages.message(LOGS, {**data, "entries": lines}), LOGS))

    async def _on_prompt_message(self, msg: Message) -> None:
        """Any other message of a prompt running here: relayed as received."""
        route = await self._attribute(msg)
        if route is not None:
            self._relay_to(route, msg.type, msg.raw)

    async def _on_execution_start(self, msg: Message) -> None:
        route = await self._attribute(msg)
        if route is None:
            return
        prog = self.progress(msg.backend)
        prog.running, prog.node = route.prompt_id, None
        started = time.time()
        for observer in self.observers:
            observer.prompt_started(msg.backend, route.prompt_id, started)
        route.record.state, route.record.started_at = RUNNING, started
        deliveries = deliveries_for(route.record, STARTED, now=started)
        active = await self.store.mark_running(route.prompt_id, started, deliveries=deliveries)
        self._deliveries_queued(deliveries)
        self.metrics.queue_wait.labels(msg.backend).observe(max(started - route.record.created_at, 0))
        if self._on_started is not None:
            self._on_started(msg.backend, route.record.prompt)
        if active is not None:   # ComfyUI's queue.get() broadcasts the count before execution_start
            self.queue_status.show(route.tenant, active)
        self._relay_to(route, msg.type, msg.raw)

    async def _on_executing(self, msg: Message) -> None:
        prog = self.progress(msg.backend)
        if msg.data.get("prompt_id") is None:
            # Sent on (re)connect when our client id owns the running prompt: carries the node only.
            if prog.running is not None:
                prog.node = msg.data.get("node")
            return
        route = await self._attribute(msg)
        if route is None:
            return
        node = msg.data.get("node")
        if node is None:   # the end of the prompt
            await self._complete(msg.backend, route, msg.raw)
            return
        prog.running, prog.node = route.prompt_id, node
        self._relay_to(route, msg.type, msg.raw)
        # Only for clients that reconnect mid-run (api.ws): written behind, a few times a second.
        self._nodes.note(route.prompt_id, node)

    async def _on_executed(self, msg: Message) -> None:
        route = await self._attribute(msg)
        if route is None:
            return
        self._relay_to(route, msg.type, await self._rewrite_executed(msg.backend, route, _exact(msg.raw)))

    async def _on_terminal(self, msg: Message) -> None:
        route = await self._attribute(msg)
        if route is not None:
            route.outcome = TERMINAL[msg.type]
            self._relay_to(route, msg.type, msg.raw, ends=True)

    _HANDLERS: ClassVar[dict[str, Handler]] = {
        **dict.fromkeys(NOT_RELAYED, _ignore),
        LOGS: _on_logs,
        "execution_start": _on_execution_start,
        "executing": _on_executing,
        "executed": _on_executed,
        **dict.fromkeys(TERMINAL, _on_terminal),
    }

    async def _attribute(self, msg: Message) -> Route | None:
        """The prompt a message names, if it runs at this backend (None: not ours, or names none)."""
        prompt_id = msg.data.get("prompt_id")
        return None if prompt_id is None else await self._route(msg.backend, prompt_id)

    def _relay_to(self, route: Route, type_: str, raw: str, *, ends: bool = False) -> None:
        """`ends`: a message of the prompt's end, which a client's hub delivers once (`EndsTold`)."""
        self.relay(ClientEvent(route.tenant, route.client_id, raw, type_,
                               end_of=route.prompt_id if ends else None))

    def relay_terminal(self, rec: PromptRecord, history: dict[str, Any]) -> None:
        """The terminal message a history records (`execution_success`, `_error`, `_interrupted`), for an
        end told from history rather than by the backend's socket."""
        for event, data in history.get("status", {}).get("messages", []):
            if event in TERMINAL:
                self.relay(ClientEvent(rec.tenant, rec.client_id, messages.message(event, data), event,
                                       end_of=rec.prompt_id))

    def relay(self, event: ClientEvent) -> None:
        """Publish `event`. One ComfyUI would send to no socket at all (a message of a prompt without
        client_id that is not broadcast) still crosses the bus: every replica keeps each job's messages for
        its server-sent events (`proxy.relay.jobevents`); hubs deliver it to no socket."""
        self.publish(event)

    def on_binary(self, backend: str, frame: bytes) -> None:
        prog = self.progress(backend)
        route = prog.routes.get(prog.running) if prog.running else None
        if route is None or len(frame) < 4:
            return
        meta = None
        if frames.event_type(frame) == frames.PREVIEW_IMAGE:  # no prompt_id: attributed by the running prompt
            meta = {"node_id": prog.node, "prompt_id": route.prompt_id, "display_node_id": prog.node,
                    "parent_node_id": None, "real_node_id": prog.node}
        self.publish(ClientEvent(route.tenant, route.client_id, frame, "preview" if meta else "binary",
                                 preview_meta=meta))

    async def _route(self, backend: str, prompt_id: str) -> Route | None:
        prog = self.progress(backend)
        route = prog.routes.get(prompt_id)
        if route is not None:
            return route
        rec = await self.store.get(prompt_id)
        if rec is None or rec.backend != backend or rec.state == FINISHED:
            return None  # not ours, re-dispatched elsewhere, or already ended
        route = prog.routes[prompt_id] = Route(rec)
        return route

    async def _rewrite_executed(self, backend: str, route: Route, msg: dict[str, Any]) -> str:
        data = msg["data"]
        output, refs = rewrite_ui_output(data.get("output"), backend=backend, tenant=route.tenant,
                                         prompt_id=route.prompt_id)
        refs = self._kept(refs)
        if route.client_id is None:
            # No socket gets it (ComfyUI sends executed to nobody here); only a job's server-sent events
            # carry it. Its references are recorded with the prompt's end, one round trip saved per message.
            return messages.dumps({"type": "executed", "data": {**data, "output": output}})
        try:
            await self.store.record_outputs(refs)   # before the client can ask /view for them
            self._copies_queued(refs)
        except ProxyError as exc:
            # The store is away: the client still gets the message; the references are recorded with the
            # prompt's end (those not in `recorded`), which waits for the store.
            log.warning("outputs_unrecorded", prompt_id=route.prompt_id, error=exc.details)
        else:
            route.recorded.update(refs)
        return messages.dumps({"type": "executed", "data": {**data, "output": output}})

    # --- the end of a prompt --------------------------------------------------------------------------
    async def _complete(self, backend: str, route: Route, executing_null: str) -> None:
        """The end as the socket told it. The route stays until the end is stored: when the store is away,
        the end is settled from the backend's history later (`complete_from_backend_history`), and the
        route says which of its messages the client already has."""
        prog = self.progress(backend)
        if prog.running == route.prompt_id:
            prog.running, prog.node = None, None
        self._nodes.drop(route.prompt_id)
        rec = route.record
        url = self._backend_url(backend)
        entry = None
        if url is not None:
            try:
                entry = await self.client.history(url, route.prompt_id)
            except BackendUnreachable as exc:
                log.warning("history_fetch_failed", prompt_id=route.prompt_id, backend=backend, error=str(exc))
        history, refs = self.client_history(rec, backend, entry)
        outcome = outcome_of(history) if entry is not None else (route.outcome or "error")
        await self._finish(rec, outcome, history, executing_null,
                           {ref: out for ref, out in refs.items() if ref not in route.recorded})
        prog.routes.pop(route.prompt_id, None)

    def client_history(self, rec: PromptRecord, backend: str, entry: dict[str, Any] | None
                       ) -> tuple[dict[str, Any], dict[str, OutputRef]]:
        """The history entry as the prompt's client must see it, and the file references it hands out."""
        if entry is None:
            entry = {"outputs": {}, "status": {"status_str": "error", "completed": False, "messages": []},
                     "meta": {}}
        outputs, refs = rewrite_outputs(entry.get("outputs", {}), backend=backend, tenant=rec.tenant,
                                        prompt_id=rec.prompt_id)
        return {**entry, "prompt": prompt_item(rec), "outputs": outputs}, self._kept(refs)

    def _kept(self, refs: dict[str, OutputRef]) -> dict[str, OutputRef]:
        return marked_to_keep(refs) if self.on_outputs is not None else refs

    def _deliveries_queued(self, deliveries: list[Delivery]) -> None:
        if deliveries and self.on_deliveries is not None:
            self.on_deliveries()

    def _copies_queued(self, refs: dict[str, OutputRef] | None) -> None:
        if refs and self.on_outputs is not None:
            self.on_outputs()

    async def fail(self, rec: PromptRecord, error: dict[str, Any]) -> None:
        """End a prompt that no backend will run, with ComfyUI's failing-run messages and history."""
        history = {
            "prompt": prompt_item(rec),
            "outputs": {},
            "status": {"status_str": "error", "completed": False, "messages": [["execution_error", error]]},
            "meta": {},
        }
        self.publish(ClientEvent(rec.tenant, rec.client_id, messages.message("execution_error", error),
                                 "execution_error", end_of=rec.prompt_id))
        await self._finish(rec, "error", history, messages.executing(None, rec.prompt_id))

    async def complete_from_backend_history(self, rec: PromptRecord, backend: str, entry: dict[str, Any]) -> None:
        """A prompt whose end the upstream socket missed (it was down), or could not store (the store was):
        tell the client from history what it has not been told."""
        history, refs = self.client_history(rec, backend, entry)
        route = self.progress(backend).routes.get(rec.prompt_id)
        if route is None or route.outcome is None:
            self.relay_terminal(rec, history)
        recorded = route.recorded if route is not None else set()
        self._nodes.drop(rec.prompt_id)
        await self._finish(rec, outcome_of(history), history, messages.executing(None, rec.prompt_id),
                           {ref: out for ref, out in refs.items() if ref not in recorded})
        self.progress(backend).routes.pop(rec.prompt_id, None)

    async def _finish(self, rec: PromptRecord, outcome: str, history: dict[str, Any], last: str,
                      refs: dict[str, OutputRef] | None = None) -> None:
        finished = time.time()
        deliveries = deliveries_for(rec, ENDED.get(outcome, ENDED["error"]), now=finished)
        remaining = await self.store.finish(rec.prompt_id, outcome, history, finished, refs,
                                            deliveries=deliveries)
        self._copies_queued(refs)
        self._deliveries_queued(deliveries)
        if remaining is not None:
            backend = rec.backend or "none"
            if rec.backend:
                ran = run_seconds(history)
                for observer in self.observers:
                    observer.prompt_ended(rec.backend, rec.prompt_id, outcome, finished, ran)
            self.metrics.prompts.labels(rec.tenant or "anonymous", backend, outcome).inc()
            if self._on_finished is not None and rec.backend:
                self._on_finished(rec.backend, outcome)
            if rec.started_at is not None:
                self.metrics.execution.labels(backend).observe(max(finished - rec.started_at, 0))
            log.info("prompt_finished", prompt_id=rec.prompt_id, tenant=rec.tenant, backend=rec.backend,
                     outcome=outcome)
            self._on_slot_freed()
            # task_done's status, then executing null (traces/run_normal.json), the count from finish itself.
            self.queue_status.show(rec.tenant, remaining)
            self.publish(ClientEvent(rec.tenant, rec.client_id, last, "executing", settles=rec.prompt_id,
                                     end_of=rec.prompt_id))


def run_seconds(history: dict[str, Any]) -> float | None:
    """How long the backend ran the prompt, by its own clock: from `execution_start` to the terminal
    message, whose `timestamp`s (ms) its history keeps. The proxy's clock would add whatever delayed it
    in handling them (a backend's frames are handled in order and each end fetches its history, so the
    next prompt's start is handled after that round trip), which on a loaded host can be most of a short
    prompt."""
    stamps: dict[str, float] = {}
    for event, data in history.get("status", {}).get("messages", []):
        if isinstance(data, dict) and isinstance(data.get("timestamp"), int | float):
            stamps["end" if event in TERMINAL else event] = data["timestamp"]
    if "execution_start" not in stamps or "end" not in stamps:
        return None
    return max(stamps["end"] - stamps["execution_start"], 0.0) / 1000


class QueueStatus:
    """ComfyUI broadcasts `status` with its queue count to every socket whenever the queue changes
    (put, get, task_done). The proxy does so per tenant: every socket of the tenant gets the tenant's
    count of prompts queued, at backends or running (for a farm without tenants: all of them).

    Changes within one turn of the event loop share one count (a flood of admissions costs one store read
    per turn, not one each). A count read earlier never overwrites one read later: each read takes a
    ticket first, and a count whose ticket is older than the last one shown is dropped.
    """

    def __init__(self, store: Store, publish: Publish) -> None:
        self.store = store
        self.publish = publish
        self._dirty: set[str] = set()
        self._scheduled = False
        self._tickets = itertools.count()
        self._shown: dict[str, int] = {}
        self._flushing: set[asyncio.Task[None]] = set()   # held: the loop keeps only weak references

    def changed(self, tenant: str) -> None:
        self._dirty.add(tenant)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._scheduled = False
        tenants, self._dirty = self._dirty, set()
        task = asyncio.get_running_loop().create_task(self._flush(tenants))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _flush(self, tenants: set[str]) -> None:
        for tenant in tenants:
            ticket = next(self._tickets)
            try:
                count = await self.store.count_active(tenant)
            except ProxyError as exc:   # the store is away: the next change or reconnect tells the count
                log.warning("status_count_failed", tenant=tenant, error=exc.details)
                continue
            self.show(tenant, count, ticket)

    def show(self, tenant: str, count: int, ticket: int | None = None) -> None:
        ticket = next(self._tickets) if ticket is None else ticket
        if ticket < self._shown.get(tenant, -1):
            return
        self._shown[tenant] = ticket
        self.publish(ClientEvent(tenant, None, messages.status(count), "status"))


class CurrentNodes:
    """Writes each running prompt's current node to the store behind the events, at most every
    `INTERVAL_S` and in one round trip: only a client that reconnects mid-run reads it, and a prompt's
    dozens of `executing` messages must not cost a store write each."""

    INTERVAL_S = 0.2

    def __init__(self, store: Store) -> None:
        self.store = store
        self._pending: dict[str, str | None] = {}
        self._task: asyncio.Task[None] | None = None

    def note(self, prompt_id: str, node: str | None) -> None:
        self._pending[prompt_id] = node
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush())

    def drop(self, prompt_id: str) -> None:
        self._pending.pop(prompt_id, None)

    async def _flush(self) -> None:
        await asyncio.sleep(self.INTERVAL_S)   # a write-behind interval, not a wait for an event
        nodes, self._pending = self._pending, {}
        try:
            await self.store.set_current_nodes(nodes)
        except ProxyError as exc:   # best effort: the next write or the prompt's end supersedes it
            log.info("current_nodes_unrecorded", count=len(nodes), error=exc.details)


def _peek(backend: str, raw: str) -> Message | None:
    """The quick parse of a text message; None (logged) when it is not a ComfyUI message."""
    try:
        msg = jsoncodec.peek(raw)   # re-serialised only after an exact parse (`_exact`)
        type_ = msg["type"]
        data = msg.get("data") or {}
    except (ValueError, KeyError, TypeError):
        log.warning("upstream_bad_message", backend=backend, head=raw[:200])
        return None
    return Message(backend, raw, type_, data) if isinstance(data, dict) else None


def _exact(raw: str) -> dict[str, Any]:
    """A message parsed to be written out again: every value as the backend sent it (its `data` is a dict:
    `_peek` checked that on the quick parse)."""
    msg: dict[str, Any] = jsoncodec.loads(raw)
    return msg


def prompt_item(rec: PromptRecord) -> list[Any]:
    """`[number, prompt_id, prompt, extra_data, outputs_to_execute]` with the client's own client_id."""
    extra = {k: v for k, v in rec.extra_data.items() if k not in SENSITIVE_EXTRA_DATA_KEYS}
    return [rec.number, rec.prompt_id, rec.prompt, extra, rec.outputs_to_execute]


# ComfyUI drops these from extra_data before history (execution.SENSITIVE_EXTRA_DATA_KEYS).
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


def outcome_of(history: dict[str, Any]) -> str:
    status = history.get("status") or {}
    if status.get("status_str") == "success":
        return "success"
    events = [m[0] for m in status.get("messages", []) if isinstance(m, list) and m]
    return "interrupted" if "execution_interrupted" in events else "error"
