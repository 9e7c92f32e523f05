"""A load with counts for failover tests: two proxy replicas sharing one Redis deployment, two simulated
backends whose every sent message is recorded, and four websocket clients that each post their prompts
through the other replica. `Topology`s are the Redis deployments the tests fail (a Sentinel-watched
primary and replica, a Cluster with replicas, a single server restarted), all real servers on free
loopback ports.

What counts as exactly once: for every accepted prompt, each progress step, `executed` and end the
backends sent about it reached its client as many times as the backends sent it (a prompt the proxy ran
again is sent again, with a `proxy_retry` between: allowed).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from proxy.app import create_app
from proxy.config import BackendConfig, Config, SchedulerConfig, StoreConfig
from proxy.sim import SimServer
from tests import tools
from tests.client import ComfyClient, ProxyHandle, start_proxy, txt2img
from tests.conftest import TEARDOWN_S, free_port, listening, wait_until
from tests.test_redis_modes import _cluster_port

STEPS = 10          # a prompt's sampler steps: ten progress messages
STEP_MS = 50        # so a prompt runs about 0.6 s on a simulator
CLIENTS = 4
PROMPTS = 24
SETTLE_S = 90.0     # for every accepted prompt to end after the fault
STRIKE_S = 60.0     # for the load to be posted, the fault included
MID_RUN_ENDS = 4    # prompts ended before a mid-run strike: two a backend, the rest queued or running


def _cli(port: int, *args: str) -> str:
    return subprocess.run([tools.tool("redis-cli"), "-p", str(port), *args], capture_output=True, text=True,
                          timeout=30).stdout


async def _answered(port: int, *args: str, expect: str, what: str, timeout: float = 30.0) -> None:
    async def answers() -> bool:
        return expect in await asyncio.to_thread(_cli, port, *args)
    await wait_until(answers, timeout=timeout, what=what)


class Topology(Protocol):
    """A Redis deployment a test can fail: `url` for the proxies, `fail` strikes once."""

    url: str

    async def fail(self, prefix: str) -> None: ...


@dataclass
class Servers:
    """Processes started by a topology, killed together at the end."""

    work: Path
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    def redis(self, *extra: str, port: int | None = None) -> int:
        port = port or free_port()
        folder = self.work / str(port)
        folder.mkdir(parents=True, exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [tools.tool("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--dir", str(folder), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return port

    def sentinel(self, text: str) -> int:
        port = free_port()
        conf = self.work / f"sentinel-{port}.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {self.work}\n{text}")
        self.procs[port] = subprocess.Popen([tools.tool("redis-server"), str(conf), "--sentinel"],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return port

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        proc.kill()
        proc.wait(timeout=10)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait(timeout=10)


class SentinelSet:
    """A primary, its replica and three Sentinels (quorum 2, a primary down after 1 s)."""

    SERVICE = "gpus"

    def __init__(self, servers: Servers) -> None:
        self.servers = servers
        self.sentinels: list[int] = []
        self.ports: list[int] = []
        self.url = ""

    async def start(self) -> None:
        primary = self.servers.redis("--appendonly", "no")
        await wait_until(lambda: listening(primary), what="the primary")
        replica = self.servers.redis("--appendonly", "no", "--replicaof", "127.0.0.1", str(primary))
        self.ports = [primary, replica]
        await _answered(replica, "INFO", "replication", expect="master_link_status:up", what="the replica's link")
        self.sentinels = [self.servers.sentinel(
            f"sentinel monitor {self.SERVICE} 127.0.0.1 {primary} 2\n"
            f"sentinel down-after-milliseconds {self.SERVICE} 1000\n"
            f"sentinel failover-timeout {self.SERVICE} 10000\n") for _ in range(3)]
        for port in self.sentinels:   # each knows the replica and the two other Sentinels: a failover can be voted
            await _answered(port, "SENTINEL", "master", self.SERVICE, expect="num-slaves\n1\n", what="a Sentinel")
            await _answered(port, "SENTINEL", "master", self.SERVICE, expect="num-other-sentinels\n2\n",
                            what="the Sentinels to find each other")
        self.url = "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinels) + f"/{self.SERVICE}/0"

    def primary(self) -> int:
        return int(_cli(self.sentinels[0], "SENTINEL", "get-master-addr-by-name", self.SERVICE).split()[1])

    def replica(self) -> int:
        primary = self.primary()
        return next(p for p in self.ports if p != primary)

    async def fail(self, prefix: str) -> None:
        """SIGKILL the primary; the Sentinels promote its replica."""
        self.servers.kill(self.primary())


class ClusterSet:
    """Three primaries with a replica each (`--cluster-replicas 1`), a node failed after 1 s."""

    def __init__(self, servers: Servers) -> None:
        self.servers = servers
        self.ports: list[int] = []
        self.url = ""

    async def start(self) -> None:
        self.ports = [self.servers.redis("--appendonly", "no", "--cluster-enabled", "yes", "--cluster-config-file",
                                         "nodes.conf", "--cluster-node-timeout", "1000", port=_cluster_port())
                      for _ in range(6)]
        for port in self.ports:
            await wait_until(lambda port=port: listening(port), what="a cluster node")
        await asyncio.to_thread(_cli, self.ports[0], "--cluster", "create",
                                *(f"127.0.0.1:{p}" for p in self.ports), "--cluster-replicas", "1", "--cluster-yes")
        for port in self.ports:
            await _answered(port, "CLUSTER", "INFO", expect="cluster_state:ok", what="the cluster to be ok")
        for port in self.ports:
            await _answered(port, "INFO", "replication", expect="_link_status:up" if self._is_replica(port)
                            else "connected_slaves:1", what="every primary's replica in sync")
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:3])

    def _is_replica(self, port: int) -> bool:
        return "role:slave" in _cli(port, "INFO", "replication")

    def owner(self, key: str) -> int:
        """The port of the primary serving `key`'s slot."""
        slot = int(_cli(self.ports[0], "CLUSTER", "KEYSLOT", key).strip())
        for line in _cli(self.ports[0], "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for span in fields[8:]:
                low, _, high = span.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        raise AssertionError(f"no primary serves slot {slot}")

    async def fail(self, prefix: str) -> None:
        """SIGKILL the primary that holds the deployment's keys (its hash tag); its replica takes over."""
        self.servers.kill(self.owner("{" + prefix + "}"))


class RestartedServer:
    """One server with an fsync-always append-only file, SIGKILLed and started again after `down_s`."""

    def __init__(self, servers: Servers, down_s: float = 1.0) -> None:
        self.servers = servers
        self.down_s = down_s
        self.port = 0
        self.url = ""

    async def start(self) -> None:
        self.port = self.servers.redis("--appendonly", "yes", "--appendfsync", "always")
        await wait_until(lambda: listening(self.port), what="redis-server")
        self.url = f"redis://127.0.0.1:{self.port}/0"

    async def fail(self, prefix: str) -> None:
        self.servers.kill(self.port)
        await asyncio.sleep(self.down_s)   # the outage itself: what the test is about
        self.servers.redis("--appendonly", "yes", "--appendfsync", "always", port=self.port)
        await wait_until(lambda: listening(self.port), what="redis-server to come back")


@contextlib.asynccontextmanager
async def topology(kind: str, work: Path) -> AsyncIterator[Any]:
    servers = Servers(work)
    made = {"sentinel": SentinelSet, "cluster": ClusterSet, "restart": RestartedServer}[kind](servers)
    try:
        await made.start()
        yield made
    finally:
        servers.stop()


def message_key(message: dict[str, Any]) -> tuple[Any, ...] | None:
    """What is counted of a message about a prompt (None: not counted)."""
    kind, data = message["type"], message["data"]
    if kind == "progress":
        return kind, data.get("node"), data["value"]
    if kind == "executed":
        return kind, data.get("node")
    if kind == "executing" and data.get("node") is None:
        return ("end",)
    if kind == "execution_success":
        return (kind,)
    return None


class SentLog:
    """Every counted message a simulator sent to a socket that was there, per prompt."""

    def __init__(self, sims: list[SimServer]) -> None:
        self.sent: dict[str, Counter[tuple[Any, ...]]] = {}
        for server in sims:
            self._wrap(server.sim.hub)

    def _wrap(self, hub: Any) -> None:
        send = hub.send

        async def recorded(event: str, data: Any, sid: str | None = None) -> None:
            if isinstance(data, dict) and (sid is None or sid in hub.sockets) and "prompt_id" in data:
                key = message_key({"type": event, "data": data})
                if key is not None:
                    self.sent.setdefault(data["prompt_id"], Counter())[key] += 1
            await send(event, data, sid)
        hub.send = recorded


@dataclass
class Figures:
    accepted: int = 0
    completed: int = 0
    errors: int = 0
    lost: int = 0
    miscounted: list[tuple[str, tuple[Any, ...], int, int]] = field(default_factory=list)
    rerun: int = 0
    refused: int = 0
    slowest_refusal_s: float = 0.0
    slowest_answer_s: float = 0.0
    window_s: float | None = None
    not_ready_s: dict[str, float] = field(default_factory=dict)
    sockets_closed: int = 0

    def line(self) -> str:
        return (f"accepted {self.accepted}, completed {self.completed}, errors {self.errors}, lost {self.lost}, "
                f"miscounted messages {len(self.miscounted)}, prompts run again {self.rerun}, "
                f"refused {self.refused} (slowest {self.slowest_refusal_s:.2f} s; slowest answer "
                f"{self.slowest_answer_s:.2f} s), failover window "
                f"{self.window_s if self.window_s is None else round(self.window_s, 2)} s, not ready "
                f"{ {k: round(v, 2) for k, v in self.not_ready_s.items()} }, sockets closed {self.sockets_closed}")


@dataclass
class Load:
    """The clients' side: who posted what, what was refused, when the first prompt got in after the fault."""

    replicas: list[ProxyHandle]
    clients: list[ComfyClient] = field(default_factory=list)
    posters: list[ComfyClient] = field(default_factory=list)
    owner: dict[str, int] = field(default_factory=dict)      # prompt_id → the client it is for
    refusals: list[float] = field(default_factory=list)     # seconds each refused POST took
    answers: list[float] = field(default_factory=list)      # seconds each POST took, whatever the answer
    failed_at: float | None = None
    first_after: float | None = None
    seeds: itertools.count[int] = field(default_factory=itertools.count)

    async def post(self, client: int) -> str:
        """One prompt for `client`, through the other replica; refused ones (503) are posted again."""
        prompt = txt2img(next(self.seeds), steps=STEPS)
        poster = self.posters[client]
        while True:
            started = time.monotonic()
            try:
                status, body = await asyncio.wait_for(
                    poster.post("/prompt", {"prompt": prompt, "client_id": poster.client_id}), 30)
            except (aiohttp.ClientError, TimeoutError):
                status, body = 0, None
            self.answers.append(time.monotonic() - started)
            if status == 200:
                pid = str(body["prompt_id"])
                self.owner[pid] = client
                if self.failed_at is not None and self.first_after is None and started >= self.failed_at:
                    self.first_after = time.monotonic()
                return pid
            # ComfyUI's shape for "not now"; never another answer, nor none within 30 s (status 0)
            assert status == 503, (status, body)
            assert set(body) == {"error", "node_errors"} and body["error"]["type"], body
            self.refusals.append(time.monotonic() - started)
            await asyncio.sleep(0.1)


class Readiness:
    """Each replica's `/proxy/readyz`, polled: how long each was not ready."""

    def __init__(self, replicas: list[ProxyHandle]) -> None:
        self.replicas = replicas
        self.down: dict[str, float] = {h.url: 0.0 for h in replicas}
        self._task: asyncio.Task[None] | None = None

    async def _poll(self) -> None:
        async with aiohttp.ClientSession() as session:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.05)
                now = time.monotonic()
                for handle in self.replicas:
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with session.get(handle.url + "/proxy/readyz",
                                               timeout=aiohttp.ClientTimeout(total=5)) as resp:
                            if resp.status != 200:
                                self.down[handle.url] += now - last
                last = now

    def __enter__(self) -> Readiness:
        self._task = asyncio.create_task(self._poll())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def carry_load(topo: Any, sims: Callable[..., Awaitable[SimServer]], *, during_admission: bool) -> Figures:
    """24 prompts from four clients over two replicas, and `topo.fail` struck once: mid-run (20 posted,
    once `MID_RUN_ENDS` of them have ended; the last four posted after the strike), or after 8 of the 24
    were admitted one by one."""
    prefix = uuid.uuid4().hex[:8]
    backends = [await sims(name, step_ms=STEP_MS) for name in ("alpha", "beta")]
    log = SentLog(backends)
    config = Config(backends=tuple(BackendConfig(name=b.name, url=b.url) for b in backends),
                    store=StoreConfig(redis_url=topo.url, key_prefix=prefix),
                    scheduler=SchedulerConfig(poll_interval_s=0.2))
    replicas = [await start_proxy(create_app(config)) for _ in range(2)]
    load = Load(replicas)
    figures = Figures()
    try:
        async with contextlib.AsyncExitStack() as stack:
            for i in range(CLIENTS):
                client = await stack.enter_async_context(ComfyClient(replicas[i % 2].url))
                await client.connect()
                load.clients.append(client)
                load.posters.append(await stack.enter_async_context(
                    ComfyClient(replicas[(i + 1) % 2].url, client.client_id)))
            with Readiness(replicas) as readiness:
                try:
                    async with asyncio.timeout(STRIKE_S):
                        ids = await _strike(load, topo, prefix, during_admission)
                except TimeoutError:
                    raise AssertionError(f"the load did not get its {PROMPTS} prompts in within {STRIKE_S} s:\n"
                                         + _stacks()) from None
                await asyncio.gather(*(load.clients[load.owner[p]].wait_done(p, timeout=SETTLE_S) for p in ids),
                                     return_exceptions=True)
            figures.not_ready_s = {f"replica {i + 1}": readiness.down[h.url] for i, h in enumerate(replicas)}
            await _count(load, log, ids, figures)
    finally:
        for handle in replicas:
            await asyncio.wait_for(handle.close(), TEARDOWN_S)
    return figures


async def _strike(load: Load, topo: Any, prefix: str, during_admission: bool) -> list[str]:
    per_client = PROMPTS // CLIENTS
    if during_admission:
        async def paced(client: int) -> list[str]:
            ids = []
            for _ in range(per_client):
                ids.append(await load.post(client))
                await asyncio.sleep(0.15)
            return ids
        posting = [asyncio.create_task(paced(i)) for i in range(CLIENTS)]
        await wait_until(lambda: _at_least(load, 8), timeout=30, what="8 prompts admitted")
        load.failed_at = time.monotonic()
        await topo.fail(prefix)
        return [p for ids in await asyncio.gather(*posting) for p in ids]
    ids = [await load.post(i % CLIENTS) for i in range(PROMPTS - CLIENTS)]
    await wait_until(lambda: _ended_at_least(load, MID_RUN_ENDS), timeout=30, what="the run to be under way")
    load.failed_at = time.monotonic()
    await topo.fail(prefix)
    return ids + list(await asyncio.gather(*(load.post(i) for i in range(CLIENTS))))


def _stacks() -> str:
    """Where every task of the loop waits (a test that hangs says where)."""
    lines = []
    for task in asyncio.all_tasks():
        lines.append(f"{task.get_name()}:")
        lines += [f"  {f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}" for f in task.get_stack(limit=8)]
    return "\n".join(lines)


async def _at_least(load: Load, count: int) -> bool:
    return len(load.owner) >= count


async def _ended_at_least(load: Load, count: int) -> bool:
    """The clients have been told `count` ends between them."""
    return sum(1 for c in load.clients for m in c.messages_of_type("executing") if m["data"]["node"] is None) >= count


async def _count(load: Load, log: SentLog, ids: list[str], figures: Figures) -> None:
    figures.accepted = len(ids)
    figures.refused = len(load.refusals)
    figures.slowest_refusal_s = max(load.refusals, default=0.0)
    figures.slowest_answer_s = max(load.answers, default=0.0)
    assert load.failed_at is not None
    figures.window_s = None if load.first_after is None else load.first_after - load.failed_at
    figures.sockets_closed = sum(c.ws is None or c.ws.closed for c in load.clients)
    for pid in ids:
        client = load.clients[load.owner[pid]]
        status, body = await client.get(f"/history/{pid}")
        if status != 200 or pid not in body:
            figures.lost += 1
            continue
        if body[pid]["status"]["status_str"] == "success":
            figures.completed += 1
        else:
            figures.errors += 1
        received = Counter(k for m in client.messages_of(pid) if (k := message_key(m)) is not None)
        sent = log.sent.get(pid, Counter())
        figures.rerun += any(m["type"] == "proxy_retry" for m in client.messages_of(pid))
        figures.miscounted += [(pid, key, sent[key], received[key]) for key in sent.keys() | received.keys()
                               if sent[key] != received[key]]
