"""The Redis store behind a Sentinel and on a Cluster: real servers started by the test, the store's
promises checked through each URL form, and a prompt carried end to end by a proxy on each."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from proxy.app import create_app
from proxy.config import BackendConfig, Config, SchedulerConfig, StoreConfig, load_config
from proxy.store import RedisStore
from proxy.store.base import Admission
from proxy.store.connect import _hosts, _password, redis_client
from tests import tools
from tests.client import ComfyClient, start_proxy, txt2img
from tests.conftest import TEARDOWN_S, free_port, wait_until
from tests.test_store import record


def _server(workdir: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([tools.tool("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no",
                             "--dir", str(workdir), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _cli(port: int, *args: str) -> str:
    return subprocess.run([tools.tool("redis-cli"), "-p", str(port), *args], capture_output=True, text=True,
                          timeout=30).stdout


def _await_answer(port: int, *args: str, expect: str = "PONG", what: str = "") -> None:
    """Poll the server with redis-cli until it answers `expect` (fixtures run outside the event loop)."""
    deadline = time.monotonic() + 20
    while expect not in _cli(port, *args):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def sentinel_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A master and one Sentinel watching it as `gpus`."""
    work = tmp_path_factory.mktemp("sentinel")
    master, sentinel = free_port(), free_port()
    procs = [_server(work / "master", master)]
    conf = work / "sentinel.conf"
    conf.write_text(f"port {sentinel}\nbind 127.0.0.1\nsentinel monitor gpus 127.0.0.1 {master} 1\n"
                    "sentinel down-after-milliseconds gpus 2000\n")
    procs.append(subprocess.Popen([tools.tool("redis-server"), str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL))
    try:
        _await_answer(sentinel, "SENTINEL", "get-master-addr-by-name", "gpus", expect=str(master), what="the sentinel")
        yield f"redis+sentinel://127.0.0.1:{sentinel}/gpus/0"
    finally:
        _stop(procs)


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too: a node on a port above
    55535 cannot open its bus and does not start."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def _start_cluster(work: Path, procs: list[subprocess.Popen[bytes]], *extra: str) -> list[int]:
    """Three primaries sharing every slot, started into `procs` (the caller stops them); their ports."""
    ports = [_cluster_port() for _ in range(3)]
    procs += [_server(work / str(p), p, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", *extra)
              for p in ports]
    for p in ports:
        _await_answer(p, "PING", what="a cluster node")
    _cli(ports[0], "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "0",
         "--cluster-yes")
    _await_answer(ports[0], "CLUSTER", "INFO", expect="cluster_state:ok", what="the cluster to be ok")
    return ports


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Three primaries, every slot covered."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ports = _start_cluster(tmp_path_factory.mktemp("cluster"), procs, "--cluster-node-timeout", "2000")
        yield "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    finally:
        _stop(procs)


@pytest.fixture(params=["sentinel", "cluster"])
async def mode_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    yield request.getfixturevalue(f"{request.param}_url")


def test_urls_parse() -> None:
    assert _hosts("a:1,b:2", 26379) == [("a", 1), ("b", 2)]
    assert _hosts(":pw@a,b:7", 6379) == [("a", 6379), ("b", 7)]
    assert _password(":s%40cret@a:1") == "s@cret" and _password("a:1") is None


def test_commands_are_packed_as_redis_py_packs_them() -> None:
    """hiredis packs the commands (proxy.store.connect): the same bytes as redis-py's own packer for what
    redis-py takes, and the same refusal for what it refuses."""
    from redis.asyncio.connection import Connection
    from redis.exceptions import DataError

    ours = redis_client("redis://127.0.0.1:1/0").connection_pool.connection_class(host="127.0.0.1", port=1)
    theirs = Connection(host="127.0.0.1", port=1)
    assert "_HiredisPacking" in [cls.__name__ for cls in type(ours).__mro__]
    commands = [("EVALSHA", "ab12", 2, "{p}:k1", "{p}:k2", 1.5, -7, 0.1, 10**18, "é ∂"),
                ("CLIENT SETNAME", "n"), (b"PUBLISH", b"ch", b"\x00\xff", bytearray(b"ba"), memoryview(b"mv"))]
    for command in commands:
        assert b"".join(ours.pack_command(*command)) == b"".join(theirs.pack_command(*command))
    assert b"".join(ours.pack_commands(commands)) == b"".join(theirs.pack_commands(commands))
    for bad in (True, None, object()):
        with pytest.raises(DataError):
            ours.pack_command("SET", "k", bad)
        with pytest.raises(DataError):
            theirs.pack_command("SET", "k", bad)


def test_config_takes_every_form(tmp_path: Path) -> None:
    for url in ("redis+sentinel://h:26379,g:26379/gpus/0", "redis+cluster://h:7000,g:7001", "unix:///run/r.sock"):
        path = tmp_path / "c.yaml"
        path.write_text(f"redis: {{url: '{url}'}}\n")
        assert load_config(str(path)).store.redis_url == url


async def test_store_promises_hold(mode_url: str) -> None:
    store = RedisStore(mode_url, uuid.uuid4().hex[:8])
    try:
        await store.ping()
        for pid in ("a", "b"):
            await store.admit(record(pid), Admission(now=1_800_000_000.0))
        view = await store.dispatch_view(5, {"gpu": 1})
        assert view.inflight == {} and [r.prompt_id for r in view.head] == ["a", "b"]
        assert await store.claim_many([("a", "gpu", 1), ("b", "gpu", 1)], by="r1") == [True, False]
        await store.mark_running("a", 1_800_000_001.0)
        await store.set_current_nodes({"a": "3"})
        assert (await store.get("a")).current_node == "3"
        assert await store.finish("a", "success", {"outputs": {}}, 1_800_000_002.0) == 1
        assert await store.history_ids() == ["a"] and await store.queued() == ["b"]
        assert await store.hold_lease("upstream:gpu", "r1", 5000)
        assert await store.lease_holders() == {"upstream:gpu": "r1"}
        await store.redis.script_flush()    # scripts lost (a failover to a fresh node): reloaded on NOSCRIPT
        assert await store.claim("b", "gpu", 1)
    finally:
        await store.close()


async def test_every_key_a_script_is_given_shares_the_prefix_slot(mode_url: str) -> None:
    """A Cluster refuses a call whose keys hash to different slots: a prompt admitted without a client_id
    names no client set (an empty name has a slot of its own), and calls over several records name each."""
    store = RedisStore(mode_url, uuid.uuid4().hex[:8])
    try:
        await asyncio.wait_for(store.admit(record("a", client=None), Admission(now=1_800_000_000.0)), 10)
        await store.admit(record("b"), Admission(now=1_800_000_000.0))
        await store.set_current_nodes({"a": "1", "b": "2"})
        assert [(await store.get(pid)).current_node for pid in "ab"] == ["1", "2"]
        await store.finish("a", "success", {}, 1_800_000_001.0)
        await store.forget_history(["a", "b"])
        assert await store.history_ids() == [] and await store.queued() == ["b"] and await store.get("a") is None
    finally:
        await store.close()


async def test_a_prompt_runs_end_to_end(mode_url: str, sims) -> None:
    sim = await sims("alpha")
    config = Config(backends=(BackendConfig(name="alpha", url=sim.url),),
                    store=StoreConfig(redis_url=mode_url, key_prefix=uuid.uuid4().hex[:8]),
                    scheduler=SchedulerConfig(poll_interval_s=0.2))
    handle = await start_proxy(create_app(config))
    try:
        async with ComfyClient(handle.url) as client:
            await client.connect()
            pid = await client.queue_prompt(txt2img(1))
            await client.wait_done(pid, timeout=20)
            status, history = await client.get(f"/history/{pid}")
            assert status == 200 and history[pid]["status"]["status_str"] == "success"

        async def confirmed() -> bool:   # the end's announcement, recorded and cleared on this topology too
            return pid not in await handle.services.store.ends_to_announce(time.time() + 3600, 0.0)
        await wait_until(confirmed, timeout=10, what="the bus to confirm the end")
    finally:
        await asyncio.wait_for(handle.close(), TEARDOWN_S)


def _slot_owner(ports: list[int], key: str) -> int:
    """The port of the node that serves `key`'s slot."""
    slot = int(_cli(ports[0], "CLUSTER", "KEYSLOT", key).strip())
    for line in _cli(ports[0], "CLUSTER", "NODES").splitlines():
        fields = line.split()
        port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        for span in fields[8:]:
            low, _, high = span.partition("-")
            if low.isdigit() and int(low) <= slot <= int(high or low):
                return port
    raise AssertionError(f"no node serves slot {slot}")


async def test_events_cross_replicas_after_the_bus_node_dies(tmp_path: Path, sims) -> None:
    """The event bus subscribes through the first Cluster node listed; when that node dies it moves on to
    the next. Pub/sub keeps nothing, so what is published while a replica's subscriber is still moving is
    lost to it, but not a prompt's end: after a bus failure ends stay unconfirmed for a while and the
    socket holder tells them again, so a client on the other replica still learns its prompt ended."""
    procs: list[subprocess.Popen[bytes]] = []
    handles = []
    try:
        # Without full coverage, the nodes left keep serving their slots when one dies.
        ports = _start_cluster(tmp_path, procs, "--cluster-node-timeout", "1000",
                               "--cluster-require-full-coverage", "no")
        prefix = uuid.uuid4().hex[:8]
        store_port = _slot_owner(ports, "{" + prefix + "}")
        doomed = next(p for p in ports if p != store_port)   # listed first: the bus's node
        order = [doomed, *(p for p in ports if p != doomed)]
        sim = await sims("alpha")
        config = Config(backends=(BackendConfig(name="alpha", url=sim.url),),
                        store=StoreConfig(redis_url="redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in order),
                                          key_prefix=prefix),
                        scheduler=SchedulerConfig(poll_interval_s=0.2))
        handles = [await start_proxy(create_app(config)) for _ in range(2)]

        async def owner_known() -> bool:
            return "upstream:alpha" in await handles[0].services.store.lease_holders()
        await wait_until(owner_known, timeout=10, what="a replica to hold alpha's socket")
        owner = (await handles[0].services.store.lease_holders())["upstream:alpha"]
        listener = next(h for h in handles if h.services.dispatcher.replica != owner)
        poster = next(h for h in handles if h.services.dispatcher.replica == owner)
        procs[ports.index(doomed)].kill()
        procs[ports.index(doomed)].wait(timeout=10)
        async with ComfyClient(listener.url) as client, ComfyClient(poster.url, client.client_id) as other:
            await client.connect()
            pid = await other.queue_prompt(txt2img(3))   # runs while the buses find the node gone
            await client.wait_done(pid, timeout=30)
    finally:
        for handle in handles:
            await asyncio.wait_for(handle.close(), TEARDOWN_S)
        _stop(procs)
