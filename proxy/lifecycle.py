"""Start and stop of the long-lived parts, as one ordered list (uvicorn's lifespan, aiohttp's cleanup_ctx).

Each part registers its close *before* it starts, so a part that fails half-way through its start is
closed too (every close is safe on a part that never started). Closes run in reverse order of
registration; a close that raises is logged and the ones after it still run. A start that raises closes
everything registered so far, then propagates: a failed start leaves nothing running.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

import structlog

log = structlog.get_logger(__name__)

Step = Callable[[], Awaitable[Any] | Any]


class Lifecycle:
    """An ordered set of named parts; `async with` closes whatever was registered, newest first."""

    def __init__(self) -> None:
        self._stack = AsyncExitStack()
        self.started: list[str] = []   # names of the parts whose start returned, in order
        self.closed: list[str] = []    # names of the parts whose close ran (raised or not), in order

    async def __aenter__(self) -> Lifecycle:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._stack.aclose()

    async def part(self, name: str, start: Step | None = None, close: Step | None = None) -> None:
        """Register `close` under `name`, then run `start`."""
        if close is not None:
            self._stack.push_async_callback(self._close, name, close)
        if start is not None:
            await _call(start)
        self.started.append(name)

    async def _close(self, name: str, close: Step) -> None:
        self.closed.append(name)
        try:
            await _call(close)
        except Exception:   # noqa: BLE001 - one part's failure must not keep the others open
            log.exception("part_close_failed", part=name)


async def _call(step: Step) -> Any:
    result = step()
    if inspect.isawaitable(result):
        return await result
    return result
