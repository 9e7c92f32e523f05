"""The Redis event bus that `redis.events` names: Redis Streams (the default) or pub/sub."""

from __future__ import annotations

from proxy.relay.bus import EventBus, Settle
from proxy.relay.hub import ClientHub
from proxy.relay.pubsub import PubSubBus
from proxy.relay.streams import StreamBus
from proxy.store.redis import Keys

BUSES: dict[str, type[StreamBus] | type[PubSubBus]] = {"streams": StreamBus, "pubsub": PubSubBus}


def redis_bus(events: str, *, hub: ClientHub, url: str, keys: Keys, settle: Settle | None = None) -> EventBus:
    """The bus `redis.events` names (proxy.config checks the name)."""
    return BUSES[events](hub=hub, url=url, keys=keys, settle=settle)
