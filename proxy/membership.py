"""The farm's backends at runtime, one set for every replica: the config file's list is the starting set,
and the shared membership in the state store (`Store.members`) overlays it: backends added through
`POST /proxy/backends`, by DNS discovery or by a join agent, config backends changed (`PATCH`) or deleted
(`DELETE`) through the API. Every replica reads it each poll interval (at once on the replica that took
the change) and applies it with the reloader, so a backend added on one replica takes prompts from
every replica within two poll intervals.

A deleted backend is `leaving`: drained (no new prompts) while what runs or waits there finishes, then
forgotten. A forced delete, or a join agent's lease that lapsed (its agent is gone, as a dead backend's
would be), evicts it at once: its prompts go back to the proxy's queue at their old places and run
elsewhere. A config backend deleted through the API stays gone (a `removed` entry) until it is added
again, whatever the file says.

The farm's catalogue (its merged `/object_info`) is kept in the store too, so a farm scaled to zero still
validates and queues prompts; the first backend to come up runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import structlog

from proxy.backend_client import BackendClient, BackendUnreachable
from proxy.backends import Farm
from proxy.config import BackendConfig
from proxy.errors import ProxyError
from proxy.store import Store
from proxy.store.base import Member
from proxy.tasks import TaskOwner

log = structlog.get_logger(__name__)

Apply = Callable[..., Awaitable[dict[str, Any]]]


def member_of(config: BackendConfig, **more: Any) -> Member:
    return Member(name=config.name, url=config.url, max_inflight=config.max_inflight, weight=config.weight,
                  labels=tuple(config.labels), min_vram_free_mb=config.min_vram_free_mb, **more)


def config_of(member: Member) -> BackendConfig:
    return BackendConfig(name=member.name, url=member.url, max_inflight=member.max_inflight,
                         weight=member.weight, labels=tuple(member.labels), min_vram_free_mb=member.min_vram_free_mb)


class Membership:
    def __init__(self, *, store: Store, farm: Farm, client: BackendClient, apply: Apply,
                 move_off: Callable[[str, str], Awaitable[list[str]]],
                 config_backends: tuple[BackendConfig, ...], interval_s: float) -> None:
        self.store = store
        self.farm = farm
        self.client = client
        self._apply = apply         # FarmReloader.apply
        self._move_off = move_off   # Dispatcher.move_off
        self._config = {b.name: b for b in config_backends}
        self._interval = interval_s
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._tasks = TaskOwner()
        self._kept: dict[str, Any] | None = None     # the farm's catalogue as last put in the store
        self.stored: dict[str, Any] | None = None    # the store's, read while no backend is up

    @property
    def config_backends(self) -> dict[str, BackendConfig]:
        return dict(self._config)

    async def start(self) -> None:
        with contextlib.suppress(ProxyError):   # a store that is away: the config's backends, until it answers
            await self.sync()
        self._tasks.spawn(self._loop(), name="membership")

    async def stop(self) -> None:
        await self._tasks.stop()

    def nudge(self) -> None:
        self._wake.set()

    async def set_config(self, backends: tuple[BackendConfig, ...]) -> dict[str, Any]:
        """The config file's backends changed (a reload): applied under the shared membership."""
        self._config = {b.name: b for b in backends}
        return await self.sync()

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            try:
                await self.sync()
            except ProxyError as exc:
                log.warning("membership_unread", error=exc.details)
            except Exception:   # the loop outlives one bad round
                log.exception("membership_failed")

    async def sync(self) -> dict[str, Any]:
        """Read the shared membership and apply it to this replica's farm; returns what changed."""
        async with self._lock:
            members = await self.store.members()
            now = time.time()
            for member in list(members.values()):
                if member.lease_until is not None and member.lease_until < now and not member.removed:
                    log.warning("backend_lease_lapsed", backend=member.name, source=member.source)
                    members[member.name] = await self._evict(member)
            wanted = dict(self._config)
            leaving: set[str] = set()
            for member in members.values():
                if member.removed:
                    wanted.pop(member.name, None)
                    continue
                wanted[member.name] = config_of(member)
                if member.leaving:
                    leaving.add(member.name)
            result = await self._apply(tuple(wanted.values()), keep_drained=leaving)
            if leaving:
                await self._drain(leaving, members)
            await self._keep_catalogue()
            return result

    async def _keep_catalogue(self) -> None:
        """The farm's node and model catalogue (merged `/object_info`) in the store whenever it changes, so
        prompts are validated and queued while no backend is up (scaled to zero, all down)."""
        merged = self.farm.merged_object_info()
        if merged:
            if merged is not self._kept:
                await self.store.catalogue_put(merged)
                self._kept = merged
            self.stored = None
        elif self.stored is None:
            self.stored = await self.store.catalogue()

    def catalogue(self) -> dict[str, Any]:
        """What admission validates against: the live farm's, else the last one kept."""
        return self.farm.merged_object_info() or self.stored or {}

    async def _drain(self, leaving: set[str], members: dict[str, Member]) -> None:
        """Leaving backends take no new prompt; once nothing of theirs is in flight they are forgotten."""
        inflight = await self.store.inflight()
        gone = False
        for name in sorted(leaving):
            await self.store.set_drained(name, True)
            self.farm.set_draining(name, True)
            if not inflight.get(name):
                await self._forget(members[name])
                gone = True
        if gone:
            self._wake.set()   # the next round removes them from the farm

    async def _forget(self, member: Member) -> Member:
        log.info("backend_left", backend=member.name, source=member.source)
        if member.name in self._config:   # else the file would bring it back
            kept = replace(member, removed=True, leaving=False, lease_until=None)
            await self.store.member_put(kept)
            return kept
        await self.store.member_drop(member.name)
        return replace(member, removed=True)

    async def _evict(self, member: Member) -> Member:
        """Out at once: its prompts back to the queue (each only if still pinned there: another replica
        may be doing the same), those waiting at the backend deleted there (it may be alive), then
        forgotten. A prompt running there is not interrupted: its end would race its run elsewhere on a
        replica that still routes the backend's events; the backend's socket closes as it leaves."""
        await self.store.set_drained(member.name, True)   # first: no dispatch round may send them back there
        self.farm.set_draining(member.name, True)
        moved = await self._move_off(member.name, "left the farm")
        if moved:
            with contextlib.suppress(BackendUnreachable):
                await self.client.post_bare(member.url, "/queue", {"delete": moved})
        return await self._forget(member)

    # --- changes through the API ----------------------------------------------------------------------
    async def current(self, name: str) -> Member | None:
        """A backend's membership entry as it stands (a config backend's, unless the API changed it)."""
        found = (await self.store.members()).get(name)
        if found is not None:
            return None if found.removed else found
        config = self._config.get(name)
        return None if config is None else member_of(config, source="config")

    async def put(self, member: Member) -> dict[str, Any]:
        await self.store.member_put(member)
        return await self.sync()

    async def leave(self, member: Member, *, force: bool) -> None:
        if force:
            await self._evict(member)
        else:
            await self.store.member_put(replace(member, leaving=True))
        await self.sync()
