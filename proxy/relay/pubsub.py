"""Redis pub/sub (`redis.events: pubsub`, `PubSubBus`), kept to compare with (`bench overhead`, `bench
admission`): one PUBLISH per batch on the channel `{prefix}:events`. Pub/sub keeps nothing, so a
subscriber that is away (a restart, moving to another Cluster node: any one delivers every PUBLISH) misses
what is published meanwhile; for `RECOVERY_S` after a bus failure ends stay unconfirmed and the announcer
tells them again (a client may get a second `executing` null).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog
from redis.exceptions import RedisError

from proxy.relay.bus import RETRY_S, RedisBus, Settle
from proxy.relay.hub import ClientHub
from proxy.store.connect import pubsub_clients
from proxy.store.redis import Keys

log = structlog.get_logger(__name__)

RECOVERY_S = 5.0   # after a bus failure, how long published ends are left for the announcer to repeat


class PubSubBus(RedisBus):
    def __init__(self, *, hub: ClientHub, url: str, keys: Keys, settle: Settle | None = None) -> None:
        super().__init__(hub=hub, settle=settle)
        self.channel = keys.events
        self._clients = pubsub_clients(url, decode_responses=False, health_check_interval=15)
        self._at = 0   # the client in use; the next one after a failure (a Cluster's other nodes)
        self._shaky_until = 0.0   # loop time: until then an end published is not confirmed (see `_failed`)

    @property
    def _redis(self) -> Any:
        return self._clients[self._at]

    def _loops(self) -> list[tuple[Coroutine[Any, Any, None], str]]:
        return [(self._send_loop(), "bus-publisher"), (self._receive_loop(), "bus-subscriber")]

    async def _close(self) -> None:
        for client in self._clients:
            await client.aclose()

    def _failed(self, client: Any) -> None:
        """`client` failed: move on to the next node, unless the other loop already did. Subscribers on
        every replica may be reconnecting now, and pub/sub keeps nothing for them: for a while, ends this
        replica publishes stay unconfirmed, so the socket holder announces them again (proxy.relay.announce)
        once everyone listens again. A client may get a second `executing` null, not none."""
        if client is self._redis:
            self._at = (self._at + 1) % len(self._clients)
        self._shaky_until = asyncio.get_running_loop().time() + RECOVERY_S

    async def _send_loop(self) -> None:
        while True:
            batch = await self._next_batch()
            message = b"".join([self._header(), *(framed for framed, _, _ in batch)])
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
                    await asyncio.sleep(RETRY_S)
            if asyncio.get_running_loop().time() >= self._shaky_until:
                self._confirmations.add([settles for _, settles, _ in batch if settles is not None])

    async def _receive_loop(self) -> None:
        while True:
            client = self._redis
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    self._ready.set()
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self._take(message["data"])
            except (RedisError, OSError) as exc:
                log.warning("event_bus_subscribe_failed", error=repr(exc))
                self._failed(client)
                await asyncio.sleep(RETRY_S)
