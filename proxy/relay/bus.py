"""The event bus: how an event attributed on one replica reaches client sockets held by any replica.

One replica owns each backend's upstream socket (a lease), but a prompt's client may be connected to
another. Events are delivered to this replica's sockets at once and, with Redis, also written to Redis by
one publisher task and read by every replica, which skips what it wrote itself. One task publishes in
order, so a client sees a prompt's events in backend order whichever replica it is on.

Wire format: one message carries a batch of events (what the publisher had queued, up to `BATCH_EVENTS`
or `BATCH_BYTES`): the publishing replica's 32-character origin, the batch's number (`seq`, 8 bytes
big-endian, from 1 in each process), then per event a 4-byte big-endian length and the event: a JSON
header line (tenant, client_id, kind, binary flag, preview metadata, the prompt it ends), `\\n`, the
payload bytes, so binary previews travel without base64. A replica skips its own batches by their first
32 bytes, parsing nothing, and delivers another origin's batch only if its seq is above the highest it saw
from that origin: a batch written twice or read twice is delivered once (and an end told by two replicas,
once: `ClientHub`'s `EndsTold`). One message per batch instead of one per event is what
keeps the bus cheap when every replica hears everything.

With Redis the bus is `proxy.relay.streams.StreamBus` (the default) or `proxy.relay.pubsub.PubSubBus`
(`redis.events`), chosen by `proxy.relay.buses.redis_bus`.

Confirming runs beside the publisher and never holds it up; a confirmation lost (store away, replica gone)
has the end told again later (proxy.relay.announce), which the client's hub drops as told; never a missing one.
"""
from __future__ import annotations

import asyncio
import contextlib
import struct
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import structlog

from proxy import jsoncodec
from proxy.errors import ProxyError
from proxy.relay.hub import ClientEvent, ClientHub
from proxy.tasks import TaskOwner

log = structlog.get_logger(__name__)

QUEUE_LIMIT = 100_000
STOP_CONFIRM_S = 2.0   # what a stopping bus waits to confirm the ends it sent

Settle = Callable[[list[str]], Awaitable[None]]   # Store.ends_announced


class EventBus(Protocol):
    def publish(self, event: ClientEvent) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Confirmations:
    """Prompt ends that are out, told to the store from a task of its own, many per call."""

    def __init__(self, settle: Settle | None) -> None:
        self._settle = settle
        self._ids: list[str] = []
        self._ready = asyncio.Event()

    def add(self, prompt_ids: list[str]) -> None:
        if prompt_ids and self._settle is not None:
            self._ids.extend(prompt_ids)
            self._ready.set()

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            await self.flush()

    async def flush(self) -> None:
        self._ready.clear()
        ids, self._ids = self._ids, []
        if not ids or self._settle is None:
            return
        try:
            await self._settle(ids)
        except ProxyError as exc:   # left for the sweep: the client may get a second `executing` null
            log.warning("ends_unconfirmed", count=len(ids), error=exc.details)


class LocalBus:
    """One replica: delivery is a function call, and an end is out once delivered."""

    def __init__(self, hub: ClientHub, settle: Settle | None = None) -> None:
        self.hub = hub
        self._confirmations = Confirmations(settle)
        self._tasks = TaskOwner()

    def publish(self, event: ClientEvent) -> None:
        self.hub.deliver(event)
        if event.settles is not None:
            self._confirmations.add([event.settles])

    async def start(self) -> None:
        self._tasks.spawn(self._confirmations.run(), name="bus-confirmations")

    async def stop(self) -> None:
        await self._tasks.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._confirmations.flush(), STOP_CONFIRM_S)


# --- the wire format ----------------------------------------------------------------------------------

BATCH_EVENTS = 256
BATCH_BYTES = 1024 * 1024
ORIGIN_LEN = 32   # uuid4().hex
_LENGTH = struct.Struct(">I")
_SEQ = struct.Struct(">Q")
HEADER_LEN = ORIGIN_LEN + _SEQ.size

Outgoing = tuple[bytes, str | None, bool]   # an encoded event, the prompt whose end it is, whether binary
CHECK: Outgoing = (b"", None, False)        # no event: asks the stream publisher to check its window


def encode(event: ClientEvent) -> bytes:
    """One event, length-prefixed, ready to join a batch."""
    binary = isinstance(event.payload, bytes)
    header = jsoncodec.dumps_compact([event.tenant, event.client_id, event.kind, binary, event.preview_meta,
                                      event.end_of])
    body = event.payload if isinstance(event.payload, bytes) else event.payload.encode()
    framed = header.encode() + b"\n" + body
    return _LENGTH.pack(len(framed)) + framed


def decode_batch(raw: bytes) -> list[ClientEvent]:
    """The events of a batch (after its origin and seq)."""
    events = []
    at = HEADER_LEN
    while at < len(raw):
        (size,) = _LENGTH.unpack_from(raw, at)
        header, _, body = raw[at + 4:at + 4 + size].partition(b"\n")
        tenant, client_id, kind, binary, meta, end_of = jsoncodec.loads(header)
        events.append(ClientEvent(tenant, client_id, body if binary else body.decode(), kind, preview_meta=meta,
                                  end_of=end_of))
        at += 4 + size
    return events


# --- what both Redis buses share ----------------------------------------------------------------------

RETRY_S = 0.5          # between tries while Redis is away
ORIGINS_KEPT = 1024    # replicas whose highest seq is remembered (the least recently heard go first)
HOLD_S = 1.0           # how long batches after a gap wait for the missing ones (a stream publisher's re-send)
HELD_MAX = 256         # batches of one replica held at most; beyond, they go at once


class RedisBus:
    """The outbox, drained in numbered batches by one publisher task, and the receiving end's check that
    delivers each batch of another replica once and in order."""

    hold_s = 0.0   # how long batches after a gap wait for the missing ones; 0: they never come

    def __init__(self, *, hub: ClientHub, settle: Settle | None) -> None:
        self.hub = hub
        self.origin = uuid.uuid4().hex
        self._own = self.origin.encode()
        self._seq = 0
        self._seen: dict[bytes, int] = {}   # origin → highest seq delivered, least recently heard first
        self._held: dict[bytes, tuple[dict[int, bytes], asyncio.TimerHandle]] = {}   # origin → after a gap
        self._wary = False   # the first batch heard from a replica may follow lost ones (just after a failure)
        self._outbox: asyncio.Queue[Outgoing] = asyncio.Queue(QUEUE_LIMIT)
        self._confirmations = Confirmations(settle)
        self._tasks = TaskOwner()
        self._ready = asyncio.Event()   # the receiving end is listening

    def publish(self, event: ClientEvent) -> None:
        self.hub.deliver(event)
        try:
            self._outbox.put_nowait((encode(event), event.settles, isinstance(event.payload, bytes)))
        except asyncio.QueueFull:
            log.error("event_bus_backlog_full", dropped_kind=event.kind)

    async def start(self) -> None:
        for coro, name in self._loops():
            self._tasks.spawn(coro, name=name)
        self._tasks.spawn(self._confirmations.run(), name="bus-confirmations")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), 5)

    async def stop(self) -> None:
        await self._tasks.stop()
        for _, timer in self._held.values():
            timer.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._confirmations.flush(), STOP_CONFIRM_S)
        await self._close()

    def _loops(self) -> list[tuple[Coroutine[Any, Any, None], str]]:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    async def _next_batch(self) -> list[Outgoing]:
        batch = [await self._outbox.get()]
        size = len(batch[0][0])
        while not self._outbox.empty() and len(batch) < BATCH_EVENTS and size < BATCH_BYTES:
            batch.append(self._outbox.get_nowait())
            size += len(batch[-1][0])
        return batch

    def _header(self) -> bytes:
        self._seq += 1
        return self._own + _SEQ.pack(self._seq)

    def _take(self, raw: bytes) -> None:
        """A batch read from Redis: delivered here unless it is ours or was delivered already. One that
        comes after a gap waits up to `hold_s` for the missing ones, then goes anyway; so does, just after
        a failure, the first one heard from a replica (unless it is its first ever): this reader may have
        stood before batches of it that Redis lost and that are on their way again."""
        origin = raw[:ORIGIN_LEN]
        if origin == self._own:
            return   # ours: this replica's sockets had them at once
        (seq,) = _SEQ.unpack_from(raw, ORIGIN_LEN)
        last = self._seen.pop(origin, 0)
        self._seen[origin] = last
        if len(self._seen) > ORIGINS_KEPT:
            del self._seen[next(iter(self._seen))]
        if seq <= last:   # written again after a failure, or read again after a rewind
            return
        if origin in self._held or (seq != last + 1 and self.hold_s and (last or self._wary)):
            self._hold(origin, seq, raw)
            return
        if last and seq != last + 1:
            log.warning("event_bus_batches_missed", origin=origin.decode(), count=seq - last - 1)
        self._seen[origin] = seq
        self._deliver(raw)

    def _deliver(self, raw: bytes) -> None:
        for event in decode_batch(raw):
            self.hub.deliver(event)

    def _hold(self, origin: bytes, seq: int, raw: bytes) -> None:
        """Keep a batch of `origin` that came after a gap; deliver what no longer waits for anything."""
        if origin not in self._held:
            timer = asyncio.get_running_loop().call_later(self.hold_s, self._release, origin)
            self._held[origin] = {}, timer
        held, timer = self._held[origin]
        held[seq] = raw
        last = self._seen.get(origin, 0)
        while ready := held.pop(last + 1, b""):
            last += 1
            self._deliver(ready)
        self._seen[origin] = last
        if not held or len(held) > HELD_MAX:
            timer.cancel()
            self._release(origin)

    def _release(self, origin: bytes) -> None:
        """The missing batches did not come: what waited goes now, in order."""
        held, _ = self._held.pop(origin)
        if not held:
            return
        last = self._seen.get(origin, 0)
        if last:
            log.warning("event_bus_batches_missed", origin=origin.decode(), count=max(held) - last - len(held))
        for seq in sorted(held):
            self._deliver(held[seq])
        self._seen[origin] = max(last, max(held))


# --- Redis Streams ------------------------------------------------------------------------------------
