"""The farm: each backend's live state, polled about every second, published as immutable snapshots.

The scheduler reads `Farm.snapshot()`; nothing else mutates backend state. A backend is *available* when
its last poll succeeded, the proxy's upstream websocket to it is connected (a prompt submitted while
that socket is down would lose its events), it is not draining, its circuit breaker is closed and it is
not ejected as an outlier (`proxy.health`: failed requests reported through `mark_down`/`note_ok`, prompt
outcomes through `note_finished`).

A backend's queue count comes from the `status` frames on the socket this replica holds (ComfyUI sends
one on connect and on every queue change); a backend whose socket another replica holds, or none, has it
polled with `GET /prompt` (`exec_info.queue_remaining` = pending + running, the same count `/queue` gives,
without every queued graph). So a busy backend costs one request a poll interval (`/system_stats`, for
its VRAM), an idle one a few a minute (`IDLE_POLL_S`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import structlog

from proxy.capability import EMPTY, Catalogue, Catalogues, combo_values, combos_of, model_files
from proxy.config import BackendConfig, HealthConfig, SchedulerConfig
from proxy.errors import ProxyError
from proxy.health import CIRCUIT_STATES, FarmHealth, HealthView
from proxy.metrics import Metrics
from proxy.tasks import TaskOwner

log = structlog.get_logger(__name__)

DEFAULT_SCHEDULER = SchedulerConfig()
DEFAULT_HEALTH = HealthConfig()

OBJECT_INFO_REFRESH_S = 60.0
# A backend that is idle, healthy and followed over its socket is polled this often, not every poll
# interval: one or two requests each time, and object_info once a minute, so at most 5 requests a minute. Any sign
# of work (a prompt sent, started or ended there, a queue at its last poll) polls it at the next interval.
IDLE_POLL_S = 30.0


@dataclass(frozen=True)
class BackendState:
    """One backend as last seen. Replaced whole on every change, never edited in place."""

    config: BackendConfig
    polled_ok: bool = False
    upstream_connected: bool = False
    draining: bool = False
    queue_remaining: int = 0
    vram_total: int = 0
    vram_free: int = 0
    last_ok: float = 0.0
    last_error: str = ""
    queue_at: float = 0.0                  # when `queue_remaining` was true (a poll, or the socket's frame)
    node_classes: frozenset[str] = frozenset()
    combos: Mapping[tuple[str, str], frozenset[str]] = field(default_factory=dict, compare=False)
    loaded: frozenset[str] = frozenset()   # model files of the last prompt this replica saw start there
    devices: tuple[dict[str, Any], ...] = ()
    system: dict[str, Any] = field(default_factory=dict, compare=False)
    health: HealthView = HealthView()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def url(self) -> str:
        return self.config.url

    @property
    def available(self) -> bool:
        return self.polled_ok and self.upstream_connected and not self.draining and self.health.allows

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "url": self.url, "available": self.available, "healthy": self.polled_ok,
            "upstream_connected": self.upstream_connected, "draining": self.draining,
            "queue_remaining": self.queue_remaining, "vram_total": self.vram_total,
            "vram_free": self.vram_free, "max_inflight": self.config.max_inflight,
            "weight": self.config.weight, "labels": list(self.config.labels),
            "last_error": self.last_error, **self.health.describe(time.monotonic()),
        }


@dataclass(frozen=True)
class SharedFlags:
    """Where the farm reads what other replicas and operators decided."""

    drained: Callable[[], Awaitable[set[str]]]
    lease_holders: Callable[[], Awaitable[dict[str, str]]]
    lease_name: Callable[[str], str]
    owner: str


@dataclass
class _ObjectInfo:
    catalogue: Catalogue = EMPTY
    fetched_at: float = 0.0

    @property
    def info(self) -> dict[str, Any]:
        return self.catalogue.info


class Farm:
    """Owns backend snapshots, their poller task and the merged `/object_info`."""

    def __init__(self, *, backends: tuple[BackendConfig, ...], session: aiohttp.ClientSession,
                 settings: SchedulerConfig = DEFAULT_SCHEDULER, health: HealthConfig = DEFAULT_HEALTH,
                 metrics: Metrics | None = None) -> None:
        self._metrics = metrics
        self._health = FarmHealth(health)
        for b in backends:
            self._health.add(b.name)
        self._shared: SharedFlags | None = None
        self._local_upstream: dict[str, bool] = {b.name: False for b in backends}
        self._remote_upstream: dict[str, bool] = {b.name: False for b in backends}
        self._drain_writes = 0
        self._states: dict[str, BackendState] = {b.name: BackendState(config=b) for b in backends}
        self._polled_at: dict[str, float] = {}   # monotonic time of each backend's last poll
        self._touched: set[str] = set()          # backends with news since their last poll
        self._counted: set[str] = set()          # backends whose queue count comes from this replica's socket
        self._object_info: dict[str, _ObjectInfo] = {b.name: _ObjectInfo() for b in backends}
        self._catalogues = Catalogues()
        self._merged: dict[str, Any] | None = None
        self._merged_combos: dict[tuple[str, str], frozenset[str]] | None = None
        self._session = session
        self._interval = settings.poll_interval_s
        self._timeout = aiohttp.ClientTimeout(total=settings.backend_timeout_s)
        self._tasks = TaskOwner()
        self.changed = asyncio.Event()   # set whenever availability or load may allow more dispatch
        self._first_poll = asyncio.Event()
        for b in backends:
            self._export_health(b.name, HealthView())

    # --- reading -------------------------------------------------------------------------------------
    def snapshot(self) -> list[BackendState]:
        return list(self._states.values())

    def get(self, name: str) -> BackendState | None:
        return self._states.get(name)

    def url_of(self, name: str) -> str | None:
        state = self._states.get(name)
        return state.url if state else None

    def merged_object_info(self) -> dict[str, Any]:
        """Every node class any available backend offers; combo option lists are the union."""
        if self._merged is None:
            self._merged = merge_object_info(
                [self._object_info[s.name].info for s in self._states.values() if s.polled_ok])
        return self._merged

    def merged_combos(self) -> dict[tuple[str, str], frozenset[str]]:
        """Every (class, input) that is a combo on some backend: which prompt values to match per backend."""
        if self._merged_combos is None or self._merged is None:
            self._merged_combos = combos_of(self.merged_object_info())
        return self._merged_combos

    def object_info_of(self, name: str) -> Mapping[str, Any]:
        return self._object_info[name].info

    # --- changes -------------------------------------------------------------------------------------
    def _set(self, name: str, *, wake: bool = True, **changes: Any) -> None:
        old = self._states.get(name)
        if old is None:
            return  # removed by a reload while a poll was under way
        new = replace(old, **changes)
        if new != old:
            self._states[name] = new
            if (new.available != old.available or new.polled_ok != old.polled_ok
                    or new.node_classes != old.node_classes):
                self._merged = None
                log.info("backend_state", backend=name, available=new.available, healthy=new.polled_ok,
                         upstream=new.upstream_connected, draining=new.draining, error=new.last_error)
            if (new.health.circuit, new.health.ejected_until) != (old.health.circuit, old.health.ejected_until):
                log.warning("backend_health", backend=name, circuit=new.health.circuit,
                            failures=new.health.failures, ejected=new.health.ejected_until is not None)
                self._export_health(name, new.health)
            if wake:
                self.changed.set()

    def _export_health(self, name: str, health: HealthView) -> None:
        if self._metrics is None:
            return
        for state in CIRCUIT_STATES:
            self._metrics.backend_circuit.labels(name, state).set(1 if health.circuit == state else 0)
        self._metrics.backend_ejected.labels(name).set(0 if health.ejected_until is None else 1)

    def _refresh_health(self, name: str, **changes: Any) -> None:
        """Apply changes together with the backend's current health (an open wait may have run out)."""
        self._set(name, health=self._health.view(name, time.monotonic()), **changes)

    # --- reconfiguration (reload) ------------------------------------------------------------------------
    def add(self, config: BackendConfig) -> None:
        self._health.add(config.name)
        self._export_health(config.name, HealthView())
        self._states[config.name] = BackendState(config=config)
        self._object_info[config.name] = _ObjectInfo()
        self._local_upstream[config.name] = False
        self._remote_upstream[config.name] = False
        self.changed.set()

    def reconfigure(self, config: BackendConfig) -> None:
        """New weight, slots or labels for a known backend (its URL may change too: it is polled anew)."""
        self._set(config.name, config=config)

    def remove(self, name: str) -> None:
        for table in (self._states, self._object_info, self._local_upstream, self._remote_upstream,
                      self._polled_at):
            table.pop(name, None)  # type: ignore[attr-defined]
        self._touched.discard(name)
        self._counted.discard(name)
        self._catalogues.keep_only(i.catalogue for i in self._object_info.values())
        self._health.remove(name)
        if self._metrics is not None:
            for state in CIRCUIT_STATES:
                with contextlib.suppress(KeyError):
                    self._metrics.backend_circuit.remove(name, state)
            with contextlib.suppress(KeyError):
                self._metrics.backend_ejected.remove(name)
        self._merged = None
        self.changed.set()

    def touch(self, name: str) -> None:
        """Something happened at the backend (a prompt sent, started, ended): poll it at the next interval."""
        self._touched.add(name)

    def note_started(self, name: str, prompt: Mapping[str, Any]) -> None:
        """A prompt started on the backend: its model files are now the ones loaded there (affinity)."""
        self.touch(name)
        self.note_ok(name)
        models = model_files(combo_values(prompt, self.merged_combos()))
        if models and name in self._states:
            self._set(name, loaded=models)

    def note_ok(self, name: str) -> None:
        """A real request to the backend worked (a prompt accepted or started): failures were not consecutive."""
        breaker = self._health.breaker(name)
        if breaker is not None and breaker.failures:
            breaker.success(time.monotonic())
            self._refresh_health(name)

    def note_finished(self, name: str, outcome: str) -> None:
        """How a prompt on the backend ended (success, error, interrupted): feeds outlier ejection."""
        if name not in self._states:
            return
        self.touch(name)
        if self._health.outliers.outcome(name, outcome, time.monotonic()):
            log.warning("backend_ejected", backend=name, reason="its prompts keep ending in execution_error")
        self._refresh_health(name)

    def note_queue(self, name: str, remaining: int) -> None:
        """The backend's queue count from a `status` frame on this replica's socket: ComfyUI sends one on
        connect and on every change, so once one came the count needs no polling while the socket is open."""
        state = self._states.get(name)
        if state is not None:
            self._counted.add(name)
            # A longer queue never lets more be sent: only a shorter one wakes the dispatcher (three frames
            # a prompt at every backend would otherwise make a dispatch round each).
            self._set(name, wake=remaining < state.queue_remaining, queue_remaining=remaining, queue_at=time.time())

    def set_upstream(self, name: str, connected: bool) -> None:
        """This replica's own socket to the backend opened or closed."""
        if name not in self._states:
            return  # removed by a reload while its socket was closing
        self._local_upstream[name] = connected
        self._counted.discard(name)   # a new socket tells its count; without one, polls do
        if not connected:
            self.touch(name)
        self._refresh_upstream(name)

    def holds_upstream(self, name: str) -> bool:
        """This replica holds the backend's socket now (the backend's events arrive here)."""
        return self._local_upstream.get(name, False)

    def _refresh_upstream(self, name: str) -> None:
        # Events of a prompt reach its client if any replica holds the backend's socket (relay.bus).
        self._set(name, upstream_connected=self._local_upstream[name] or self._remote_upstream[name])

    def set_draining(self, name: str, draining: bool) -> None:
        """An operator's (or a reload's) decision, already written to the store."""
        self._drain_writes += 1
        self._set(name, draining=draining)

    def mark_down(self, name: str, reason: str) -> None:
        """Passive detection: a request to the backend failed (connection error, timeout, 5xx); stop using
        it until a poll succeeds, and count the failure in its circuit breaker."""
        breaker = self._health.breaker(name)
        if breaker is not None:
            breaker.failure(time.monotonic())
        self._refresh_health(name, polled_ok=False, last_error=reason)

    async def wait_connected(self, timeout_s: float) -> None:
        """At start-up: give upstream sockets of reachable backends a moment, so a fresh proxy is ready
        when it starts serving instead of refusing its first probes."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while any(s.polled_ok and not s.upstream_connected for s in self._states.values()):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            self.changed.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self.changed.wait()
            except TimeoutError:
                return

    def follow_shared_flags(self, shared: SharedFlags) -> None:
        """Read operators' drain flags and who holds each upstream socket (shared state) on every poll."""
        self._shared = shared

    def nudge(self) -> None:
        self.changed.set()

    # --- polling -------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._tasks.spawn(self._run(), name="farm-poller")
        try:
            await asyncio.wait_for(self._first_poll.wait(), timeout=self._timeout.total or 5)
        except TimeoutError:
            log.warning("first_poll_slow")

    async def stop(self) -> None:
        await self._tasks.stop()

    def _stale(self, state: BackendState, now: float) -> bool:
        """Whether a poll would tell something new: always, unless the backend is idle, healthy, followed
        over a socket and was polled within `IDLE_POLL_S`."""
        if (not state.polled_ok or not state.upstream_connected or state.queue_remaining
                or state.health.circuit != "closed" or state.name in self._touched):
            return True
        return now - self._polled_at.get(state.name, -IDLE_POLL_S) >= IDLE_POLL_S

    async def poll_once(self, *, every: bool = False) -> None:
        """Poll the backends whose state may have changed (`every`: all of them)."""
        now = time.monotonic()
        due = [s.name for s in self._states.values() if every or self._stale(s, now)]
        for name in due:
            self._polled_at[name] = now
            self._touched.discard(name)
        await asyncio.gather(*(self._poll(name) for name in due))
        if self._shared is not None:
            # A drain set here while the flags were being read is newer than what was read; the next poll
            # brings it back from the store.
            writes = self._drain_writes
            try:
                drained = await self._shared.drained()
                holders = await self._shared.lease_holders()
            except ProxyError as exc:  # the store is down: keep the last known flags
                log.warning("shared_flags_unavailable", error=exc.details)
            else:
                for name in list(self._states):
                    if writes == self._drain_writes:
                        self._set(name, draining=name in drained)
                    holder = holders.get(self._shared.lease_name(name))
                    self._remote_upstream[name] = holder is not None and holder != self._shared.owner
                    self._refresh_upstream(name)

    async def _run(self) -> None:
        while True:
            await self.poll_once()
            self._first_poll.set()
            await asyncio.sleep(self._interval)

    async def _poll(self, name: str) -> None:
        state = self._states[name]
        breaker = self._health.breaker(name)
        # The queue count arrives on the socket this replica holds (`note_queue`); else it is polled.
        followed = name in self._counted
        try:
            stats, depth = await asyncio.gather(self._get_json(state.url + "/system_stats"),
                                                self._none() if followed else self._get_json(state.url + "/prompt"))
            info = self._object_info.get(name)
            if info is None:
                return   # removed (a reload, the membership) while this poll was under way
            fresh = not state.polled_ok or time.monotonic() - info.fetched_at > OBJECT_INFO_REFRESH_S
            if fresh:
                catalogue = self._catalogues.parse(await self._get_bytes(state.url + "/object_info"))
                info.fetched_at = time.monotonic()
                if catalogue is not info.catalogue:
                    info.catalogue = catalogue
                    self._merged = None
                    self._catalogues.keep_only(i.catalogue for i in self._object_info.values())
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            if self._metrics is not None:
                self._metrics.backend_errors.labels(name, "poll").inc()
            if state.polled_ok or not state.last_error:
                log.warning("backend_poll_failed", backend=name, error=repr(exc))
            if breaker is not None:
                breaker.probe(False, time.monotonic())  # decides only when half-open: this poll is the probe
            self._refresh_health(name, polled_ok=False, last_error=repr(exc))
            return
        if breaker is not None:
            breaker.probe(True, time.monotonic())
        devices = tuple(stats.get("devices") or ())
        self._refresh_health(
            name,
            polled_ok=True,
            last_error="",
            last_ok=time.time(),
            **(self._polled_depth(name, depth)),
            vram_total=sum(int(d.get("vram_total") or 0) for d in devices),
            vram_free=sum(int(d.get("vram_free") or 0) for d in devices),
            devices=devices,
            system=stats.get("system") or {},
            node_classes=info.catalogue.node_classes,
            combos=info.catalogue.combos,
        )

    @staticmethod
    async def _none() -> None:
        return None

    def _polled_depth(self, name: str, depth: Any) -> dict[str, Any]:
        """The polled queue count, unless the socket told a newer one while the poll was under way."""
        if depth is None or name in self._counted:
            return {}
        return {"queue_remaining": int(depth.get("exec_info", {}).get("queue_remaining", 0)), "queue_at": time.time()}

    async def _get_bytes(self, url: str) -> bytes:
        async with self._session.get(url, timeout=self._timeout) as resp:
            if resp.status != 200:
                raise aiohttp.ClientResponseError(resp.request_info, resp.history, status=resp.status)
            return await resp.read()

    async def _get_json(self, url: str) -> Any:
        async with self._session.get(url, timeout=self._timeout) as resp:
            if resp.status != 200:
                raise aiohttp.ClientResponseError(resp.request_info, resp.history, status=resp.status)
            return await resp.json(content_type=None)


def merge_object_info(infos: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Union of node classes; for a class on several backends, combo options are the union of theirs."""
    merged: dict[str, Any] = {}
    for info in {id(i): i for i in infos}.values():   # alike backends share one catalogue: merged once
        for cls, spec in info.items():
            if cls not in merged:
                merged[cls] = spec
            else:
                merged[cls] = _merge_class(merged[cls], spec)
    return merged


def _merge_class(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    inputs = {k: dict(v) if isinstance(v, dict) else v for k, v in (a.get("input") or {}).items()}
    for section, specs in (b.get("input") or {}).items():
        if not isinstance(specs, dict):
            continue
        target = inputs.setdefault(section, {})
        for name, spec in specs.items():
            target[name] = _merge_input(target[name], spec) if name in target else spec
    out["input"] = inputs
    return out


def _merge_input(a: Any, b: Any) -> Any:
    """Union of combo options in either of ComfyUI's two combo forms (protocol §6)."""
    if not (isinstance(a, list) and isinstance(b, list) and a and b):
        return a
    if isinstance(a[0], list) and isinstance(b[0], list):
        return [_union(a[0], b[0]), *a[1:]]
    if a[0] == "COMBO" and b[0] == "COMBO" and len(a) > 1 and len(b) > 1:
        opts_a = (a[1] or {}).get("options", [])
        opts_b = (b[1] or {}).get("options", [])
        return ["COMBO", {**a[1], "options": _union(opts_a, opts_b)}, *a[2:]]
    return a


def _union(a: list[Any], b: list[Any]) -> list[Any]:
    seen = list(a)
    present = set(map(repr, a))
    for item in b:
        if repr(item) not in present:
            seen.append(item)
            present.add(repr(item))
    return seen
