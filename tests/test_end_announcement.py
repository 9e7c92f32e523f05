"""A prompt's end reaches its client even when the replica that recorded it dies before sending it.

The end is recorded as unannounced with the prompt's history (`Store.finish`), the event bus confirms it
once its `executing` null is out, and whoever takes over a backend's upstream socket announces what is
left (proxy.relay.announce). The replica killed between the two is simulated exactly: the end is
recorded through the store and nothing is published.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from proxy.errors import StoreUnavailable
from proxy.relay.announce import announce_ends
from proxy.store import MemoryStore, PromptRecord, RedisStore, Store
from proxy.store.base import UNANNOUNCED_MAX_AGE_S, Admission
from tests.client import ComfyClient, txt2img
from tests.conftest import wait_until


def _record(pid: str, client_id: str | None = "c1") -> PromptRecord:
    return PromptRecord(prompt_id=pid, prompt=txt2img(seed=1), extra_data={"client_id": client_id} if client_id else {},
                        outputs_to_execute=["9"], client_id=client_id, created_at=time.time())


def _history(pid: str) -> dict[str, Any]:
    return {"outputs": {}, "meta": {}, "prompt": [0, pid, {}, {}, ["9"]],
            "status": {"status_str": "success", "completed": True,
                       "messages": [["execution_start", {"prompt_id": pid, "timestamp": 1}],
                                    ["execution_success", {"prompt_id": pid, "timestamp": 2}]]}}


async def _ended(store: Store, pid: str, finished_at: float, client_id: str | None = "c1") -> None:
    await store.admit(_record(pid, client_id), Admission(now=time.time()))
    assert await store.finish(pid, "success", _history(pid), finished_at) is not None


async def _unannounced(store: Store) -> list[str]:
    """Every end not confirmed yet; `hold_s` 0 leaves them visible to the next look."""
    return await store.ends_to_announce(time.time() + 3600, 0.0)


async def test_an_unconfirmed_end_is_claimed_by_one_announcer_at_a_time(make_store) -> None:
    store = make_store()
    now = time.time()
    await _ended(store, "old", now - 10)
    await _ended(store, "young", now)
    await _ended(store, "ancient", now - UNANNOUNCED_MAX_AGE_S - 60)
    assert await store.ends_to_announce(now - 2, hold_s=60) == ["old"]   # "young" may still be on its way
    assert await store.ends_to_announce(now - 2, hold_s=60) == []        # claimed: hidden from a second sweep
    assert await store.ends_to_announce(now + 1, hold_s=0) == ["young"]
    assert await store.finish("young", "success", _history("young"), now) is None   # ended once, recorded once
    assert await store.ends_to_announce(time.time() + 120, hold_s=0) == ["young", "old"]  # "ancient" dropped
    await store.ends_announced(["old", "young"])
    assert await _unannounced(store) == []


async def test_a_normal_end_leaves_nothing_to_announce(sims, proxies) -> None:
    proxy = await proxies([await sims("alpha")])
    store = proxy.services.store
    async with ComfyClient(proxy.url) as client:
        await client.connect()
        ids = [await client.queue_prompt(txt2img(seed=i)) for i in range(3)]
        for pid in ids:
            await client.wait_done(pid, timeout=20)

    async def confirmed() -> bool:
        return not set(ids) & set(await _unannounced(store))
    await wait_until(confirmed, timeout=10, what="the bus to confirm the ends it sent")
    assert await announce_ends(store, proxy.services.router) == 0


async def test_an_end_its_replica_never_sent_is_announced_on_takeover(store_kind, sims, proxies) -> None:
    backend = await sims("alpha")
    first = await proxies([backend])
    # With Redis the socket is on one replica and the takeover on another; in memory there is one replica.
    heir = await proxies([backend]) if store_kind == "redis" else first
    store = first.services.store
    await store.set_drained("alpha", True)   # the prompt below is only recorded, never dispatched
    for replica in {id(first): first, id(heir): heir}.values():
        replica.services.farm.set_draining("alpha", True)
    async with ComfyClient(first.url) as watcher:
        await watcher.connect()
        pid, quiet = uuid.uuid4().hex, uuid.uuid4().hex
        # The dying replica's last act: the end committed (its history, its slot freed), nothing published.
        await _ended(store, pid, time.time() - 5, client_id=watcher.client_id)
        await _ended(store, quiet, time.time() - 5, client_id=None)   # told to nobody, still settled
        assert watcher.messages_of(pid) == []

        await heir.services.upstreams["alpha"].reconcile()
        await watcher.wait_done(pid, timeout=5)   # before the first periodic sweep (~10 s): the takeover told it
        assert [m["type"] for m in watcher.messages_of(pid)] == ["execution_success", "executing"]
        status, body = await watcher.get(f"/history/{pid}")
        assert status == 200 and body[pid]["status"]["status_str"] == "success"

    async def confirmed() -> bool:
        return not {pid, quiet} & set(await _unannounced(store))
    await wait_until(confirmed, timeout=10, what="the announcement to be confirmed")
    assert await announce_ends(heir.services.store, heir.services.router) == 0


async def test_an_end_told_again_after_a_lost_confirmation_reaches_the_client_once(sims, proxies,
                                                                                   monkeypatch) -> None:
    """The bus's confirmation is lost (the store failed just then), so the announcer tells the end a second
    time: the hub holding the client's socket knows it told it (`EndsTold`) and drops the copy."""
    async def lost(self: Store, prompt_ids: list[str]) -> None:
        raise StoreUnavailable("The state store is unavailable", "confirmation lost")
    for kind in (MemoryStore, RedisStore):   # the bus is handed `store.ends_announced` as the app starts
        monkeypatch.setattr(kind, "ends_announced", lost)
    proxy = await proxies([await sims("alpha")])
    monkeypatch.undo()   # the announcer's own calls work
    store, router = proxy.services.store, proxy.services.router
    async with ComfyClient(proxy.url) as client:
        await client.connect()
        pid = await client.queue_prompt(txt2img(seed=1))
        await client.wait_done(pid, timeout=20)

        async def told_again() -> bool:   # once the end is older than the announcer's grace
            return await announce_ends(store, router) > 0
        await wait_until(told_again, timeout=15, what="the announcer to tell the unconfirmed end")
        fence = await client.queue_prompt(txt2img(seed=2))   # delivered after the copy, in order
        await client.wait_done(fence, timeout=20)
        kinds = [m["type"] for m in client.messages_of(pid)]
        assert kinds.count("execution_success") == 1, kinds
        ends = [m for m in client.messages_of(pid) if m["type"] == "executing" and m["data"]["node"] is None]
        assert len(ends) == 1, kinds
