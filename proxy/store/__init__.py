"""State shared by everything downstream of admission; see `base.Store` for the contract."""

from __future__ import annotations

from proxy.config import StoreConfig
from proxy.store.base import (
    DISPATCHED,
    FINISHED,
    QUEUED,
    RUNNING,
    DuplicatePrompt,
    OutputRef,
    PromptRecord,
    Store,
)
from proxy.store.connect import SENTINEL
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore

__all__ = [
    "DISPATCHED", "FINISHED", "QUEUED", "RUNNING", "DuplicatePrompt", "MemoryStore", "OutputRef",
    "PromptRecord", "RedisStore", "Store", "open_store",
]


def replica_acks(config: StoreConfig) -> int:
    """`redis.replica_acks`, or its default: a Sentinel deployment always has a replica to wait for."""
    if config.replica_acks is not None:
        return config.replica_acks
    return 1 if (config.redis_url or "").startswith(SENTINEL + "://") else 0


def open_store(config: StoreConfig) -> Store:
    """Redis when a URL is configured, the in-process store otherwise."""
    if config.redis_url:
        return RedisStore(config.redis_url, config.key_prefix, config.finished_ttl_s,
                          replica_acks=replica_acks(config))
    return MemoryStore(config.finished_ttl_s)
