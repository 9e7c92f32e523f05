"""The event bus: how an event attributed on one replica reaches client sockets held by any replica.

One replica owns each backend's upstream socket (a lease), but a prompt's client may be connected to
another. Events are delivered to this replica's sockets at once, and with Redis also published on one
channel that every replica listens to; a replica skips what it published itself. Redis pub/sub keeps the
order of one publisher's messages, and each replica publishes from one task, so a client sees a
prompt's events in backend order whichever replica it is on.

Wire format on the channel: one message carries a batch of events (what the publisher had queued, up to
`BATCH_EVENTS` or `BATCH_BYTES`): the publishing replica's 32-character origin, then per event a 4-byte
big-endian length and the event: a JSON header line (tenant, client_id, kind, binary flag, preview
metadata), `\\n`, the payload bytes, so binary previews travel without base64. A replica skips its own
batches by their first 32 bytes, parsing nothing; one message per batch instead of one per event is what
keeps the bus cheap when every replica hears everything.

The end of a prompt (the `executing` null that `settles` it) is confirmed to the store once it is out —
delivered here and, with Redis, published — so that an end recorded by a replica that died before
sending it is announced by another (`proxy.relay.announce`). Confirming runs beside the publisher and
never holds it up; a confirmation lost (store away, replica gone) costs the client a second `executing`
null later, never a missing one.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog
from redis.exceptions import RedisError

from proxy import jsoncodec
from proxy.errors import ProxyError
from proxy.relay.hub import ClientEvent, ClientHub
from proxy.store.connect import pubsub_clients
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


RECOVERY_S = 5.0   # after a bus failure, how long published ends are left for the announcer to repeat
BATCH_EVENTS = 256
BATCH_BYTES = 1024 * 1024
ORIGIN_LEN = 32   # uuid4().hex
_LENGTH = struct.Struct(">I")


def encode(event: ClientEvent) -> bytes:
    """One event, length-prefixed, ready to join a batch."""
    binary = isinstance(event.payload, bytes)
    header = jsoncodec.dumps_compact([event.tenant, event.client_id, event.kind, binary, event.preview_meta])
    body = event.payload if isinstance(event.payload, bytes) else event.payload.encode()
    framed = header.encode() + b"\n" + body
    return _LENGTH.pack(len(framed)) + framed


def decode_batch(raw: bytes) -> list[ClientEvent]:
    """The events of a batch (after its origin)."""
    events = []
    at = ORIGIN_LEN
    while at < len(raw):
        (size,) = _LENGTH.unpack_from(raw, at)
        header, _, body = raw[at + 4:at + 4 + size].partition(b"\n")
        tenant, client_id, kind, binary, meta = jsoncodec.loads(header)
        events.append(ClientEvent(tenant, client_id, body if binary else body.decode(), kind, preview_meta=meta))
        at += 4 + size
    return events


class RedisBus:
    def __init__(self, hub: ClientHub, url: str, channel: str, settle: Settle | None = None) -> None:
        self.hub = hub
        self.channel = channel
        self.origin = uuid.uuid4().hex
        self._clients = pubsub_clients(url, decode_responses=False, health_check_interval=15)
        self._at = 0   # the client in use; the next one after a failure (a Cluster's other nodes)
        self._outbox: asyncio.Queue[tuple[bytes, str | None]] = asyncio.Queue(QUEUE_LIMIT)
        self._confirmations = Confirmations(settle)
        self._tasks = TaskOwner()
        self._subscribed = asyncio.Event()
        self._shaky_until = 0.0   # loop time: until then an end published is not confirmed (see `_failed`)

    @property
    def _redis(self) -> Any:
        return self._clients[self._at]

    def _failed(self, client: Any) -> None:
        """`client` failed: move on to the next node, unless the other loop already did. Subscribers on
        every replica may be reconnecting now, and pub/sub keeps nothing for them: for a while, ends this
        replica publishes stay unconfirmed, so the socket holder announces them again (proxy.relay.announce)
        once everyone listens again. A client may get a second `executing` null, not none."""
        if client is self._redis:
            self._at = (self._at + 1) % len(self._clients)
        self._shaky_until = asyncio.get_running_loop().time() + RECOVERY_S

    def publish(self, event: ClientEvent) -> None:
        self.hub.deliver(event)
        try:
            self._outbox.put_nowait((encode(event), event.settles))
        except asyncio.QueueFull:
            log.error("event_bus_backlog_full", dropped_kind=event.kind)

    async def start(self) -> None:
        self._tasks.spawn(self._send_loop(), name="bus-publisher")
        self._tasks.spawn(self._receive_loop(), name="bus-subscriber")
        self._tasks.spawn(self._confirmations.run(), name="bus-confirmations")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), 5)

    async def stop(self) -> None:
        await self._tasks.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._confirmations.flush(), STOP_CONFIRM_S)
        for client in self._clients:
            await client.aclose()

    async def _send_loop(self) -> None:
        origin = self.origin.encode()
        while True:
            batch = [await self._outbox.get()]
            size = len(batch[0][0])
            while not self._outbox.empty() and len(batch) < BATCH_EVENTS and size < BATCH_BYTES:
                batch.append(self._outbox.get_nowait())
                size += len(batch[-1][0])
            message = b"".join([origin, *(framed for framed, _ in batch)])
            while True:
                client = self._redis
                try:
                    async with client.pipeline(transaction=False) as pipe:
                        pipe.publish(self.channel, message)
                        await pipe.execute()
                    break
                except (RedisError, OSError) as exc:
                    # Local sockets already have these events; remote ones get them once Redis is back.
                    log.warning("event_bus_publish_failed", error=repr(exc), pending=len(batch))
                    self._failed(client)
                    await asyncio.sleep(0.5)
            if asyncio.get_running_loop().time() >= self._shaky_until:
                self._confirmations.add([settles for _, settles in batch if settles is not None])

    async def _receive_loop(self) -> None:
        origin = self.origin.encode()
        while True:
            client = self._redis
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    self._subscribed.set()
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        raw = message["data"]
                        if raw[:ORIGIN_LEN] == origin:
                            continue   # ours: this replica's sockets had them at once
                        for event in decode_batch(raw):
                            self.hub.deliver(event)
            except (RedisError, OSError) as exc:
                log.warning("event_bus_subscribe_failed", error=repr(exc))
                self._failed(client)
                await asyncio.sleep(0.5)
