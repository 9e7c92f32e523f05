"""Copies of outputs in the file store (`proxy.files`): made as soon as a prompt names its files, retried
until they land, removed when their retention ends.

The queue of copies lives in the state store (`copies_due` and friends), not in this process: a copy is
claimed with a lease, so when a replica dies mid-copy another one makes it once the lease lapses, and a
copy that fails (S3 down, the backend briefly away) comes back with exponential backoff. Until a copy has
landed, `/view` serves the file from its backend; afterwards never again from there.

Copies start at the `executed` message (ComfyUI has written the file by then), not at the prompt's end,
so the end is announced without waiting for any copy: what a copy adds to `executing` null is one more
script in the end's round trip to the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import replace

import aiohttp
import structlog

from proxy.backends import Farm
from proxy.config import Config
from proxy.errors import ProxyError
from proxy.files import FileStore, FileStoreUnavailable
from proxy.files.base import CHUNK, content_type, join_key, key_part
from proxy.files.opening import key_prefix
from proxy.metrics import Metrics
from proxy.outputs import client_filename
from proxy.sampler import tenant_label
from proxy.store import Store
from proxy.store.base import OutputRef
from proxy.tasks import TaskOwner

log = structlog.get_logger(__name__)

COPY_LEASE_S = 120.0     # a claimed copy not reported within this is made by whoever claims it next
BACKOFF_S = 1.0          # after the first failure; doubles per failure
BACKOFF_CAP_S = 60.0
MAX_FAILURES = 100       # then the copy is given up (about an hour and a half of trying at the cap)
POLL_S = 1.0             # copies queued by other replicas are found at least this often
SWEEP_LEASE_S = 60.0
SWEEP_BATCH = 1000       # files removed per round (S3's DeleteObjects takes 1000 keys)
CHECK_EVERY_S = 5.0      # the file store's health, and the shared gauges
_READ_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)


class CopyFailed(Exception):
    """A copy that may work later; `reason` labels the failure metric."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def copy_key(prefix: str, ref: str, out: OutputRef) -> str:
    """`<prefix>/<tenant>/<prompt_id>/[<subfolder>/]<name>`, the name as clients know it (it carries the
    reference, so two backends' `ComfyUI_00001_.png` of one prompt, say after a retry, never collide)."""
    subfolder = "/".join(key_part(part) for part in out.subfolder.split("/") if part)
    return join_key(prefix, key_part(out.tenant), key_part(out.prompt_id), subfolder,
                    key_part(client_filename(out.filename, ref)))


class OutputKeeper:
    def __init__(self, *, store: Store, files: FileStore, farm: Farm, session: aiohttp.ClientSession,
                 metrics: Metrics, config: Config) -> None:
        self.store = store
        self.files = files
        self.farm = farm
        self.session = session
        self.metrics = metrics
        self.config = config
        self.prefix = key_prefix(config.outputs)
        self.problem: str | None = None   # why the file store failed its last check or copy; None when fine
        self._wake = asyncio.Event()
        self._copying: set[str] = set()
        self._tasks = TaskOwner()
        self._copies = TaskOwner()
        self._tenants_seen: set[str] = set()

    def nudge(self) -> None:
        """Copies were queued: look now rather than at the next poll."""
        self._wake.set()

    async def start(self) -> None:
        self._tasks.spawn(self._copy_loop(), name="output-copies")
        self._tasks.spawn(self._sweep_loop(), name="output-retention")
        self._tasks.spawn(self._watch_loop(), name="output-store-watch")

    async def stop(self) -> None:
        """Copies cut short come back to the queue when their lease lapses."""
        await self._tasks.stop()
        await self._copies.stop()

    # --- copies -------------------------------------------------------------------------------------
    async def _copy_loop(self) -> None:
        while True:
            self._wake.clear()
            free = self.config.outputs.copy_concurrency - len(self._copying)
            claimed: list[str] = []
            if free > 0:
                try:
                    claimed = await self.store.copies_due(time.time(), COPY_LEASE_S, free)
                except ProxyError as exc:
                    log.warning("copies_unread", error=exc.details)
            for ref in claimed:
                if ref not in self._copying:
                    self._copying.add(ref)
                    self._copies.spawn(self._copy(ref), name="output-copy")
            if claimed and len(claimed) == free:
                continue   # more may be due
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_S)

    async def _copy(self, ref: str) -> None:
        started = time.perf_counter()
        try:
            out = await self.store.resolve_output(ref)
            if out is None or out.stored or not out.keep:
                await self.store.copy_dropped(ref)   # expired, removed, or copied by someone else already
                return
            if await self._copy_file(ref, out):
                self.metrics.copy_seconds.observe(time.perf_counter() - started)
        except CopyFailed as exc:
            await self._failed(ref, exc.reason, str(exc))
        except FileStoreUnavailable as exc:
            self.problem = str(exc)
            await self._failed(ref, "store", str(exc))
        except ProxyError as exc:   # the state store: the lease brings the copy back
            log.warning("copy_unrecorded", ref=ref, error=exc.details)
        except Exception as exc:   # anything else would end the task unseen and leave the copy claimed
            log.exception("copy_error", ref=ref)
            await self._failed(ref, "error", repr(exc))
        finally:
            self._copying.discard(ref)
            self._wake.set()

    async def _copy_file(self, ref: str, out: OutputRef) -> bool:
        """Whether the copy was made (not: the file is gone, or its reference went meanwhile)."""
        url = self.farm.url_of(out.backend)
        if url is None:
            raise CopyFailed("backend", f"backend {out.backend} is not in the farm")
        key = copy_key(self.prefix, ref, out)
        params = {"filename": out.filename, "subfolder": out.subfolder, "type": out.type}
        try:
            async with self.session.get(url + "/view", params=params, timeout=_READ_TIMEOUT) as resp:
                if resp.status == 404:
                    self.metrics.copy_failures.labels("missing").inc()
                    log.error("output_lost", ref=ref, backend=out.backend, filename=out.filename)
                    await self.store.copy_dropped(ref)
                    return False
                if resp.status != 200:
                    raise CopyFailed("backend", f"GET /view answered {resp.status}")
                stored = await self.files.put(key, resp.content.iter_chunked(CHUNK), content_type(out.filename))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CopyFailed("backend", repr(exc)) from exc
        self.problem = None
        expires = time.time() + self.config.outputs_ttl_s(out.tenant)
        kept = replace(out, stored=stored.key, size=stored.size, expires=expires)
        if not await self.store.copy_done(ref, kept):
            try:   # the reference went meanwhile: nobody can ask for the copy
                await self.files.delete([stored.key])
            except FileStoreUnavailable as exc:
                log.warning("orphan_copy", key=stored.key, error=str(exc))
            return False
        self.metrics.copied_files.inc()
        self.metrics.copied_bytes.inc(stored.size)
        return True

    async def _failed(self, ref: str, reason: str, detail: str) -> None:
        self.metrics.copy_failures.labels(reason).inc()
        try:
            failures = await self.store.copy_failed(ref, time.time(), BACKOFF_S, BACKOFF_CAP_S)
            if failures == 0:
                return   # made or dropped by someone else meanwhile
            if failures >= MAX_FAILURES:
                self.metrics.copy_failures.labels("given_up").inc()
                log.error("copy_given_up", ref=ref, failures=failures, error=detail)
                await self.store.copy_dropped(ref)
                return
        except ProxyError as exc:
            log.warning("copy_unrecorded", ref=ref, error=exc.details)
            return
        self.metrics.copy_retries.inc()
        log.warning("copy_failed", ref=ref, reason=reason, failures=failures, error=detail)

    # --- retention ----------------------------------------------------------------------------------
    def sweep_every_s(self) -> float:
        """Often enough that a file outlives its retention by a small part of it."""
        shortest = min([self.config.outputs_ttl_s(t.name) for t in self.config.tenants]
                       + [self.config.outputs_ttl_s("")])
        return min(max(shortest / 4, 0.5), 60.0)

    async def _sweep_loop(self) -> None:
        while True:
            try:
                removed = await self.sweep()
            except (ProxyError, FileStoreUnavailable) as exc:
                log.warning("retention_sweep_failed", error=str(exc))
                removed = 0
            if removed < SWEEP_BATCH:
                await asyncio.sleep(self.sweep_every_s())

    async def sweep(self) -> int:
        """Remove one batch of copies past their retention; how many went."""
        expired = await self.store.files_expired(time.time(), SWEEP_LEASE_S, SWEEP_BATCH)
        if not expired:
            return 0
        await self.files.delete([out.stored for out in expired.values() if out.stored])
        await self.store.files_removed(expired)
        self.metrics.files_expired.inc(len(expired))
        log.info("outputs_expired", files=len(expired))
        return len(expired)

    # --- health and gauges --------------------------------------------------------------------------
    async def _watch_loop(self) -> None:
        while True:
            await self.watch()
            await asyncio.sleep(CHECK_EVERY_S)

    async def watch(self) -> None:
        was = self.problem
        try:
            await self.files.check()
        except FileStoreUnavailable as exc:
            self.problem = str(exc)
            if was is None:
                log.warning("file_store_unavailable", kind=self.files.kind, error=self.problem)
        else:
            self.problem = None
            if was is not None:
                log.info("file_store_available", kind=self.files.kind)
        self.metrics.file_store_up.set(0 if self.problem else 1)
        try:
            self.metrics.copy_backlog.set(await self.store.copy_backlog())
            used = {tenant_label(t): n for t, n in (await self.store.storage_used()).items()}
        except ProxyError:
            return
        for tenant in self._tenants_seen | set(used):
            self.metrics.stored_bytes.labels(tenant).set(used.get(tenant, 0))
        self._tenants_seen |= set(used)
