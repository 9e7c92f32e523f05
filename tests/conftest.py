"""Real parts for every test: simulated ComfyUI servers, a real proxy on loopback, a real redis-server
started on a free port for the test session (never the machine's shared one), each test under its own
key prefix."""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from proxy.config import (
    AuthConfig,
    BackendConfig,
    Config,
    DiscoveryConfig,
    DnsConfig,
    OutputsConfig,
    SchedulerConfig,
    StoreConfig,
    TenantConfig,
    WebhooksConfig,
    WorkflowsConfig,
)
from proxy.store import MemoryStore, RedisStore, Store
from tests import tools

TRACES = Path(__file__).parent / "traces"
TEARDOWN_S = 15

# `outputs.store: dir` defaults to $XDG_DATA_HOME/comfy-proxy: every proxy of this run (in process or a
# child process) keeps its copies under a folder of its own, removed at exit, never the user's data folder.
_DATA_HOME = tempfile.mkdtemp(prefix="comfy-proxy-tests-")
os.environ["XDG_DATA_HOME"] = _DATA_HOME
atexit.register(shutil.rmtree, _DATA_HOME, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = tools.tool("redis-server")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's standalone S3 server, one for the session; each test uses buckets of its own."""
    from tests.s3 import moto_server
    with moto_server() as url:
        yield url


@pytest.fixture(params=["memory", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_config(store_kind: str, request: pytest.FixtureRequest) -> StoreConfig:
    if store_kind == "memory":
        return StoreConfig()
    url = request.getfixturevalue("redis_url")
    return StoreConfig(redis_url=url, key_prefix=f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture
async def make_store(store_config: StoreConfig) -> AsyncIterator[Callable[[], Store]]:
    """Stores over the same state: a memory store is shared as is, Redis stores share the prefix."""
    made: list[Store] = []
    shared: MemoryStore | None = None

    def make() -> Store:
        nonlocal shared
        if store_config.redis_url is None:
            shared = shared or MemoryStore(store_config.finished_ttl_s)
            return shared
        s = RedisStore(store_config.redis_url, store_config.key_prefix, store_config.finished_ttl_s)
        made.append(s)
        return s

    yield make
    for s in made:
        await asyncio.wait_for(s.close(), TEARDOWN_S)


@pytest.fixture
async def sims() -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    from proxy.sim import SimOptions, start_sim

    started: list[Any] = []

    async def start(name: str = "sim", **options: Any) -> Any:
        options.setdefault("step_ms", 5)
        options.setdefault("model_load_ms", 20)
        server = await start_sim(SimOptions(name=name, **{"port": 0, **options}))
        started.append(server)
        return server

    yield start
    for server in started:
        await asyncio.wait_for(server.close(), TEARDOWN_S)


@pytest.fixture
async def proxies(store_config: StoreConfig, tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """Proxies that open their own store from the config: with Redis, several proxies in one test are
    replicas sharing state; in memory, each is alone, as an in-process store is. The proxies of one test
    share a file store folder (outputs and uploads), which no other test sees."""
    from proxy.app import create_app
    from tests.client import start_proxy

    started: list[Any] = []

    async def start(backends: list[Any], *, tenants: tuple[TenantConfig, ...] = (), auth: AuthConfig | None = None,
                    labels: dict[str, tuple[str, ...]] | None = None, outputs: OutputsConfig | None = None,
                    webhooks: WebhooksConfig | None = None, dns: DnsConfig | None = None,
                    discovery: DiscoveryConfig | None = None, workflows: WorkflowsConfig | None = None,
                    **scheduler: Any) -> Any:
        config = Config(
            backends=tuple(BackendConfig(name=b.name, url=b.url, max_inflight=2,
                                         labels=(labels or {}).get(b.name, ())) for b in backends),
            store=store_config,
            scheduler=SchedulerConfig(poll_interval_s=0.2, **scheduler),
            tenants=tenants,
            auth=auth or AuthConfig(required=bool(tenants)),
            outputs=outputs or OutputsConfig(dir=str(tmp_path / "file-store")),
            webhooks=webhooks or WebhooksConfig(),
            dns=dns or DnsConfig(),
            discovery=discovery or DiscoveryConfig(),
            workflows=workflows or WorkflowsConfig(),
        )
        handle = await start_proxy(create_app(config))
        started.append(handle)
        return handle

    yield start
    for handle in started:
        await asyncio.wait_for(handle.close(), TEARDOWN_S)


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "") -> None:
    """Poll a condition with a deadline (for state that has no event to wait on)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.02)


async def serving(url: str, timeout: float = 30.0, what: str = "the proxy process") -> None:
    """Until a proxy started as a process at `url` answers its readiness probe with 200."""
    async def ready() -> bool:
        try:
            async with aiohttp.ClientSession() as s, s.get(url + "/proxy/readyz") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False
    await wait_until(ready, timeout=timeout, what=what)


async def listening(port: int) -> bool:
    """Whether something accepts connections on this loopback port (a server started as a process)."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True
