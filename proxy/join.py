"""`comfy-proxy join`: an agent beside one ComfyUI (a sidecar, or a second process on the GPU machine)
that puts it in the farm and takes it out again.

It registers the backend (`POST /proxy/backends` with a join token and a lease), renews the lease every
third of it, and registers again should the proxy have forgotten it. On SIGTERM or SIGINT (a spot
instance's interruption notice, a pod's deletion) it deletes the backend, which drains it, and keeps the
lease alive until the proxy has forgotten it, that is until the prompts running there have finished; then
it exits 0. Killed outright, it renews nothing: the lease lapses and the proxy moves the backend's prompts
elsewhere, as for a dead backend.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog

log = structlog.get_logger(__name__)

RETRY_S = 1.0   # between tries while the proxy cannot be reached


@dataclass(frozen=True)
class JoinOptions:
    proxy: str
    token: str
    backend: str
    name: str | None = None
    labels: tuple[str, ...] = ()
    max_inflight: int | None = None
    weight: float | None = None
    lease_s: float = 15.0


class JoinAgent:
    def __init__(self, options: JoinOptions, session: aiohttp.ClientSession) -> None:
        self.o = options
        self.session = session
        self.base = options.proxy.rstrip("/") + "/proxy/backends"
        self.name: str | None = options.name
        self._headers = {"Authorization": f"Bearer {options.token}"}

    def _registration(self) -> dict[str, Any]:
        body: dict[str, Any] = {"url": self.o.backend, "lease_s": self.o.lease_s, "labels": list(self.o.labels)}
        for key in ("name", "max_inflight", "weight"):
            value = getattr(self.o, key)
            if value is not None:
                body[key] = value
        return body

    async def _call(self, method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        async with self.session.request(method, url, json=body, headers=self._headers,
                                        timeout=aiohttp.ClientTimeout(total=10)) as resp:
            data = await resp.json(content_type=None) if resp.content_length != 0 else None
            return resp.status, data

    async def register(self) -> None:
        """Until the proxy has the backend (a refusal other than a network failure ends the agent)."""
        while True:
            try:
                status, data = await self._call("POST", self.base, self._registration())
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("join_unreachable", proxy=self.o.proxy, error=str(exc))
                await asyncio.sleep(RETRY_S)
                continue
            if status in (200, 201):
                self.name = str(data["name"])
                log.info("joined", backend=self.name, proxy=self.o.proxy)
                return
            raise RuntimeError(f"the proxy refused the backend: {status} {data}")

    async def renew(self) -> bool:
        """One renewal; False when the proxy no longer knows the backend."""
        try:
            status, _ = await self._call("PATCH", f"{self.base}/{self.name}", {"lease_s": self.o.lease_s})
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("lease_unrenewed", backend=self.name, error=str(exc))
            return True
        return status != 404

    async def run(self, stop: asyncio.Event) -> None:
        await self.register()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.o.lease_s / 3)
            if not stop.is_set() and not await self.renew():
                await self.register()
        await self.leave()

    async def leave(self) -> None:
        """Delete the backend (it drains), and hold the lease until the proxy has forgotten it."""
        log.info("leaving", backend=self.name)
        while True:
            try:
                status, _ = await self._call("DELETE", f"{self.base}/{self.name}")
                break
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("leave_unreachable", error=str(exc))
                await asyncio.sleep(RETRY_S)
        while status != 404:
            await asyncio.sleep(min(1.0, self.o.lease_s / 3))
            try:
                status, _ = await self._call("PATCH", f"{self.base}/{self.name}", {"lease_s": self.o.lease_s})
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("lease_unrenewed", backend=self.name, error=str(exc))
        log.info("left", backend=self.name)
