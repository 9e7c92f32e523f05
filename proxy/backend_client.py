"""HTTP calls the proxy makes to ComfyUI backends, on one pooled session.

Requests carry no browser `Origin`: ComfyUI refuses with 403 a request whose Origin host differs from
its Host when it listens on loopback (protocol §1, traces/info_routes.json `origin_mismatch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp

from proxy import jsoncodec


class BackendUnreachable(Exception):
    """Connection refused, reset, timed out, or a 5xx: the backend may not have the request."""


@dataclass(frozen=True)
class Submitted:
    status: int
    body: Any


class BackendClient:
    def __init__(self, session: aiohttp.ClientSession, timeout_s: float = 10.0) -> None:
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def submit(self, url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Submitted:
        """`POST /prompt`. A 200 or 400 is an answer; anything else raises BackendUnreachable."""
        try:
            async with self.session.post(url + "/prompt", json=body, headers=headers,
                                         timeout=self.timeout) as resp:
                if resp.status >= 500:
                    raise BackendUnreachable(f"POST /prompt answered {resp.status}")
                try:
                    payload = await resp.json(content_type=None, loads=jsoncodec.loads)
                except ValueError:
                    payload = None
                return Submitted(resp.status, payload)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BackendUnreachable(repr(exc)) from exc

    async def _get_json(self, url: str, path: str, *, ok_only: bool = False) -> Any:
        """A backend's JSON answer to `GET path`; unreachable, unreadable (or, with `ok_only`, not a 200)
        raises BackendUnreachable."""
        try:
            async with self.session.get(url + path, timeout=self.timeout) as resp:
                if ok_only and resp.status != 200:
                    raise BackendUnreachable(f"GET {path} answered {resp.status}")
                return await resp.json(content_type=None, loads=jsoncodec.loads)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise BackendUnreachable(repr(exc)) from exc

    async def history(self, url: str, prompt_id: str) -> dict[str, Any] | None:
        """The backend's history entry for a prompt, or None if it has none."""
        body = await self._get_json(url, f"/history/{prompt_id}", ok_only=True)
        entry = body.get(prompt_id) if isinstance(body, dict) else None
        return entry if isinstance(entry, dict) else None

    async def raw_logs(self, url: str) -> dict[str, Any]:
        """The backend's recent console lines: `/internal/logs/raw`, `{entries, size}`."""
        body = await self._get_json(url, "/internal/logs/raw")
        return body if isinstance(body, dict) else {}

    async def queue_ids(self, url: str) -> set[str]:
        """Prompt ids running or pending at the backend."""
        body = await self._get_json(url, "/queue")
        items = (body.get("queue_running") or []) + (body.get("queue_pending") or [])
        return {item[1] for item in items if isinstance(item, list) and len(item) > 1}

    async def post_bare(self, url: str, path: str, body: dict[str, Any]) -> int:
        """A control call with a bare answer (`/queue` delete, `/interrupt`, `/free`); returns the status."""
        try:
            async with self.session.post(url + path, json=body, timeout=self.timeout) as resp:
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BackendUnreachable(repr(exc)) from exc

    async def subscribe_logs(self, url: str, client_id: str) -> None:
        """`PATCH /internal/logs/subscribe`: the backend pushes its console lines to `client_id`'s socket."""
        try:
            async with self.session.patch(url + "/internal/logs/subscribe", json={"clientId": client_id,
                                                                                 "enabled": True},
                                          timeout=self.timeout) as resp:
                await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BackendUnreachable(repr(exc)) from exc
