"""The simulator's prompt queue and history (ComfyUI execution.py `PromptQueue`), asyncio instead of threads.

Pending prompts sit in a heap ordered by `number` (ties by prompt_id, as ComfyUI's tuple comparison);
`GET /queue` shows the heap's array order as ComfyUI does. Every change calls `on_change`, which sends the
`status` broadcast.
"""

from __future__ import annotations

import asyncio
import copy
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

MAXIMUM_HISTORY_SIZE = 10000


@dataclass(order=True, kw_only=True)
class QueueItem:
    number: float
    prompt_id: str
    seq: int
    prompt: dict[str, Any] = field(compare=False)
    extra_data: dict[str, Any] = field(compare=False)
    outputs_to_execute: list[str] = field(compare=False)
    sensitive: dict[str, Any] = field(compare=False, default_factory=dict)

    def as_list(self) -> list[Any]:
        """`[number, prompt_id, prompt, extra_data, outputs_to_execute]`, sensitive data left out."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs_to_execute]


class PromptQueue:
    def __init__(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self.queue: list[QueueItem] = []
        self.currently_running: dict[int, QueueItem] = {}
        self.history: dict[str, dict[str, Any]] = {}
        self.flags: dict[str, Any] = {}
        self._task_counter = 0

    def put(self, *, number: float, prompt_id: str, prompt: dict[str, Any], extra_data: dict[str, Any],
            outputs: list[str], sensitive: dict[str, Any]) -> None:
        heapq.heappush(self.queue, QueueItem(number=number, prompt_id=prompt_id, seq=next(self._seq), prompt=prompt,
                                             extra_data=extra_data, outputs_to_execute=outputs, sensitive=sensitive))
        self._on_change()
        self._wakeup.set()

    async def get(self) -> tuple[QueueItem, int] | None:
        """The next prompt, or None when woken by a flag with nothing queued (ComfyUI's get timeout)."""
        while not self.queue:
            self._wakeup.clear()
            if self.flags:
                return None
            await self._wakeup.wait()
        item = heapq.heappop(self.queue)
        task_id = self._task_counter
        self._task_counter += 1
        self.currently_running[task_id] = replace(item, prompt=copy_tree(item.prompt),
                                                  extra_data=copy_tree(item.extra_data),
                                                  outputs_to_execute=copy_tree(item.outputs_to_execute),
                                                  sensitive=copy_tree(item.sensitive))
        self._on_change()
        return item, task_id

    def task_done(self, task_id: int, history_result: dict[str, Any], status: dict[str, Any]) -> None:
        item = self.currently_running.pop(task_id)
        if len(self.history) > MAXIMUM_HISTORY_SIZE:
            self.history.pop(next(iter(self.history)))
        entry: dict[str, Any] = {"prompt": item.as_list(), "outputs": {}, "status": copy_tree(status)}
        entry.update(history_result)
        self.history[item.prompt_id] = entry
        self._on_change()

    def drop_running(self, task_id: int) -> None:
        """Forget a prompt whose execution died with the process (no history, as after a crash)."""
        self.currently_running.pop(task_id, None)

    def running(self) -> list[QueueItem]:
        return list(self.currently_running.values())

    def tasks_remaining(self) -> int:
        return len(self.queue) + len(self.currently_running)

    def wipe_queue(self) -> None:
        self.queue = []
        self._on_change()

    def delete_queue_item(self, prompt_id: str) -> bool:
        for i, item in enumerate(self.queue):
            if item.prompt_id == prompt_id:
                if len(self.queue) == 1:
                    self.wipe_queue()  # ComfyUI quirk: the last pending item goes with two status messages
                else:
                    self.queue.pop(i)
                    heapq.heapify(self.queue)
                self._on_change()
                return True
        return False

    def get_history(self, prompt_id: str | None = None, max_items: int | None = None,
                    offset: int = -1) -> dict[str, Any]:
        """ComfyUI's semantics: max_items without offset gives the last N, oldest first."""
        if prompt_id is not None:
            return {prompt_id: copy_tree(self.history[prompt_id])} if prompt_id in self.history else {}
        out: dict[str, Any] = {}
        if offset < 0 and max_items is not None:
            offset = len(self.history) - max_items
        for i, key in enumerate(self.history):
            if i >= offset:
                out[key] = self.history[key]
                if max_items is not None and len(out) >= max_items:
                    break
        return out

    def wipe_history(self) -> None:
        self.history = {}

    def delete_history_item(self, prompt_id: str) -> None:
        self.history.pop(prompt_id, None)

    def set_flag(self, name: str, value: Any) -> None:
        self.flags[name] = value
        self._wakeup.set()

    def take_flags(self) -> dict[str, Any]:
        flags, self.flags = self.flags, {}
        return flags


def copy_tree(value: Any) -> Any:
    """`copy.deepcopy` (what ComfyUI's queue uses) for what JSON decodes to, several times faster: a
    prompt is copied when it starts, and a history entry each time it is read. Other values go to
    deepcopy; JSON trees share no objects, so deepcopy's memo has nothing to keep. Leaves are tested
    in place, not by a call each: most of a graph is leaves."""
    kind = type(value)
    if kind is dict:
        return {k: v if type(v) in _LEAVES else copy_tree(v) for k, v in value.items()}
    if kind is list:
        return [v if type(v) in _LEAVES else copy_tree(v) for v in value]
    if kind in _LEAVES:
        return value
    return copy.deepcopy(value)


_LEAVES = frozenset((str, int, float, bool, type(None)))
