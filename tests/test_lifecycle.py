"""The proxy's start and stop as one lifecycle (`proxy.lifecycle`): a failure injected at each start step
and at each stop step leaves no task, socket, child process or Redis connection behind, and every other
part is still closed."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import structlog
import structlog.testing
from aiohttp import web

from proxy.app import create_app
from proxy.config import BackendConfig, Config, SchedulerConfig, StoreConfig
from proxy.lifecycle import Lifecycle, Step
from tests.conftest import wait_until

# Every part the proxy starts, in order, and whether it has a close to run.
STEPS: list[tuple[str, bool]] = [
    ("store", True), ("session", True), ("uploads-folder", True), ("files", True), ("output-keeper", True),
    ("webhooks", True), ("images", True), ("bus", True), ("farm", True),
    ("upstreams", True), ("upstreams-connected", False), ("dispatcher", True), ("client-sockets", True),
    ("reloader", True), ("membership", True), ("discovery", True),
    ("sampler", True),
]
NAMES = [name for name, _ in STEPS]
CLOSING = [name for name, closes in STEPS if closes]


class Injected(RuntimeError):
    """The failure a test puts into one step."""


def then_raise(step: Step | None, name: str) -> Callable[[], Awaitable[None]]:
    """The step as it is, then a failure: the worst moment, when all of its work is running."""
    async def run() -> None:
        if step is not None:
            result = step()
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                await result
        raise Injected(name)
    return run


def inject(monkeypatch: pytest.MonkeyPatch, step: str | None, phase: str) -> list[Lifecycle]:
    """Make `step` fail at `phase` ("start" or "close"); the lifecycles made meanwhile are returned."""
    real = Lifecycle.part
    seen: list[Lifecycle] = []

    async def part(self: Lifecycle, name: str, start: Step | None = None, close: Step | None = None) -> None:
        if self not in seen:
            seen.append(self)
        if name == step and phase == "start":
            start = then_raise(start, name)
        if name == step and phase == "close":
            close = then_raise(close, name)
        await real(self, name, start, close)

    monkeypatch.setattr(Lifecycle, "part", part)
    return seen


def sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:   # closed while we looked
            continue
    return count


def children() -> set[int]:
    found: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        found |= {int(pid) for pid in (task / "children").read_text().split()}
    return found


class Leftovers:
    """What the process holds before the proxy starts, to hold it to the same after the proxy stops."""

    def __init__(self, store: StoreConfig) -> None:
        self.redis = redis.Redis.from_url(store.redis_url) if store.redis_url else None
        self.redis_clients = self._redis_clients()   # first: it opens this test's own connection
        self.tasks = set(asyncio.all_tasks())
        self.sockets = sockets()
        self.children = children()

    def _redis_clients(self) -> int:
        return len(self.redis.client_list()) if self.redis is not None else 0

    def problems(self) -> list[str]:
        found = []
        tasks = [t for t in asyncio.all_tasks() if t not in self.tasks and not t.done()]
        if tasks:
            found.append(f"tasks: {sorted(t.get_name() for t in tasks)}")
        if sockets() > self.sockets:
            found.append(f"sockets: {sockets()} > {self.sockets}")
        if children() - self.children:
            found.append(f"child processes: {children() - self.children}")
        if self._redis_clients() > self.redis_clients:
            found.append(f"redis connections: {self._redis_clients()} > {self.redis_clients}")
        return found

    async def assert_none(self) -> None:
        async def clean() -> bool:
            return not self.problems()
        try:
            await wait_until(clean, timeout=10, what="the proxy's resources to be released")
        except AssertionError:
            raise AssertionError(f"left behind: {self.problems()}") from None
        finally:
            if self.redis is not None:
                self.redis.close()


async def proxy_with_fault(monkeypatch: pytest.MonkeyPatch, sims: Callable[..., Awaitable[Any]],
                           store: StoreConfig, step: str | None,
                           phase: str) -> tuple[web.AppRunner, list[Lifecycle], Leftovers]:
    """A proxy in front of one simulator, not started yet, whose `step` will fail at `phase`; the lifecycles
    it makes, and what the process held before it."""
    sim = await sims("alpha")
    config = Config(backends=(BackendConfig(name="alpha", url=sim.url),), store=store,
                    scheduler=SchedulerConfig(poll_interval_s=0.2))
    left = Leftovers(store)
    lives = inject(monkeypatch, step, phase)
    return web.AppRunner(create_app(config)), lives, left


async def test_a_normal_start_and_stop_runs_every_part_and_closes_them_in_reverse(
        monkeypatch: pytest.MonkeyPatch, sims: Any, store_config: StoreConfig) -> None:
    runner, lives, left = await proxy_with_fault(monkeypatch, sims, store_config, None, "start")
    await runner.setup()
    assert lives[0].started == NAMES
    await runner.cleanup()
    assert lives[0].closed == CLOSING[::-1]
    await left.assert_none()


@pytest.mark.parametrize("step", NAMES)
async def test_a_part_that_fails_to_start_leaves_nothing_running(
        step: str, monkeypatch: pytest.MonkeyPatch, sims: Any, store_config: StoreConfig) -> None:
    runner, lives, left = await proxy_with_fault(monkeypatch, sims, store_config, step, "start")
    with pytest.raises(Injected, match=step):
        await runner.setup()
    await runner.cleanup()
    upto = NAMES[:NAMES.index(step) + 1]
    assert lives[0].started == upto[:-1]
    assert lives[0].closed == [name for name in CLOSING if name in upto][::-1]
    await left.assert_none()


@pytest.mark.parametrize("step", CLOSING)
async def test_a_close_that_raises_is_logged_and_every_other_part_still_closes(
        step: str, monkeypatch: pytest.MonkeyPatch, sims: Any, store_config: StoreConfig) -> None:
    runner, lives, left = await proxy_with_fault(monkeypatch, sims, store_config, step, "close")
    await runner.setup()
    with structlog.testing.capture_logs() as logs:
        await runner.cleanup()
    assert lives[0].closed == CLOSING[::-1]
    assert [entry["part"] for entry in logs if entry["event"] == "part_close_failed"] == [step]
    await left.assert_none()


def test_lifecycle_parts_close_in_reverse_even_when_one_close_raises() -> None:
    order: list[str] = []

    async def scenario() -> None:
        async with Lifecycle() as life:
            await life.part("a", close=lambda: order.append("a"))
            await life.part("b", close=then_raise(None, "b"))
            await life.part("c", close=lambda: order.append("c"))
        assert life.closed == ["c", "b", "a"]

    asyncio.run(scenario())
    assert order == ["c", "a"]
