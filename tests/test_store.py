"""The store's promises, the same for the in-process and the Redis implementation."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
import redis as sync_redis

from proxy.errors import StoreUnavailable
from proxy.store import DISPATCHED, FINISHED, QUEUED, RUNNING, DuplicatePrompt, OutputRef, PromptRecord
from proxy.store.base import DELIVERED, FAILED, PENDING, Admission, Delivery, Member, QuotaRefused
from proxy.store.redis import RedisStore

NOW = 1_800_000_030.0  # a fixed clock: 30 s into a minute


async def admit(store, rec: PromptRecord, front: bool = False, **limits) -> float:
    await store.admit(rec, Admission(now=limits.pop("now", NOW), **limits), front=front)
    return rec.number


def record(pid: str, client: str | None = "c1", tenant: str = "") -> PromptRecord:
    return PromptRecord(prompt_id=pid, prompt={"1": {"class_type": "X", "inputs": {}}},
                        extra_data={"client_id": client} if client else {}, outputs_to_execute=["1"],
                        client_id=client, tenant=tenant, created_at=1.0)


async def test_admit_numbers_and_queue_order(make_store) -> None:
    store = make_store()
    n1 = await admit(store, record("a"))
    n2 = await admit(store, record("b"))
    n3 = await admit(store, record("c"), front=True)
    assert n2 == n1 + 1 and n3 == -(n2 + 1)
    assert await store.queued() == ["c", "a", "b"]
    with pytest.raises(DuplicatePrompt):
        await admit(store, record("a"))
    rec = await store.get("a")
    assert rec is not None and rec.state == QUEUED and rec.number == n1 and rec.prompt["1"]["class_type"] == "X"
    assert await store.active_prompts("", "c1") == ["a", "b", "c"]


async def test_claim_is_exclusive(make_store) -> None:
    store = make_store()
    await admit(store, record("a"))
    results = await asyncio.gather(store.claim("a", "gpu1", 2), store.claim("a", "gpu2", 2))
    assert sorted(results) == [False, True]
    rec = await store.get("a")
    assert rec is not None and rec.state == DISPATCHED and rec.backend in ("gpu1", "gpu2") and rec.attempts == 1
    assert sum(len(v) for v in (await store.inflight()).values()) == 1
    assert await store.queued() == []


async def test_slot_limit(make_store) -> None:
    store = make_store()
    for pid in "abc":
        await admit(store, record(pid))
    assert await store.claim("a", "gpu", 2)
    assert await store.claim("b", "gpu", 2)
    assert not await store.claim("c", "gpu", 2)
    assert await store.queued() == ["c"]


async def test_requeue_puts_prompt_back_at_its_place(make_store) -> None:
    store = make_store()
    for pid in "abc":
        await admit(store, record(pid))
    assert await store.claim("a", "gpu", 1)
    await store.requeue("a")
    assert await store.queued() == ["a", "b", "c"]
    assert (await store.inflight()).get("gpu", []) == []
    rec = await store.get("a")
    assert rec is not None and rec.state == QUEUED and rec.backend is None


async def test_finish_frees_slot_once_and_keeps_history(make_store) -> None:
    store = make_store()
    assert await store.admit(record("a"), Admission(now=NOW)) == 1   # the tenant's active prompts
    assert await store.claim("a", "gpu", 1)
    assert await store.mark_running("a", 5.0) == 1
    await store.set_current_nodes({"a": "3"})
    rec = await store.get("a")
    assert rec is not None and rec.state == RUNNING and rec.current_node == "3" and rec.started_at == 5.0
    history = {"prompt": [0, "a"], "outputs": {}, "status": {"status_str": "success"}}
    assert await store.finish("a", "success", history, 6.0) == 0   # the tenant has nothing left active
    assert await store.finish("a", "error", {}, 7.0) is None
    rec = await store.get("a")
    assert rec is not None and rec.state == FINISHED and rec.outcome == "success" and rec.history == history
    assert rec.current_node is None
    assert (await store.inflight()).get("gpu", []) == []
    assert await store.active_prompts("", "c1") == []
    assert await store.history_ids() == ["a"]
    await store.forget_history(["a"])
    assert await store.history_ids() == [] and await store.get("a") is None


async def test_withdraw_before_start_and_update_of_missing(make_store) -> None:
    store = make_store()
    for pid in "abc":
        await admit(store, record(pid))
    assert await store.withdraw("a") == QUEUED
    assert await store.withdraw("a") is None
    assert await store.get("a") is None and await store.active_prompts("", "c1") == ["b", "c"]
    assert await store.claim("b", "gpu", 1)
    assert await store.withdraw("b") == DISPATCHED
    assert (await store.inflight()).get("gpu", []) == [] and await store.queued() == ["c"]
    assert await store.claim("c", "gpu", 1)
    await store.mark_running("c", 1.0)
    assert await store.withdraw("c") is None
    await store.set_current_nodes({"ghost": "1"})
    assert await store.get("ghost") is None


async def test_tenants_have_separate_client_sets(make_store) -> None:
    store = make_store()
    await admit(store, record("a", client="same", tenant="t1"))
    await admit(store, record("b", client="same", tenant="t2"))
    assert await store.active_prompts("t1", "same") == ["a"]
    assert await store.active_prompts("t2", "same") == ["b"]


async def test_output_refs(make_store) -> None:
    store = make_store()
    ref = OutputRef(backend="gpu", filename="ComfyUI_00001_.png", subfolder="", type="output", tenant="t",
                    prompt_id="a")
    await store.record_outputs({"abc": ref})
    assert await store.resolve_output("abc") == ref
    assert await store.resolve_output("nope") is None


async def test_two_store_handles_share_state(make_store) -> None:
    first, second = make_store(), make_store()
    await admit(first, record("a"))
    assert await second.queued() == ["a"]
    assert await second.claim("a", "gpu", 1)
    assert not await first.claim("a", "gpu", 1)


async def test_quota_max_queued_is_given_back_on_every_end(make_store) -> None:
    store = make_store()
    await admit(store, record("a", tenant="t"), max_queued=2)
    await admit(store, record("b", tenant="t"), max_queued=2)
    with pytest.raises(QuotaRefused) as refused:
        await admit(store, record("c", tenant="t"), max_queued=2)
    assert refused.value.limit == "max_queued"
    await admit(store, record("x", tenant="other"), max_queued=2)
    assert await store.withdraw("a") == QUEUED
    await admit(store, record("c", tenant="t"), max_queued=2)
    assert await store.claim("b", "gpu", 1)
    assert await store.finish("b", "error", {}, NOW) == 1   # "c" is still active
    await admit(store, record("d", tenant="t"), max_queued=2)


async def test_quota_windows_and_gpu_seconds(make_store) -> None:
    store = make_store()
    await admit(store, record("a", tenant="t"), per_minute=1)
    with pytest.raises(QuotaRefused) as refused:
        await admit(store, record("b", tenant="t"), per_minute=1)
    assert refused.value.limit == "per_minute" and refused.value.retry_after == 30
    await admit(store, record("b", tenant="t"), per_minute=1, now=NOW + 60)
    with pytest.raises(QuotaRefused):
        await admit(store, record("c", tenant="t"), per_day=2, now=NOW + 120)
    assert await store.claim("a", "gpu", 2)
    await store.mark_running("a", NOW)
    assert await store.finish("a", "success", {}, NOW + 30.0) is not None
    with pytest.raises(QuotaRefused) as refused:
        await admit(store, record("d", tenant="t"), gpu_seconds_per_day=30.0)
    assert refused.value.limit == "gpu_seconds_per_day" and refused.value.retry_after > 60
    await admit(store, record("d", tenant="t"), gpu_seconds_per_day=31.0)


async def test_concurrent_admissions_never_exceed_max_queued(make_store) -> None:
    first, second = make_store(), make_store()
    results = await asyncio.gather(*(admit(s, record(f"p{i}", tenant="t"), max_queued=2)
                                     for i, s in enumerate([first, second] * 5)), return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 2
    assert all(isinstance(r, QuotaRefused) for r in results if isinstance(r, BaseException))


async def test_fair_order_puts_a_light_tenant_before_a_flood(make_store) -> None:
    store = make_store()
    for i in range(50):
        await admit(store, record(f"heavy{i:02}", tenant="heavy"))
    for i in range(3):
        assert await store.claim(f"heavy{i:02}", f"gpu{i}", 1)
    await admit(store, record("light", tenant="light"))
    assert "light" in await store.queued(2)


async def test_idle_credit_puts_a_returning_tenants_burst_ahead_and_a_backlog_never_gains_it(make_store) -> None:
    store = make_store()
    for i in range(50):
        await admit(store, record(f"heavy{i:02}", tenant="heavy"), credit=4.0)
    for i in range(6):   # the flood's own credit is spent; the clock has moved past it
        assert await store.claim(f"heavy{i:02}", f"gpu{i}", 1)
    for i in range(6):
        await admit(store, record(f"light{i}", tenant="light"), credit=4.0)
    head = await store.queued(10)
    # Four (credit x weight) go first; the rest interleave with the flood.
    assert head[:4] == ["light0", "light1", "light2", "light3"], head
    assert head[4:].count("light4") == 1 and head.index("light5") < 10, head
    # The backlogged tenant's next prompt is still behind its own queue, credit or not.
    await admit(store, record("heavy-late", tenant="heavy"), credit=4.0)
    assert (await store.queued())[-1] == "heavy-late"
    # A front prompt goes before credited ones.
    await admit(store, record("urgent", tenant="heavy"), front=True, credit=4.0)
    assert (await store.queued(1)) == ["urgent"]


async def test_a_tenant_served_just_before_a_flood_began_still_gets_its_credit(make_store) -> None:
    """The flood's own credit scores it behind the virtual clock, and claiming those prompts does not move
    the clock; idleness is therefore also counted in prompts the farm served meanwhile."""
    store = make_store()

    async def batch(name: str) -> list[str]:
        ids = [f"{name}{i}" for i in range(4)]
        for pid in ids:
            await admit(store, record(pid, tenant="light"), credit=4.0)
        return ids

    async def run(ids: list[str]) -> None:
        for pid in ids:
            assert await store.claim(pid, "gpu", 100)
            await store.finish(pid, "success", {}, NOW)

    await run(await batch("alone"))   # the farm was the light tenant's alone
    for i in range(50):
        await admit(store, record(f"heavy{i:02}", tenant="heavy"), credit=4.0)
    await run([f"heavy{i:02}" for i in range(6)])   # six of the flood served while the light tenant idled
    back = await batch("back")
    assert (await store.queued(4)) == back
    # Idle for an instant after its batch was claimed, with one other prompt served: no new credit.
    await run(back)
    await run(["heavy06"])
    again = await batch("again")
    assert (await store.queued(4)) != again, await store.queued(4)


async def test_weights_share_the_queue(make_store) -> None:
    store = make_store()
    for i in range(4):
        await admit(store, record(f"w2-{i}", tenant="w2"), weight=2.0)
        await admit(store, record(f"w1-{i}", tenant="w1"))
    order = [pid.split("-")[0] for pid in await store.queued()]
    assert order[:3].count("w2") == 2 and order[:6].count("w2") == 4, order


async def test_leases_have_one_holder(make_store) -> None:
    first, second = make_store(), make_store()
    assert await first.hold_lease("upstream:gpu", "r1", 10_000)
    assert not await second.hold_lease("upstream:gpu", "r2", 10_000)
    assert await first.hold_lease("upstream:gpu", "r1", 10_000)  # renewal
    assert await second.lease_holders() == {"upstream:gpu": "r1"}
    await second.drop_lease("upstream:gpu", "r2")  # not the holder: nothing happens
    assert await first.lease_holders() == {"upstream:gpu": "r1"}
    await first.drop_lease("upstream:gpu", "r1")
    assert await second.hold_lease("upstream:gpu", "r2", 10_000)
    assert await first.lease_holders() == {"upstream:gpu": "r2"}


async def test_counts(make_store) -> None:
    store = make_store()
    await admit(store, record("a", tenant="t1"))
    await admit(store, record("b", tenant="t1"))
    await admit(store, record("c", tenant="t2"))
    assert await store.claim("a", "gpu", 1)
    assert await store.count_active("t1") == 2 and await store.count_active(None) == 3
    assert await store.queued_by_tenant() == {"t1": 1, "t2": 1}


async def test_requeue_only_from_the_expected_backend(make_store) -> None:
    store = make_store()
    await admit(store, record("a"))
    assert await store.claim("a", "gpu1", 1)
    assert not await store.requeue("a", from_backend="gpu2")
    assert await store.requeue("a", from_backend="gpu1")
    assert await store.claim("a", "gpu2", 1)
    assert not await store.requeue("a", from_backend="gpu1")  # already moved on
    rec = await store.get("a")
    assert rec is not None and rec.backend == "gpu2" and rec.attempts == 2


async def test_dispatch_view_and_claim_many(make_store) -> None:
    store = make_store()
    for pid in "abcd":
        await admit(store, record(pid))
    assert await store.claim("a", "gpu1", 4)
    view = await store.dispatch_view(2, {"gpu1": 4})
    assert view.inflight == {"gpu1": ["a"]} and view.counts == {"gpu1": 1}
    assert [r.prompt_id for r in view.head] == ["b", "c"] and all(r.state == QUEUED for r in view.head)
    assert (await store.dispatch_view(10, {"gpu1": 1})).head == []   # no free slot: no records read
    # In order, each atomic: the second claim for gpu2 finds its one slot taken, "b" twice only once.
    assert await store.claim_many([("b", "gpu2", 1), ("c", "gpu2", 1), ("b", "gpu1", 4), ("d", "gpu1", 4)]) \
        == [True, False, False, True]
    view = await store.dispatch_view(10, {"gpu1": 4, "gpu2": 1})
    assert view.inflight == {"gpu1": ["a", "d"], "gpu2": ["b"]} and [r.prompt_id for r in view.head] == ["c"]
    counted = await store.dispatch_view(10, {"gpu1": 4, "gpu2": 1}, members=False)   # counts only
    assert counted.counts == {"gpu1": 2, "gpu2": 1} and counted.inflight is None
    assert [r.prompt_id for r in counted.head] == ["c"]
    assert await store.claim_many([]) == []


async def test_finish_records_output_refs_and_current_nodes_skip_finished(make_store) -> None:
    store = make_store()
    for pid in "ab":
        await admit(store, record(pid))
        assert await store.claim(pid, "gpu", 2)
    await store.set_current_nodes({"a": "7", "b": "9", "gone": "1"})
    assert (await store.get("a")).current_node == "7" and await store.get("gone") is None
    ref = OutputRef("gpu", "x.png", "", "output", "", "a")
    assert await store.finish("a", "success", {}, NOW, {"r" * 20: ref}) == 1
    assert await store.resolve_output("r" * 20) == ref
    await store.set_current_nodes({"a": "8", "b": None})
    a, b = await store.get_many(["a", "b"])
    assert a.state == FINISHED and a.current_node is None and b.current_node is None


async def test_batched_scripts_survive_a_redis_that_lost_them(make_store) -> None:
    """A Redis restarted without persistence forgets loaded scripts: the pipelined EVALSHA path reloads."""
    store = make_store()
    if not hasattr(store, "redis"):
        pytest.skip("Redis only: the in-process store has no scripts")
    await admit(store, record("a"))
    await store.redis.script_flush()
    assert await store.claim_many([("a", "gpu", 1)]) == [True]
    await store.redis.script_flush()
    assert await store.finish("a", "success", {}, NOW, {}) is not None


async def test_calls_made_while_batches_are_on_their_way_go_together_in_order(make_store) -> None:
    """Group commit (proxy.store.batching): with `MAX_IN_FLIGHT` pipelines on their way, the calls made
    meanwhile wait and then share one round trip, in the order they were made, each caller getting its
    own reply. (Pipelines on different connections may run in either order: a caller that needs one call
    before another awaits the first.)"""
    from proxy.store import batching

    store = make_store()
    if not hasattr(store, "redis"):
        pytest.skip("Redis only: the in-process store has no round trips")
    incr = store.redis.register_script("return redis.call('INCR', KEYS[1])")
    await store.redis.script_load(incr.script)   # no NOSCRIPT resends among the trips counted
    key = f"{store.keys.base}:grouped"
    trips = store._round_trips
    sizes: list[int] = []
    send = trips._send

    async def counted(todo: list[batching._Request], full_text: bool) -> tuple[list[object], list[tuple[int, int]]]:
        sizes.append(sum(len(request.calls) for request in todo))
        return await send(todo, full_text)

    trips._send = counted
    first = []
    for _ in range(batching.MAX_IN_FLIGHT):   # one call a turn: each starts a pipeline of its own
        first.append(trips.submit([(incr, [key], [])]))
        await asyncio.sleep(0)
    assert len(trips._flushing) == batching.MAX_IN_FLIGHT
    waiting = [trips.submit([(incr, [key], [])]) for _ in range(10)]
    early = [reply for replies in await asyncio.gather(*first) for reply in replies]
    grouped = [reply for replies in await asyncio.gather(*waiting) for reply in replies]
    assert sorted(early + grouped) == list(range(1, batching.MAX_IN_FLIGHT + 11))
    assert grouped == list(range(grouped[0], grouped[0] + 10))   # one pipeline, in call order
    assert sizes == [1] * batching.MAX_IN_FLIGHT + [10]


async def test_after_lost_scripts_only_the_calls_that_did_not_run_run_again(make_store) -> None:
    """Another connection may reload one script between two calls of one request: the call that ran
    must not run a second time when the other is resent."""
    store = make_store()
    if not hasattr(store, "redis"):
        pytest.skip("Redis only: the in-process store has no scripts")
    incr = store.redis.register_script("return redis.call('INCR', KEYS[1])")
    incrby = store.redis.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    key = f"{store.keys.base}:counter"
    await store.redis.script_flush()
    await store.redis.script_load(incr.script)   # one of the two is back, the other is not
    replies = await store._pipelined([(incr, [key], []), (incrby, [key], [10])])
    assert replies == [1, 11] and int(await store.redis.get(key)) == 11


async def test_a_call_the_client_refuses_before_sending_fails_its_caller(make_store) -> None:
    """An error that is no RedisError (a Cluster client's check that a call's keys share a slot, made
    before anything is sent) reaches the caller instead of leaving it waiting for ever."""
    store = make_store()
    if not hasattr(store, "redis"):
        pytest.skip("Redis only: the in-process store has no round trips")

    async def refused(todo: object, full_text: bool) -> None:
        raise RuntimeError("EVALSHA - all keys must map to the same key slot")

    store._round_trips._send = refused
    with pytest.raises(RuntimeError, match="same key slot"):
        await asyncio.wait_for(store.claim("a", "gpu", 1), 5)


async def test_copies_are_claimed_once_counted_once_and_swept_even_after_their_reference_expired(make_store) -> None:
    """The copy queue and retention (proxy.keeping): a claimed copy is hidden from other claimers until its
    lease lapses, a copy finished twice counts its bytes once, a failure for a copy no longer queued counts
    nothing, and retention still uncounts and returns a copy whose reference expired unswept."""
    store, other = make_store(), make_store()
    out = OutputRef(backend="b", filename="f.png", subfolder="", type="output", tenant="t", prompt_id="p", keep=True)
    await store.record_outputs({"r1": out, "r2": replace(out, filename="g.png", keep=False)})
    now = time.time()
    assert await store.copies_due(now, 60, 10) == ["r1"]   # only the one marked to keep
    assert await other.copies_due(now, 60, 10) == []       # leased
    assert await other.copies_due(now + 61, 60, 10) == ["r1"]   # the lease lapsed: another replica makes it
    assert await store.copy_backlog() == 1
    stored = replace(out, stored="t/p/f.png", size=100, expires=now - 1)
    assert await store.copy_done("r1", stored) and await other.copy_done("r1", stored)
    assert await store.storage_used() == {"t": 100} and await store.copy_backlog() == 0
    assert await store.copy_failed("r1", now, 1, 60) == 0   # not queued any more: nothing counted
    assert await store.resolve_output("r1") is None          # past its retention: unusable already
    await store.record_outputs({"r1": out})                  # a history read again does not undo the copy
    assert await store.copies_due(now + 120, 60, 10) == []
    if isinstance(store, RedisStore):                        # the reference expires before the sweep
        await store.redis.delete(store.keys.output("r1"))
    else:
        store._outputs.pop("r1")   # type: ignore[attr-defined]
    expired = await store.files_expired(time.time(), 60, 10)
    assert expired == {"r1": stored} and await other.files_expired(time.time(), 60, 10) == {}
    await store.files_removed(expired)
    assert await store.storage_used() == {} and await store.files_expired(time.time() + 120, 60, 10) == {}


async def test_the_webhook_outbox_queues_once_leases_retries_and_gives_up(make_store) -> None:
    """The outbox (proxy.webhooks): a prompt's end queues its delivery only when that call ended it, a
    claimed delivery is hidden until its claim lapses and a report under a lapsed claim records nothing,
    retries come back when due, a given-up delivery is listed and can be queued again, a withdrawn
    prompt queues its own, and the state outlives the outbox."""
    store, other = make_store(), make_store()
    hook = {"url": "https://hooks.example/x", "events": ["job.started", "job.completed"], "base": ""}
    await admit(store, replace(record("w1"), webhook=hook))
    now = time.time()
    started = Delivery(id="msg_s", prompt_id="w1", event="job.started", tenant="", url=hook["url"], created_at=now)
    assert await store.claim("w1", "b", 2) and await store.mark_running("w1", now, deliveries=[started]) is not None
    ended = replace(started, id="msg_c", event="job.completed")
    assert await store.finish("w1", "success", {"outputs": {}}, now, deliveries=[ended]) is not None
    # a second end (another replica, a history read again) queues nothing more
    assert await store.finish("w1", "error", {"outputs": {}}, now + 1,
                              deliveries=[replace(ended, id="msg_f", event="job.failed")]) is None
    assert [d.id for d in await store.webhook_states(["msg_s", "msg_c", "msg_f"])] == ["msg_s", "msg_c"]
    assert (await store.webhook_outbox())[0] == 2
    due = {d.id: d for d in await store.webhooks_due(time.time(), 30, 10)}
    assert sorted(due) == ["msg_c", "msg_s"]
    assert await other.webhooks_due(time.time(), 30, 10) == []            # claimed
    [late] = await other.webhooks_due(time.time() + 31, 30, 1)            # the claim lapsed: another takes it
    first = due[late.id]
    assert not await store.webhook_attempted(replace(first, status=DELIVERED, attempts=1), None)   # too late
    assert await other.webhook_attempted(replace(late, status=DELIVERED, attempts=1), None)
    await store.webhooks_queue([started, ended])                          # known already: left as they are
    assert (await store.webhook_outbox())[0] == 1
    [pending] = [d for d in due.values() if d.id != late.id]
    [pending] = await store.webhooks_due(pending.claimed_until, 30, 10)
    retry = replace(pending, attempts=1, last_error="HTTP 500", last_attempt_at=now)
    assert await store.webhook_attempted(retry, now + 100)
    assert await store.webhooks_due(now + 99, 30, 10) == []
    [back] = await other.webhooks_due(now + 100, 30, 10)
    assert (back.attempts, back.last_error) == (1, "HTTP 500")
    await other.webhook_defer([(back, now + 200), (replace(back, claimed_until=1.0), now + 300)])
    assert await store.webhooks_due(now + 199, 30, 10) == []
    [back] = await store.webhooks_due(now + 200, 30, 10)                  # deferred under its claim only
    gave_up = replace(back, status=FAILED, attempts=2, last_attempt_at=now + 6)
    assert await store.webhook_attempted(gave_up, None)
    assert not await other.webhook_attempted(gave_up, None)               # no longer pending
    assert await store.webhook_outbox() == (0, None)
    assert [d.id for d in await store.webhooks_failed(10)] == [back.id]
    states = {d.id: d.status for d in await store.webhook_states(["msg_s", "msg_c", "msg_f"])}
    assert states == {late.id: DELIVERED, back.id: FAILED}
    again = await store.webhook_redeliver(back.id, now + 7)
    assert again is not None and (again.status, again.attempts) == (PENDING, 0)
    assert await store.webhook_redeliver(back.id, now + 7) is None         # not failed any more
    assert await store.webhooks_failed(10) == [] and (await store.webhook_outbox())[0] == 1
    # a withdrawn prompt's delivery is queued in the same step, and only if it was withdrawn
    await admit(store, replace(record("w2"), webhook=hook))
    gone = Delivery(id="msg_w", prompt_id="w2", event="job.cancelled", tenant="", url=hook["url"],
                    created_at=now, job={"id": "w2", "status": "cancelled"})
    assert await store.withdraw("w2", deliveries=[gone]) is not None
    assert await store.withdraw("w2", deliveries=[replace(gone, id="msg_w2")]) is None
    [told] = await store.webhook_states(["msg_w", "msg_w2"])
    assert told.job == {"id": "w2", "status": "cancelled"} and (await store.webhook_outbox())[0] == 2


async def test_the_membership_and_the_catalogue_are_shared(make_store) -> None:
    """Backends added at runtime and the farm's catalogue (proxy.membership), as every replica reads them."""
    store, other = make_store(), make_store()
    assert await store.members() == {} and await store.catalogue() is None
    joined = Member(name="gpu1", url="http://10.0.0.5:8188", labels=("sdxl",), source="join", lease_until=NOW + 15)
    await store.member_put(joined)
    await store.member_put(Member(name="alpha", url="http://a:8188", source="config", removed=True))
    assert await other.members() == {"gpu1": joined, "alpha": Member(name="alpha", url="http://a:8188",
                                                                      source="config", removed=True)}
    await other.member_put(replace(joined, leaving=True))
    assert (await store.members())["gpu1"].leaving
    await store.member_drop("gpu1")
    assert set(await other.members()) == {"alpha"}
    info = {"KSampler": {"input": {"required": {"steps": ["INT", {"default": 20}]}}}}
    await store.catalogue_put(info)
    assert await other.catalogue() == info


async def test_the_queue_summary_counts_each_tenants_waiting_prompts_and_their_oldest(make_store) -> None:
    store = make_store()
    for pid, tenant, created in (("q1", "a", 100.0), ("q2", "a", 50.0), ("q3", "b", 70.0), ("q4", "a", 10.0)):
        await admit(store, replace(record(pid, tenant=tenant), created_at=created))
    assert await store.claim("q4", "x", 1)   # in flight: not waiting any more
    assert await store.queue_summary() == {"a": (2, 50.0), "b": (1, 70.0)}
    assert await store.queued_by_tenant() == {"a": 2, "b": 1}
    await store.set_drained("x", True)   # a drained backend takes no claim, from any replica
    assert not await store.claim("q3", "x", 5)


async def test_the_history_tail_is_the_newest_finished_prompts_first(make_store) -> None:
    store = make_store()
    for pid in ("h1", "h2", "h3"):
        await admit(store, record(pid))
        assert await store.claim(pid, "b", 9)
        assert await store.finish(pid, "success", {"outputs": {}}, time.time()) is not None
    assert await store.history_tail(2) == ["h3", "h2"] and await store.history_tail(10) == ["h3", "h2", "h1"]


async def test_a_closed_redis_store_refuses_calls_and_opens_no_connection(redis_url: str) -> None:
    """A write-behind task finishing while the proxy stops must not make redis-py's pool open a
    connection nothing will close (it reconnects lazily)."""
    watch = sync_redis.Redis.from_url(redis_url)
    store = RedisStore(redis_url, "closed-test")
    await store.count_active("t")          # one connection in use, then idle in the pool
    before = len(watch.client_list())
    await store.close()
    for call in (store.count_active("t"), store.queued(), store.socket_tenant("x")):
        with pytest.raises(StoreUnavailable):
            await call
    assert len(watch.client_list()) < before
    watch.close()
