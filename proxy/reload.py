"""Configuration reload (SIGHUP, `POST /proxy/reload`): backends added, removed or re-weighted without a
restart and without losing a prompt.

An added backend gets its upstream socket and is polled at once, so it takes prompts within two poll
intervals. A removed one is drained first — no new prompts, while those queued or running there finish —
and only then forgotten, its socket closed. Other settings (listen address, store, tenants) need a restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from proxy.backends import Farm
from proxy.config import BackendConfig, load_config
from proxy.dispatch import Dispatcher
from proxy.relay.upstream import Upstream
from proxy.store import Store
from proxy.tasks import TaskOwner
from proxy.workflows import load_templates

log = structlog.get_logger(__name__)

RETIRE_CHECK_S = 0.5


class FarmReloader:
    """Applies a config file's backends and workflow templates to the running application."""

    def __init__(self, *, farm: Farm, store: Store, dispatcher: Dispatcher, upstreams: dict[str, Upstream],
                 make_upstream: Callable[[str], Upstream], client_id: Callable[[str], str],
                 workflows: dict[str, Any]) -> None:
        self.farm = farm
        self.store = store
        self.dispatcher = dispatcher
        self.upstreams = upstreams
        self.workflows = workflows   # the application's template table, changed in place
        self._make_upstream = make_upstream
        self._client_id = client_id
        self._tasks = TaskOwner()
        self._lock = asyncio.Lock()
        self._retiring: dict[str, asyncio.Task[None]] = {}   # removed backends draining before they go
        # the config file's backends go through the shared membership (proxy.membership) when it is there
        self.on_backends: Callable[[tuple[BackendConfig, ...]], Awaitable[dict[str, Any]]] | None = None

    async def apply(self, backends: tuple[BackendConfig, ...], *,
                    keep_drained: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
        """Make the farm these backends; added ones in `keep_drained` (leaving, in the shared membership)
        keep their drain flag."""
        async with self._lock:
            current = {s.name: s.config for s in self.farm.snapshot()}
            wanted = {b.name: b for b in backends}
            for name in [n for n in self._retiring if n in wanted]:   # back before it was forgotten
                self._retiring.pop(name).cancel()
                if name not in keep_drained:
                    await self.store.set_drained(name, False)
                    self.farm.set_draining(name, False)
            added = [n for n in wanted if n not in current]
            removed = [n for n in current if n not in wanted and n not in self._retiring]
            changed = [n for n in wanted if n in current and wanted[n] != current[n]]
            for name in changed:
                self.farm.reconfigure(wanted[name])
            for name in added:
                if name not in keep_drained:
                    await self.store.set_drained(name, False)
                self.farm.add(wanted[name])
                self.dispatcher.upstream_ids[name] = self._client_id(name)
                self.upstreams[name] = self._make_upstream(name)
                self.upstreams[name].start()
            for name in removed:
                await self.store.set_drained(name, True)
                self.farm.set_draining(name, True)
                self._retiring[name] = self._tasks.spawn(self._retire(name), name=f"retire-{name}")
            if added or changed:
                await self.farm.poll_once()
            if added or removed or changed:
                log.info("farm_changed", added=added, removed=removed, changed=changed)
            return {"added": added, "removed": removed, "changed": changed}

    async def reload_file(self, path: str) -> dict[str, Any]:
        """Read the config file again and apply what can change live: backends and workflow templates.

        Raises ConfigError (nothing changed) when the file is invalid."""
        config = load_config(path)
        result = await (self.on_backends or self.apply)(config.backends)
        templates = load_templates(config.workflows.dir) if config.workflows.dir else {}
        self.workflows.clear()
        self.workflows.update(templates)
        result["workflows"] = sorted(templates)
        return result

    async def _retire(self, name: str) -> None:
        """Forget a removed backend once nothing of ours is queued or running there."""
        # Polled: the prompts may end on another replica, so no local event says when.
        while await self.store.inflight_at(name):  # noqa: ASYNC110
            await asyncio.sleep(RETIRE_CHECK_S)
        async with self._lock:   # not halfway through while `apply` brings it back
            if self._retiring.get(name) is not asyncio.current_task():
                return
            del self._retiring[name]
            upstream = self.upstreams.pop(name, None)
            if upstream is not None:
                await upstream.stop()
            self.farm.remove(name)
            await self.store.set_drained(name, False)
        log.info("backend_retired", backend=name)

    async def stop(self) -> None:
        await self._tasks.stop()
