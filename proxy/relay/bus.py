"""The event bus: how an event attributed on one replica reaches client sockets held by any replica.

One replica owns each backend's upstream socket (a lease), but a prompt's client may be connected to
another. Events are delivered to this replica's sockets at once, and with Redis also published on one
channel that every replica listens to; a replica skips what it published itself. Redis pub/sub keeps the
order of one publisher's messages, and each replica publishes from one task, so a client sees a
prompt's events in backend order whichever replica it is on.

Wire format on the channel: a JSON header line (origin, tenant, client_id, kind, binary flag, preview
metadata) then `\\n` then the payload bytes, so binary previews travel without base64.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import Protocol

import structlog
from redis.exceptions import RedisError

from proxy.relay.hub import ClientEvent, ClientHub
from proxy.store.connect import pubsub_client
from proxy.tasks import TaskOwner

log = structlog.get_logger(__name__)

QUEUE_LIMIT = 100_000


class EventBus(Protocol):
    def publish(self, event: ClientEvent) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class LocalBus:
    """One replica: delivery is a function call."""

    def __init__(self, hub: ClientHub) -> None:
        self.hub = hub

    def publish(self, event: ClientEvent) -> None:
        self.hub.deliver(event)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


def encode(origin: str, event: ClientEvent) -> bytes:
    binary = isinstance(event.payload, bytes)
    header = json.dumps([origin, event.tenant, event.client_id, event.kind, binary, event.preview_meta],
                        separators=(",", ":")).encode()
    body = event.payload if isinstance(event.payload, bytes) else event.payload.encode()
    return header + b"\n" + body


def decode(raw: bytes) -> tuple[str, ClientEvent]:
    header, _, body = raw.partition(b"\n")
    origin, tenant, client_id, kind, binary, meta = json.loads(header)
    return origin, ClientEvent(tenant, client_id, body if binary else body.decode(), kind, meta)


class RedisBus:
    def __init__(self, hub: ClientHub, url: str, channel: str) -> None:
        self.hub = hub
        self.channel = channel
        self.origin = uuid.uuid4().hex
        self._redis = pubsub_client(url, decode_responses=False, health_check_interval=15)
        self._outbox: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_LIMIT)
        self._tasks = TaskOwner()
        self._subscribed = asyncio.Event()

    def publish(self, event: ClientEvent) -> None:
        self.hub.deliver(event)
        try:
            self._outbox.put_nowait(encode(self.origin, event))
        except asyncio.QueueFull:
            log.error("event_bus_backlog_full", dropped_kind=event.kind)

    async def start(self) -> None:
        self._tasks.spawn(self._send_loop(), name="bus-publisher")
        self._tasks.spawn(self._receive_loop(), name="bus-subscriber")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), 5)

    async def stop(self) -> None:
        await self._tasks.stop()
        await self._redis.aclose()

    async def _send_loop(self) -> None:
        while True:
            first = await self._outbox.get()
            batch = [first]
            while not self._outbox.empty() and len(batch) < 256:
                batch.append(self._outbox.get_nowait())
            while True:
                try:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for raw in batch:
                            pipe.publish(self.channel, raw)
                        await pipe.execute()
                    break
                except (RedisError, OSError) as exc:
                    # Local sockets already have these events; remote ones get them once Redis is back.
                    log.warning("event_bus_publish_failed", error=repr(exc), pending=len(batch))
                    await asyncio.sleep(0.5)

    async def _receive_loop(self) -> None:
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    self._subscribed.set()
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        origin, event = decode(message["data"])
                        if origin != self.origin:
                            self.hub.deliver(event)
            except (RedisError, OSError) as exc:
                log.warning("event_bus_subscribe_failed", error=repr(exc))
                await asyncio.sleep(0.5)
