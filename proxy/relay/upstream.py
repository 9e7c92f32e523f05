"""One websocket per backend, under the proxy's own client id, reconnecting with backoff.

Prompts are submitted to a backend under this id (PRODUCT.md, "Events"), so this socket receives every
event of every prompt the proxy sent there, whether or not the prompt's client is connected. While the
socket is down the backend is unavailable for dispatch; after a reconnect the prompts pinned to the
backend are reconciled with its `/queue` and `/history`, since events sent meanwhile are lost. The holder
of the socket also announces ends that a replica recorded but died before sending (proxy.relay.announce).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime

import aiohttp
import structlog

from proxy.backend_client import BackendClient, BackendUnreachable
from proxy.backends import Farm
from proxy.errors import ProxyError, StoreUnavailable
from proxy.relay.announce import announce_ends
from proxy.relay.messages import execution_error, queue_remaining_of
from proxy.relay.router import STATUS_PREFIX, EventRouter
from proxy.store import DISPATCHED, Store
from proxy.tasks import TaskOwner

log = structlog.get_logger(__name__)

BACKOFF_MAX_S = 5.0
LEASE_TTL_MS = 10_000   # another replica takes over a backend's socket within this after a replica dies
RENEW_S = LEASE_TTL_MS / 3000
SWEEP_EVERY = 3         # lease renewals between two sweeps for orphaned prompts (about 10 s)
ORPHAN_GRACE_S = 2.0    # a claim this young may still be on its way to the backend
HELD_RETRY_S = 0.5      # frames held while the store is away are tried again this often
DRAIN_S = 10.0          # frames read before a socket closed are handled for this long at most
HELD_MAX = 100_000      # frames held at most (about a minute of a busy backend's progress and previews)


def lease_name(backend: str) -> str:
    return f"upstream:{backend}"


def presence_name(replica: str) -> str:
    """The lease a replica's dispatcher holds while it lives."""
    return f"replica:{replica}"


def upstream_client_id(key_prefix: str, backend: str) -> str:
    """Stable across restarts and replicas, so a backend's events keep reaching whoever holds the socket."""
    return f"comfy-proxy-{key_prefix}-{backend}"


class Upstream:
    def __init__(self, *, backend: str, farm: Farm, router: EventRouter, store: Store, client: BackendClient,
                 session: aiohttp.ClientSession, client_id: str, owner: str,
                 wants_logs: Callable[[], bool] = lambda: False) -> None:
        self.owner = owner
        self.wants_logs = wants_logs   # some client, on any replica, subscribed to console logs
        self.backend = backend
        self.farm = farm
        self.router = router
        self.store = store
        self.client = client
        self.session = session
        self.client_id = client_id
        self._tasks = TaskOwner()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._dropped_at: str | None = None   # when the last socket closed, as ComfyUI writes log times
        self._needs_reconcile = False
        self._held: deque[str | bytes] = deque()   # frames read and not yet handled (`_read`)
        self._arrived = asyncio.Event()             # a frame was read, or the socket closed
        self._closing = False

    def start(self) -> None:
        self._tasks.spawn(self._run(), name=f"upstream-{self.backend}")

    async def stop(self) -> None:
        await self._tasks.stop()
        if self._ws is not None:
            await self._ws.close()
        # Hand the socket over now rather than after the lease expires.
        with contextlib.suppress(ProxyError):
            await self.store.drop_lease(lease_name(self.backend), self.owner)

    async def _holds_lease(self) -> bool:
        try:
            return await self.store.hold_lease(lease_name(self.backend), self.owner, LEASE_TTL_MS)
        except ProxyError as exc:
            log.warning("upstream_lease_unavailable", backend=self.backend, error=exc.details)
            return False

    async def _run(self) -> None:
        """Hold the lease, then the socket; ComfyUI keeps one socket per clientId, so only one replica
        may hold it (a second connection under the same id would take the events away)."""
        delay = 0.1
        while True:
            if not await self._holds_lease():
                await asyncio.sleep(RENEW_S)
                continue
            state = self.farm.get(self.backend)
            assert state is not None
            ws_url = state.url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
            try:
                async with self.session.ws_connect(ws_url, heartbeat=20, max_msg_size=0) as ws:
                    self._ws = ws
                    delay = 0.1
                    log.info("upstream_connected", backend=self.backend)
                    await self.reconcile()
                    if self.wants_logs():   # a restarted backend forgot who wanted its console lines
                        await self._resubscribe_logs(state.url)
                    self.farm.set_upstream(self.backend, True)
                    renewer = self._tasks.spawn(self._renew(ws), name=f"upstream-lease-{self.backend}")
                    try:
                        await self._read(ws)
                    finally:
                        renewer.cancel()
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.debug("upstream_connect_failed", backend=self.backend, error=repr(exc))
            except ProxyError as exc:   # the store failed mid-reconcile: reconnect, or the backend is lost for good
                log.warning("upstream_reconcile_failed", backend=self.backend, error=exc.details)
            finally:
                if self._ws is not None:
                    self._dropped_at = datetime.now().isoformat()
                self._ws = None
                self.farm.set_upstream(self.backend, False)
                self.router.socket_closed(self.backend)
                with contextlib.suppress(ProxyError):
                    await self.store.drop_lease(lease_name(self.backend), self.owner)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _resubscribe_logs(self, url: str) -> None:
        """Ask for console lines again, then relay what the backend wrote since the socket dropped: a prompt
        may have run meanwhile (dispatch goes by HTTP), and its lines would be missing from the panel.
        The drop's time is this replica's clock against the backend's line times (ComfyUI's local
        `isoformat()`): alike for a farm on one time zone, and after the first line relayed the backend's
        own times are used."""
        with contextlib.suppress(BackendUnreachable):
            await self.client.subscribe_logs(url, self.client_id)
            if self._dropped_at is not None:
                self.router.relay_missed_logs(self.backend, await self.client.raw_logs(url), self._dropped_at)

    async def _renew(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Keep the lease while the socket lives; a lease lost (Redis gone past the TTL, or taken) closes it."""
        loop = asyncio.get_running_loop()
        held_until = loop.time() + LEASE_TTL_MS / 1000
        for renewal in itertools.count(1):
            await asyncio.sleep(RENEW_S)
            try:
                held = await self.store.hold_lease(lease_name(self.backend), self.owner, LEASE_TTL_MS)
            except ProxyError:
                held = loop.time() < held_until - RENEW_S  # the store is down: ours until it would expire
            else:
                held_until = loop.time() + LEASE_TTL_MS / 1000 if held else 0.0
                if held and self._needs_reconcile and not self._held:
                    self._needs_reconcile = False
                    try:
                        await self.reconcile()
                    except ProxyError:
                        self._needs_reconcile = True
                if held and renewal % SWEEP_EVERY == 0:
                    with contextlib.suppress(ProxyError):
                        await self.sweep_orphans()
                    await self.announce_ends()
            if not held:
                log.warning("upstream_lease_lost", backend=self.backend)
                await ws.close()
                return

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Read frames as they come and hand them, in order, to `_process`: the reader never waits on what
        handling a frame costs (a prompt's end fetches its history from the backend and stores it), so the
        socket is drained and its heartbeat answered however slow that is. A text frame that needs the store
        while it is away (a prompt's record to attribute it, its end to store) waits, with every frame after
        it, until the store answers: a Redis failover delays a client's progress, never loses it."""
        self._closing = False
        processor = self._tasks.spawn(self._process(), name=f"upstream-events-{self.backend}")
        try:
            await self._receive(ws)
        except BaseException:
            processor.cancel()
            await asyncio.gather(processor, return_exceptions=True)
            raise
        # Nothing is sent to it while its last frames are handled (their ends fetch its history, which a
        # dead backend answers only with a timeout); what is not handled in DRAIN_S is left to reconcile.
        self.farm.set_upstream(self.backend, False)
        self._closing = True
        self._arrived.set()
        try:
            async with asyncio.timeout(DRAIN_S):
                await processor
        except TimeoutError:
            await asyncio.gather(processor, return_exceptions=True)
        if self._held:   # the ends among them are settled from the backend's history (reconcile)
            log.warning("upstream_held_frames_lost", backend=self.backend, frames=len(self._held))
            self._held.clear()
            self._needs_reconcile = True
        log.warning("upstream_closed", backend=self.backend)

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.ERROR):
                return
            if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                continue
            if len(self._held) < HELD_MAX:
                self._held.append(msg.data)
                self._arrived.set()
            else:
                log.error("upstream_frame_dropped", backend=self.backend, held=len(self._held))
                self._needs_reconcile = True

    async def _process(self) -> None:
        """The frames read, in order; while the store is away, tried again every `HELD_RETRY_S`. Once the
        socket closed, what is left after a failure is given up (settled by the next reconcile)."""
        waited = False
        while True:
            while self._held:
                if not await self._handled(self._held[0]):   # the store is away
                    if self._closing:
                        return
                    waited = True
                    await asyncio.sleep(HELD_RETRY_S)
                    continue
                self._held.popleft()
                if waited and not self._held:
                    waited = False
                    log.info("upstream_held_frames_handled", backend=self.backend)
            if self._closing:
                return
            self._arrived.clear()
            await self._arrived.wait()

    async def _handled(self, frame: str | bytes) -> bool:
        """`_handle`, surviving anything it raises: a frame that breaks its handler is dropped (its prompt's
        end is settled by the next reconcile) rather than stopping every frame after it."""
        try:
            return await self._handle(frame)
        except Exception:   # a bug in a handler must not leave the backend connected and deaf
            log.exception("upstream_frame_failed", backend=self.backend)
            self._needs_reconcile = True
            return True

    async def _handle(self, frame: str | bytes) -> bool:
        """Hand one frame to the router; False: it needs the store, which is away (the caller holds it)."""
        if isinstance(frame, bytes):
            self.router.on_binary(self.backend, frame)
            return True
        if frame.startswith(STATUS_PREFIX):   # the backend's queue count: the farm's, never relayed
            remaining = queue_remaining_of(frame)
            if remaining is not None:
                self.farm.note_queue(self.backend, remaining)
            return True
        try:
            await self.router.on_text(self.backend, frame)
        except StoreUnavailable as exc:
            log.warning("upstream_event_held", backend=self.backend, error=exc.details)
            return False
        except ProxyError as exc:   # settled from the backend's history by the next reconcile
            log.warning("upstream_event_unrecorded", backend=self.backend, error=exc.details)
            self._needs_reconcile = True
        return True

    async def sweep_orphans(self) -> None:
        """Prompts pinned here by a replica that died between claiming them and sending them: the backend
        never heard of them and no one else will send them, so they go back to the queue."""
        pinned = await self.store.inflight_at(self.backend)
        if not pinned:
            return
        alive = set(await self.store.lease_holders())
        now = time.time()
        orphans = [r for r in await self.store.get_many(pinned)
                   if r.state == DISPATCHED and r.dispatcher and presence_name(r.dispatcher) not in alive
                   and now - (r.dispatched_at or 0.0) > ORPHAN_GRACE_S]
        if not orphans:
            return
        state = self.farm.get(self.backend)
        assert state is not None
        try:
            at_backend = await self.client.queue_ids(state.url)
            for rec in orphans:
                if rec.prompt_id in at_backend or await self.client.history(state.url, rec.prompt_id) is not None:
                    continue   # it did arrive: its events settle it
                if await self.store.requeue(rec.prompt_id, from_backend=self.backend):
                    log.warning("orphan_requeued", prompt_id=rec.prompt_id, backend=self.backend, tenant=rec.tenant,
                                dispatcher=rec.dispatcher)
                    self.router.forget(self.backend, rec.prompt_id)
                    self.farm.nudge()
        except BackendUnreachable as exc:
            log.warning("orphan_sweep_failed", backend=self.backend, error=str(exc))

    async def announce_ends(self) -> None:
        """Ends another replica recorded and may not have sent (it died): their clients are told now."""
        try:
            await announce_ends(self.store, self.router)
        except ProxyError as exc:   # left for the next sweep
            log.warning("end_announcement_failed", backend=self.backend, error=exc.details)

    async def reconcile(self) -> None:
        """Settle prompts pinned here whose events may have been missed while the socket was down, and
        announce ends left unsent by a replica that held it before."""
        await self.announce_ends()
        pinned = await self.store.inflight_at(self.backend)
        if not pinned:
            return
        state = self.farm.get(self.backend)
        assert state is not None
        try:
            at_backend = await self.client.queue_ids(state.url)
        except BackendUnreachable as exc:
            log.warning("reconcile_failed", backend=self.backend, error=str(exc))
            return
        for prompt_id in pinned:
            if prompt_id in at_backend:
                continue
            rec = await self.store.get(prompt_id)
            if rec is None:
                continue
            try:
                entry = await self.client.history(state.url, prompt_id)
            except BackendUnreachable as exc:
                log.warning("reconcile_failed", backend=self.backend, error=str(exc))
                return
            if entry is not None:
                await self.router.complete_from_backend_history(rec, self.backend, entry)
            elif rec.state == DISPATCHED:
                # Accepted by us, never seen by the backend (it restarted): dispatch it again.
                log.warning("prompt_requeued", prompt_id=prompt_id, backend=self.backend, tenant=rec.tenant)
                await self.store.requeue(prompt_id)
                self.farm.nudge()
            else:
                await self.router.fail(rec, _lost_error(prompt_id, self.backend))


def _lost_error(prompt_id: str, backend: str) -> dict[str, object]:
    return execution_error(prompt_id, f"Backend {backend} lost the prompt while it was running "
                                      "(it restarted or dropped its queue).", "BackendLost")
