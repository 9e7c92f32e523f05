"""The Redis store behind a Sentinel and on a Cluster: real servers started by the test, the store's
promises checked through each URL form, and a prompt carried end to end by a proxy on each."""

from __future__ import annotations

import asyncio
import shutil
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
from proxy.store.connect import _hosts, _password
from tests.client import ComfyClient, start_proxy, txt2img
from tests.conftest import TEARDOWN_S, free_port
from tests.test_store import record

REDIS = shutil.which("redis-server")
CLI = shutil.which("redis-cli")
pytestmark = pytest.mark.skipif(not REDIS or not CLI, reason="redis-server and redis-cli are needed")


def _server(workdir: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    assert REDIS
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _cli(port: int, *args: str) -> str:
    assert CLI
    return subprocess.run([CLI, "-p", str(port), *args], capture_output=True, text=True, timeout=30).stdout


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
    procs.append(subprocess.Popen([REDIS or "", str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL))
    try:
        _await_answer(sentinel, "SENTINEL", "get-master-addr-by-name", "gpus", expect=str(master), what="the sentinel")
        yield f"redis+sentinel://127.0.0.1:{sentinel}/gpus/0"
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)


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


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Three primaries, every slot covered."""
    work = tmp_path_factory.mktemp("cluster")
    ports = [_cluster_port() for _ in range(3)]
    procs = [_server(work / str(p), p, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "2000") for p in ports]
    try:
        for p in ports:
            _await_answer(p, "PING", what="a cluster node")
        _cli(ports[0], "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "0",
             "--cluster-yes")
        _await_answer(ports[0], "CLUSTER", "INFO", expect="cluster_state:ok", what="the cluster to be ok")
        yield "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(params=["sentinel", "cluster"])
async def mode_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    yield request.getfixturevalue(f"{request.param}_url")


def test_urls_parse() -> None:
    assert _hosts("a:1,b:2", 26379) == [("a", 1), ("b", 2)]
    assert _hosts(":pw@a,b:7", 6379) == [("a", 6379), ("b", 7)]
    assert _password(":s%40cret@a:1") == "s@cret" and _password("a:1") is None


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
        inflight, head = await store.dispatch_view(5, {"gpu": 1})
        assert inflight == {} and [r.prompt_id for r in head] == ["a", "b"]
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
    finally:
        await asyncio.wait_for(handle.close(), TEARDOWN_S)
