"""The event bus between replicas (proxy.relay.bus): two buses on one real redis-server stand for two
replicas; what one publishes must reach the other's hub exactly once and in order, through a Redis
restart too, while the stream stays bounded.

What a Redis restart without persistence can lose, and what the stream bus does about it: batches that
Redis had acked but a receiver had not read yet are gone with the server's memory (events published
while Redis is down wait in the publisher's outbox, and a receiver resumes from its last id, so neither
is at risk). The publisher notices that its entries are gone (the marker it sets after each one is gone
too) on its next batch, or within `CHECK_EVERY_S` when quiet or at once when its reader saw Redis fail,
and writes its window again (batches acked up to `RESEND_S` before its last good check); the receiver
drops what it had by seq, and holds a batch that came before the ones sent again until they are in.
`test_batches_acked_but_unread_when_redis_lost_them_are_sent_again` shows that case alone. Not covered
by the window: a receiver more than `RESEND_S` behind when Redis went, and previews shed from a window
over `WINDOW_BYTES` (text and ends are kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync

from proxy.config import ConfigError, load_config
from proxy.relay import bus as bus_module
from proxy.relay import streams as streams_module
from proxy.relay.bus import HEADER_LEN, decode_batch, encode
from proxy.relay.buses import redis_bus
from proxy.relay.hub import RETRY, ClientEvent, ClientHub, ClientSocket
from proxy.relay.pubsub import PubSubBus
from proxy.relay.streams import StreamBus
from proxy.store.redis import Keys
from tests import tools
from tests.conftest import free_port, listening, wait_until
from tests.test_redis_modes import (  # noqa: F401 (fixtures)
    _cli,
    _slot_owner,
    _start_cluster,
    _stop,
    cluster_url,
    mode_url,
    sentinel_url,
)

NODE_ENTRIES = 10   # stream entries per node (`~` trims whole nodes), small so the bounds are tight


class Recorder:
    """Stands for a replica's ClientHub: what the bus delivered, in order."""

    def __init__(self) -> None:
        self.events: list[ClientEvent] = []

    def deliver(self, event: ClientEvent) -> None:
        self.events.append(event)


class RedisServer:
    """A redis-server of the test's own, on a fixed port, that can be SIGKILLed and started again."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.args = [tools.tool("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--dir", str(workdir), "--stream-node-max-entries", str(NODE_ENTRIES), *extra]
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: ASYNC220
        await wait_until(lambda: listening(self.port), what="redis-server to listen")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def client(self) -> redis_sync.Redis:
        return redis_sync.Redis(port=self.port)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    redis = RedisServer(tmp_path, "--appendonly", "no")
    await redis.start()
    yield redis
    redis.kill()


@contextlib.asynccontextmanager
async def replicas(kind: str, url: str, prefix: str | None = None,
                   settle: Any = None) -> AsyncIterator[tuple[Any, Recorder, Any, Recorder]]:
    """Two started buses over the same key prefix, each with its own hub: (sender, its hub, receiver, its hub)."""
    keys = Keys(prefix or uuid.uuid4().hex[:8])
    hubs = Recorder(), Recorder()
    buses = [redis_bus(kind, hub=hub, url=url, keys=keys, settle=settle) for hub in hubs]   # type: ignore[arg-type]
    for bus in buses:
        await bus.start()
    try:
        yield buses[0], hubs[0], buses[1], hubs[1]
    finally:
        for bus in buses:
            await asyncio.wait_for(bus.stop(), 15)


def event(i: int, *, end: bool = False) -> ClientEvent:
    """Text and binary events in turn; every seventh binary one a 64 KiB preview."""
    if i % 2:
        size = 65536 if i % 7 == 0 else 8 + i % 50
        return ClientEvent("t", "c1", i.to_bytes(4, "big") + bytes(size), "preview", preview_meta={"node": str(i)})
    payload = f'{{"type": "progress", "data": {{"value": {i}}}}}'
    return ClientEvent("t", None if i % 10 == 0 else "c1", payload, "executing" if end else "progress",
                       settles=f"p{i}" if end else None)


def received(hub: Recorder) -> list[tuple[Any, ...]]:
    return [(e.tenant, e.client_id, e.kind, e.payload, e.preview_meta) for e in hub.events]


def expected(events: list[ClientEvent]) -> list[tuple[Any, ...]]:
    return [(e.tenant, e.client_id, e.kind, e.payload, e.preview_meta) for e in events]


async def arrived(hub: Recorder, count: int, timeout: float = 20.0) -> None:
    async def enough() -> bool:
        return len(hub.events) >= count
    await wait_until(enough, timeout=timeout, what=f"{count} events (have {len(hub.events)})")


FENCE = 999_999


async def fenced(sender: Any, hub: Recorder, sent: list[ClientEvent], timeout: float = 20.0) -> list[ClientEvent]:
    """`sent` and one more event published after them, once that one arrived: one publisher's batches are
    delivered in order, so a batch lost, doubled or out of place stands before it."""
    fence = event(FENCE)
    sender.publish(fence)

    async def fence_in() -> bool:
        return any(e.payload == fence.payload for e in hub.events)
    await wait_until(fence_in, timeout=timeout, what=f"the last event (have {len(hub.events)})")
    return [*sent, fence]


@pytest.mark.parametrize("kind", ["streams", "pubsub"])
async def test_every_event_reaches_the_other_replica_once_and_in_order(kind: str, server: RedisServer) -> None:
    sent = [event(i) for i in range(3000)]
    async with replicas(kind, server.url) as (sender, own, _, other):
        for i, e in enumerate(sent):
            sender.publish(e)
            if i % 50 == 0:
                await asyncio.sleep(0)   # batches of many sizes
        sent = await fenced(sender, other, sent)
        assert received(other) == expected(sent)
        assert received(own) == expected(sent)   # at once, and never again from Redis


async def test_events_cross_on_a_sentinel_master_and_a_cluster(mode_url: str) -> None:  # noqa: F811
    sent = [event(i) for i in range(500)]
    async with replicas("streams", mode_url) as (sender, _, _, other):
        for e in sent:
            sender.publish(e)
        sent = await fenced(sender, other, sent)
        assert received(other) == expected(sent)


async def test_events_cross_on_a_cluster_while_another_node_is_down(tmp_path: Path) -> None:
    """Only the stream's node matters: a read goes there by name. (redis-py would ask its default node,
    the first listed, for XREAD's keys on every read: a round trip more, failing while that node is down.)"""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ports = _start_cluster(tmp_path, procs, "--cluster-node-timeout", "1000",
                               "--cluster-require-full-coverage", "no")
        prefix = uuid.uuid4().hex[:8]
        owner = _slot_owner(ports, "{" + prefix + "}")
        doomed = next(p for p in ports if p != owner)
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in sorted(ports, key=lambda p: p != doomed))
        async with replicas("streams", url, prefix) as (sender, _, _, other):
            sender.publish(event(0))
            await arrived(other, 1)
            assert not any("getkeys" in _cli(p, "INFO", "commandstats") for p in ports)
            procs[ports.index(doomed)].kill()
            procs[ports.index(doomed)].wait(timeout=10)

            async def marked_failed() -> bool:   # the readers have been at it meanwhile
                return f":{doomed}@" in next((line for line in _cli(owner, "CLUSTER", "NODES").splitlines()
                                               if "fail" in line), "")
            await wait_until(marked_failed, timeout=20, what="the cluster to mark the node failed")
            sent = [event(i) for i in range(1, 200)]
            for e in sent:
                sender.publish(e)
            await arrived(other, 1 + len(sent), timeout=20)
            assert received(other)[1:] == expected(sent)
    finally:
        _stop(procs)


@pytest.mark.parametrize("persistence", [["--appendonly", "no"], ["--appendonly", "yes", "--appendfsync", "always"]],
                         ids=["no-persistence", "aof"])
async def test_a_redis_restart_mid_stream_loses_nothing_and_doubles_nothing(persistence: list[str],
                                                                            tmp_path: Path) -> None:
    redis = RedisServer(tmp_path, *persistence)
    await redis.start()
    confirmed: list[str] = []

    async def settle(ids: list[str]) -> None:
        confirmed.extend(ids)

    sent = [event(i, end=i % 100 == 98) for i in range(1500)]
    try:
        async with replicas("streams", redis.url, settle=settle) as (sender, _, _, other):
            for i, e in enumerate(sent):
                sender.publish(e)
                await asyncio.sleep(0.002 if i % 4 == 0 else 0)
                if i == 600:
                    redis.kill()
                    await asyncio.sleep(0.3)
                    await redis.start()
            # once each, in order, through the restart
            sent = await fenced(sender, other, sent, timeout=30)
            assert received(other) == expected(sent)
            ends = [e.settles for e in sent if e.settles]

            async def all_confirmed() -> bool:
                return sorted(confirmed) == sorted(ends)
            await wait_until(all_confirmed, what="every end confirmed")
            assert len(confirmed) == len(set(confirmed))   # each end confirmed once: never announced again
    finally:
        redis.kill()


def index(e: ClientEvent) -> int:
    return int.from_bytes(e.payload[:4], "big") if isinstance(e.payload, bytes) else int(e.payload.split()[-1][:-2])


async def test_pubsub_through_a_restart_keeps_order_and_loses_only_while_a_subscriber_is_away(
        server: RedisServer) -> None:
    """What the stream bus is measured against: pub/sub keeps nothing for a subscriber that is away."""
    async with replicas("pubsub", server.url) as (sender, _, _, other):
        before = [event(i) for i in range(200)]
        for e in before:
            sender.publish(e)
        await arrived(other, len(before))
        server.kill()
        await server.start()
        probes = iter(range(200, 10_000))

        async def listening_again() -> bool:   # probes, some lost, until one arrives
            sender.publish(event(next(probes)))
            return len(other.events) > len(before)
        await wait_until(listening_again, timeout=15, what="the subscriber back")
        start = next(probes)
        after = [event(i) for i in range(start, start + 500)]
        for e in after:
            sender.publish(e)

        async def last_arrived() -> bool:
            return bool(other.events) and index(other.events[-1]) == start + 499
        await wait_until(last_arrived, timeout=15, what="the last event")
        seen = [index(e) for e in other.events]
        assert seen == sorted(set(seen))   # in order, none twice
        assert received(other)[:len(before)] == expected(before)
        assert received(other)[-len(after):] == expected(after)   # nothing lost once it listens again


@pytest.mark.parametrize("found_by", ["check", "next batch"])
async def test_batches_acked_but_unread_when_redis_lost_them_are_sent_again(
        found_by: str, server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one thing a restart without persistence takes: entries Redis acked and a receiver had not read.
    The receiver here is held back (it starts reading only after the restart, from where it stood). The
    publisher finds the loss by a check (its receiver saw Redis fail), or by its next batch, which then
    lands before the ones sent again: the receiver holds it until they are in."""
    if found_by == "next batch":
        async def no_check(self: StreamBus) -> None:
            return None
        monkeypatch.setattr(StreamBus, "_check", no_check)
    keys = Keys(uuid.uuid4().hex[:8])
    own, other = Recorder(), Recorder()
    sender = StreamBus(hub=own, url=server.url, keys=keys)  # type: ignore[arg-type]
    late = StreamBus(hub=other, url=server.url, keys=keys)  # type: ignore[arg-type]
    await sender.start()
    try:
        sent = [event(i, end=i == 4) for i in range(5)]
        for e in sent:
            sender.publish(e)
            await asyncio.sleep(0.01)   # a batch each

        async def acked() -> bool:
            return sender._marked == b"5"
        await wait_until(acked, what="the batches acked")
        assert server.client().xlen(keys.events) == 5
        # The late reader had read the first batch and no further when Redis went.
        late._position = server.client().xrange(keys.events, count=1)[0][0]
        late._seen[sender.origin.encode()] = 1
        sent = sent[1:]
        server.kill()
        await server.start()
        assert server.client().exists(keys.events) == 0   # gone with the server's memory
        await late.start()
        if found_by == "next batch":
            sent.append(event(5))
            sender.publish(sent[-1])
        sent = await fenced(sender, other, sent, timeout=10)
        assert received(other) == expected(sent)
    finally:
        await sender.stop()
        await late.stop()


async def test_a_receiver_reads_again_from_before_its_position_after_a_failure(server: RedisServer) -> None:
    """A new primary goes on from the ids it had replicated (and its clock may be behind), so what it takes
    after a failover can sit below the last id a receiver read from the old one. Simulated: the receiver's
    position is moved 3 s past Redis's clock, then Redis restarts; it still gets every event."""
    async with replicas("streams", server.url) as (sender, _, receiver, other):
        sender.publish(event(0))
        await arrived(other, 1)
        ms = int(receiver._position.partition(b"-")[0])
        receiver._position = b"%d-0" % (ms + 3000)
        server.kill()
        await server.start()
        sent = [event(i) for i in range(1, 50)]
        for e in sent:
            sender.publish(e)
        await arrived(other, 1 + len(sent), timeout=10)
        assert received(other)[1:] == expected(sent)


async def test_the_stream_stays_bounded_by_length_and_by_age(server: RedisServer,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams_module, "STREAM_MAXLEN", 50)
    monkeypatch.setattr(streams_module, "STREAM_MAX_AGE_S", 1.0)
    monkeypatch.setattr(streams_module, "TRIM_EVERY_S", 0.2)
    monkeypatch.setattr(streams_module, "CHECK_EVERY_S", 0.1)
    prefix = uuid.uuid4().hex[:8]
    keys = Keys(prefix)
    client = server.client()
    async with replicas("streams", server.url, prefix) as (sender, _, _, other):
        for i in range(400):
            sender.publish(event(i))
            await asyncio.sleep(0.001)   # one batch each, about
            assert client.xlen(keys.events) <= 50 + NODE_ENTRIES
        await arrived(other, 400)
        assert client.xlen(keys.events) >= 50   # the cap is about, never below

        async def aged_out() -> bool:
            return int(client.xlen(keys.events)) <= NODE_ENTRIES
        await wait_until(aged_out, timeout=10, what="entries older than the age bound trimmed")
        assert 0 < client.pttl(keys.events) <= 2000   # and the stream goes when no replica is left to trim it
        assert 0 < client.pttl(keys.events_sent(sender.origin)) <= streams_module.MARKER_TTL_MS


async def test_an_end_is_confirmed_once_its_batch_is_in_redis_even_after_a_failure(server: RedisServer) -> None:
    """Pub/sub leaves ends published after a failure unconfirmed (the announcer tells them again); the
    stream bus confirms them as soon as Redis has them, so they are never told twice."""
    confirmed: list[str] = []

    async def settle(ids: list[str]) -> None:
        confirmed.extend(ids)

    async with replicas("streams", server.url, settle=settle) as (sender, _, _, other):
        server.kill()
        sender.publish(event(0, end=True))
        await asyncio.sleep(0.3)
        assert confirmed == []   # not in Redis yet
        await server.start()
        await arrived(other, 1, timeout=10)

        async def told() -> bool:
            return confirmed == ["p0"]
        await wait_until(told, what="the end confirmed")


async def test_a_batch_after_a_gap_waits_for_the_missing_ones_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(StreamBus, "hold_s", 0.2)
    hub = Recorder()
    bus = StreamBus(hub=hub, url="redis://127.0.0.1:1/0", keys=Keys("p"))  # type: ignore[arg-type]
    origin = uuid.uuid4().hex.encode()

    def batch(seq: int) -> bytes:
        return origin + bus_module._SEQ.pack(seq) + bus_module.encode(event(seq))
    try:
        for seq in (1, 4, 2, 4, 3, 2, 5):   # 4 came first (sent again after a loss, or read twice)
            bus._take(batch(seq))
        assert [index(e) for e in hub.events] == [1, 2, 3, 4, 5]
        bus._take(batch(7))   # 6 never comes: 7 goes after the hold
        assert [index(e) for e in hub.events] == [1, 2, 3, 4, 5]

        async def released() -> bool:
            return len(hub.events) == 6
        await wait_until(released, timeout=5, what="the held batch")
        bus._take(batch(6))   # too late: dropped, never out of order
        bus._take(batch(8))
        assert [index(e) for e in hub.events] == [1, 2, 3, 4, 5, 7, 8]
    finally:
        await bus._redis.aclose()


def test_the_window_sheds_previews_before_text_and_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a publisher keeps to write again is bounded; the oldest batches lose their previews first."""
    monkeypatch.setattr(streams_module, "WINDOW_BYTES", 300_000)
    window = streams_module._Window()
    batches = [[(bus_module.encode(e), e.settles, isinstance(e.payload, bytes)) for e in (event(i, end=True),
                                                                                         event(i * 7 + 7))]
               for i in range(0, 20, 2)]   # each: an end and a 64 KiB preview
    for n, batch in enumerate(batches):
        window.add(n + 1, b"h" * bus_module.HEADER_LEN, batch)
        window.checked(n / 10)
    kept = [bus_module.decode_batch(sent.message()) for sent in window.all()]
    assert len(kept) == len(batches)   # every end is still there
    assert [events[0].settles is None and events[0].kind for events in kept] == ["executing"] * len(batches)
    previews = [len(events) == 2 for events in kept]
    assert previews == sorted(previews) and 0 < sum(previews) <= 300_000 // 65536   # the newest keep theirs
    window.checked(1 + streams_module.RESEND_S)
    assert len(window) == 0   # acked more than RESEND_S before a good check: gone


def test_config_chooses_the_bus(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("redis: {url: 'redis://h:6379/0', events: pubsub}\n")
    assert load_config(str(path)).store.events == "pubsub"
    path.write_text("redis: {url: 'redis://h:6379/0'}\n")
    assert load_config(str(path)).store.events == "streams"
    path.write_text("redis: {events: kafka}\n")
    with pytest.raises(ConfigError, match=r"redis\.events: must be one of streams, pubsub"):
        load_config(str(path))
    assert isinstance(redis_bus("pubsub", hub=Recorder(), url="redis://h:1/0", keys=Keys("p")),  # type: ignore[arg-type]
                      PubSubBus)


def test_a_hub_delivers_each_end_of_a_prompt_once_until_it_runs_again() -> None:
    """An end can reach a hub twice (told by its replica and by an announcer); the socket gets it once. A
    `proxy_retry` means the prompt runs again: its next end is delivered. The prompt's id travels the bus."""
    hub = ClientHub()
    sockets = {cid: ClientSocket(None, "t", cid) for cid in ("c1", "c2")}   # type: ignore[arg-type]
    for sock in sockets.values():
        hub.register(sock)

    def of(kind: str, client: str = "c1", prompt: str | None = "p1") -> ClientEvent:
        return ClientEvent("t", client, kind, kind, end_of=prompt)
    for sent in [of("execution_success"), of("executing"), of("execution_success"), of("executing"),
                 of("progress", prompt=None), of("executing", "c2"), of("executing", prompt="p2"),
                 of(RETRY), of("executing"), of("executing")]:
        hub.deliver(decode_batch(bytes(HEADER_LEN) + encode(sent))[0])
    got = {cid: [sock.outbox.get_nowait() for _ in range(sock.outbox.qsize())] for cid, sock in sockets.items()}
    assert got == {"c1": ["execution_success", "executing", "progress", "executing", RETRY, "executing"],
                   "c2": ["executing"]}
