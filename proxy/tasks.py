"""Ownership of background tasks (STYLE 7): whoever starts one keeps it, and cancels and awaits it at
shutdown, so no task outlives the application or dies unnoticed."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger(__name__)

RECANCEL_S = 0.2


class TaskOwner:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        """Start a task that is forgotten when it ends and cancelled by `stop` if it has not."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self, grace_s: float = 5.0) -> None:
        """Cancel and await every task. A cancellation can be swallowed on the way (a library catching
        CancelledError, or 3.11's timeout helpers racing an event), so pending tasks are cancelled again
        every `RECANCEL_S`; one still running after `grace_s` is reported, not waited on forever."""
        pending = set(self._tasks)
        done: set[asyncio.Task[Any]] = set()
        deadline = asyncio.get_running_loop().time() + grace_s
        while pending and asyncio.get_running_loop().time() < deadline:
            for task in pending:
                task.cancel()
            finished, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
            done |= finished
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.warning("task_failed_at_stop", task=task.get_name(), error=repr(task.exception()))
        for task in pending:
            log.error("task_ignored_cancellation", task=task.get_name())
