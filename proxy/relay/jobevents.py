"""Each job's messages as this replica saw them cross the event bus, numbered, for server-sent events
(`GET /api/jobs/{id}/events`, `proxy.api.jobs`).

Every replica delivers every event (the bus), so every replica keeps the same log of a prompt from its
first message, and an SSE client may resume with `Last-Event-ID` on any replica that has been up since
the prompt began. Kept in memory and bounded: at most `MAX_JOBS` logs and `MAX_BYTES` of messages (the
oldest logs go first), each log `KEEP_ENDED_S` after its job's end. A client asking for a job whose log is
gone gets its end from history.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from proxy import jsoncodec

# ComfyUI's messages of one prompt that a job's stream carries (`status` is the tenant's queue, not a job's)
STREAMED = frozenset({"execution_start", "execution_cached", "executing", "progress", "executed",
                      "execution_success", "execution_error", "execution_interrupted"})
ENDS = frozenset({"execution_success", "execution_error", "execution_interrupted"})
MAX_JOBS = 8192
MAX_BYTES = 32 * 1024 * 1024
KEEP_ENDED_S = 120.0


@dataclass
class JobLog:
    tenant: str
    messages: list[tuple[int, str, str]] = field(default_factory=list)   # (id, type, the message as sent)
    ended_at: float | None = None
    size: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def after(self, last_id: int) -> list[tuple[int, str, str]]:
        """(id, type, data as JSON) of the messages after `last_id`."""
        return [(number, type_, _data_of(raw)) for number, type_, raw in self.messages if number > last_id]

    def append(self, type_: str, raw: str) -> None:
        """`raw`: the whole message as clients receive it (`{"type", "data"}`), parsed only when read."""
        next_id = self.messages[-1][0] + 1 if self.messages else 1
        self.messages.append((next_id, type_, raw))
        self.size += len(raw)
        if type_ in ENDS:
            self.ended_at = time.monotonic()
        self.changed.set()   # wake every reader, then arm a new event for the next message
        self.changed = asyncio.Event()


def _data_of(raw: str) -> str:
    """A message's `data` as JSON (exact: `loads`, not `peek`, as it is written out again)."""
    return jsoncodec.dumps_compact(jsoncodec.loads(raw)["data"])


class JobEvents:
    def __init__(self) -> None:
        self._logs: OrderedDict[str, JobLog] = OrderedDict()   # oldest first
        self._bytes = 0

    def record(self, tenant: str, kind: str, payload: str | bytes) -> None:
        """A delivered event: kept when it is one of a prompt's streamed messages."""
        if kind not in STREAMED or not isinstance(payload, str):
            return
        try:
            msg = jsoncodec.peek(payload)   # only to read the prompt id: the message is kept as it came
        except ValueError:   # not a message of ComfyUI's (nothing of a job's to keep)
            return
        data = msg.get("data") if isinstance(msg, dict) else None
        if isinstance(data, dict) and isinstance(data.get("prompt_id"), str):
            self.append(data["prompt_id"], tenant, kind, payload)

    def append(self, prompt_id: str, tenant: str, type_: str, raw: str) -> None:
        log = self.open(prompt_id, tenant)
        before = log.size
        log.append(type_, raw)
        self._bytes += log.size - before
        self._trim()

    def open(self, prompt_id: str, tenant: str) -> JobLog:
        """The job's log, begun empty if this replica has seen nothing of it yet (an SSE client waits on it)."""
        log = self._logs.get(prompt_id)
        if log is None:
            log = self._logs[prompt_id] = JobLog(tenant)
            self._trim()
        return log

    def _trim(self) -> None:
        now = time.monotonic()
        while len(self._logs) > 1:   # never the log just written to
            prompt_id, oldest = next(iter(self._logs.items()))
            expired = oldest.ended_at is not None and now - oldest.ended_at > KEEP_ENDED_S
            if not (expired or len(self._logs) > MAX_JOBS or self._bytes > MAX_BYTES):
                break
            del self._logs[prompt_id]
            self._bytes -= oldest.size
