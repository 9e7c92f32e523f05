"""Backend health beyond the poll: the circuit breaker's and outlier ejection's transitions (pure, with
explicit times), then both end to end — a backend whose dispatches fail, one whose prompts keep failing —
against a real proxy and simulators, seen through /proxy/backends and /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.config import BackendConfig, Config, ConfigError, HealthConfig, SchedulerConfig, StoreConfig, parse_config
from proxy.health import CLOSED, HALF_OPEN, OPEN, Backoff, CircuitBreaker, OutlierDetector
from proxy.relay.router import EventRouter
from tests.client import ComfyClient, start_proxy, txt2img
from tests.conftest import TEARDOWN_S, free_port, wait_until


def breaker(threshold: int = 3, base: float = 1.0, cap: float = 8.0) -> CircuitBreaker:
    return CircuitBreaker(threshold, Backoff(base, cap))


# --- the circuit breaker -------------------------------------------------------------------------------
def test_opens_after_consecutive_failures_only() -> None:
    b = breaker()
    b.failure(0)
    b.failure(1)
    b.success(2)          # a request that worked: the failures were not consecutive
    b.failure(3)
    b.failure(4)
    assert b.current(4) == CLOSED and b.allows
    b.failure(5)
    assert b.current(5) == OPEN and not b.allows
    assert b.retry_at == 6.0


def test_half_open_probe_closes_or_reopens_with_a_doubled_wait() -> None:
    b = breaker(threshold=1, base=1.0, cap=8.0)
    b.failure(0)
    assert b.current(0.5) == OPEN
    b.probe(True, 0.5)            # a poll while open decides nothing
    assert b.current(0.5) == OPEN
    assert b.current(1.0) == HALF_OPEN and not b.allows
    b.probe(False, 1.0)           # the probe failed: open again, twice as long
    assert b.current(1.0) == OPEN and b.retry_at == 3.0
    b.failure(3.0)                # a failed request while half-open re-opens as well
    assert b.retry_at == 7.0
    b.probe(False, 7.0)
    assert b.retry_at == 7.0 + 8.0
    b.probe(False, 15.0)
    assert b.retry_at == 15.0 + 8.0   # capped
    b.probe(True, 23.0)
    assert b.current(23.0) == CLOSED and b.allows and b.failures == 0


def test_backoff_starts_small_again_after_a_quiet_period() -> None:
    b = breaker(threshold=1, base=1.0, cap=8.0)
    b.failure(0)
    b.probe(False, 1)             # waits 1, then 2
    b.probe(True, 3)              # closed at 3
    b.failure(5)                  # soon after: the wait keeps growing (4)
    assert b.retry_at == 9
    b.probe(True, 9)
    b.failure(9 + 8)              # closed for the cap: back to the first wait
    assert b.retry_at == 17 + 1


# --- outlier ejection -----------------------------------------------------------------------------------
def detector(names: list[str], **config: Any) -> OutlierDetector:
    d = OutlierDetector(HealthConfig(**{"outlier_errors": 3, "ejection_s": 10.0, "ejection_max_s": 40.0,
                                        **config}))
    for name in names:
        d.add(name)
    return d


def test_ejected_only_while_others_succeed() -> None:
    d = detector(["a", "b"])
    assert not any(d.outcome("a", "error", t) for t in (1, 2, 3))  # nobody succeeded meanwhile
    d.outcome("b", "success", 3.5)
    assert d.outcome("a", "error", 4)                                # b succeeds, a still fails
    assert d.ejected_until("a", 5) == 14.0 and d.ejected_until("b", 5) is None
    assert d.ejected_until("a", 14.0) is None                        # back after the ejection time


def test_interruptions_and_successes_break_or_skip_the_streak() -> None:
    d = detector(["a", "b"])
    d.outcome("b", "success", 0)
    d.outcome("a", "error", 1)
    d.outcome("a", "interrupted", 2)
    d.outcome("a", "error", 3)
    d.outcome("a", "success", 4)
    d.outcome("b", "success", 4.5)
    assert not d.outcome("a", "error", 5) and not d.outcome("a", "error", 6)
    assert d.outcome("a", "error", 7)


def test_ejection_time_grows_and_is_capped_then_resets() -> None:
    d = detector(["a", "b"], outlier_errors=1)
    waits = []
    now = 0.0
    for _ in range(4):
        d.outcome("b", "success", now)
        assert d.outcome("a", "error", now + 0.1)
        until = d.ejected_until("a", now + 0.1)
        assert until is not None
        waits.append(round(until - (now + 0.1), 3))
        now = until + 1               # comes back, fails again soon
    assert waits == [10.0, 20.0, 40.0, 40.0]
    now += 40                         # a quiet cap later the ejection is short again
    d.outcome("b", "success", now)
    assert d.outcome("a", "error", now + 0.1)
    assert d.ejected_until("a", now + 0.1) == pytest.approx(now + 0.1 + 10.0)


def test_never_more_than_the_fraction_of_the_farm() -> None:
    d = detector(["a", "b", "c", "e"], outlier_errors=1, max_ejected_fraction=0.5)
    d.outcome("e", "success", 0)
    assert d.outcome("a", "error", 1) and d.outcome("b", "error", 2)
    assert not d.outcome("c", "error", 3)              # a third of four would pass half the farm
    assert d.ejected_count(3) == 2
    single = detector(["only"], outlier_errors=1)
    assert not single.outcome("only", "error", 1)      # a farm of one is never ejected


def test_health_config_is_validated_with_key_paths() -> None:
    assert parse_config({"health": {"failure_threshold": 5}}).health.failure_threshold == 5
    with pytest.raises(ConfigError) as exc:
        parse_config({"health": {"failure_threshold": 0, "max_ejected_fraction": 1.5, "open_s": 10,
                                 "open_max_s": 5, "bogus": 1}})
    problems = exc.value.problems
    assert "health.failure_threshold: must be > 0" in problems
    assert "health.max_ejected_fraction: must be at least 0 and below 1" in problems
    assert "health.open_max_s: must be >= health.open_s" in problems
    assert "health.bogus: unknown key" in problems


# --- end to end -----------------------------------------------------------------------------------------
class _Switch:
    """A simulator with a middleware in front that answers POST /prompt with 503 while `failing`:
    its polls succeed, its dispatches fail (the case the poll alone cannot see)."""

    def __init__(self) -> None:
        self.failing = False
        self.prompts = 0

    @web.middleware
    async def middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
        if request.method == "POST" and request.path == "/prompt":
            self.prompts += 1
            if self.failing:
                return web.Response(status=503)
        return await handler(request)


@pytest.fixture
async def switched_sim() -> AsyncIterator[tuple[Any, _Switch]]:
    from proxy.sim import SimOptions, create_sim_app

    switch = _Switch()
    app = create_sim_app(SimOptions(name="alpha", step_ms=2, model_load_ms=5))
    app.middlewares.insert(0, switch.middleware)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()

    class Handle:
        name, url = "alpha", f"http://127.0.0.1:{port}"
    yield Handle(), switch
    await asyncio.wait_for(runner.cleanup(), TEARDOWN_S)


async def _proxy(backends: list[Any], store_config: StoreConfig, health: HealthConfig) -> Any:
    config = Config(backends=tuple(BackendConfig(name=b.name, url=b.url, max_inflight=2) for b in backends),
                    store=store_config, scheduler=SchedulerConfig(poll_interval_s=0.1), health=health)
    return await start_proxy(create_app(config))


def _backend(body: dict[str, Any], name: str) -> dict[str, Any]:
    return next(b for b in body["backends"] if b["name"] == name)


def _gauge(metrics: str, line_start: str) -> float:
    return float(next(line for line in metrics.splitlines() if line.startswith(line_start)).split()[-1])


async def test_failing_dispatches_open_the_circuit_then_a_probe_closes_it(
        switched_sim, sims, store_config: StoreConfig) -> None:
    alpha, switch = switched_sim
    beta = await sims("beta")
    handle = await _proxy([alpha, beta], store_config, HealthConfig(failure_threshold=2, open_s=0.5, open_max_s=2))
    try:
        async with ComfyClient(handle.url) as client:
            await client.connect()
            switch.failing = True
            ids = [await client.queue_prompt(txt2img(seed=i, steps=2)) for i in range(8)]

            async def alpha_open() -> bool:
                return _backend((await client.get("/proxy/backends"))[1], "alpha")["circuit"] in (OPEN, HALF_OPEN)
            await wait_until(alpha_open, what="alpha's circuit to open")
            status, metrics = await client.get("/metrics")
            assert _gauge(metrics, 'comfy_proxy_backend_circuit_state{backend="alpha",state="closed"}') == 0
            await asyncio.gather(*(client.wait_done(pid) for pid in ids))
            records = await handle.services.store.get_many(ids)
            assert all(r.outcome == "success" and r.backend == "beta" for r in records)
            tried = switch.prompts
            assert tried >= 2
            switch.failing = False

            async def alpha_closed() -> bool:
                return _backend((await client.get("/proxy/backends"))[1], "alpha")["circuit"] == CLOSED
            await wait_until(alpha_closed, what="the half-open probe to close alpha's circuit")
            more = [await client.queue_prompt(txt2img(seed=100 + i, steps=2)) for i in range(6)]
            await asyncio.gather(*(client.wait_done(pid) for pid in more))
            assert "alpha" in {r.backend for r in await handle.services.store.get_many(more)}
            metrics = (await client.get("/metrics"))[1]
            assert _gauge(metrics, 'comfy_proxy_backend_circuit_state{backend="alpha",state="closed"}') == 1
    finally:
        await asyncio.wait_for(handle.close(), TEARDOWN_S)


async def test_backend_whose_prompts_keep_failing_is_ejected(sims, store_config: StoreConfig) -> None:
    alpha, beta = await sims("alpha", step_ms=10), await sims("beta", step_ms=10)
    handle = await _proxy([alpha, beta], store_config, HealthConfig(outlier_errors=2, ejection_s=30))
    try:
        async with ComfyClient(handle.url) as client:
            await client.connect()
            # Failing after sampling, so alpha stays busy long enough for beta to get prompts too.
            assert await client.post_to(alpha.url, "/sim/faults", {"error_at_node": "VAEDecode"}) == 200

            async def ejected() -> bool:
                # Four at a time, so both backends run some: alpha's errors while beta succeeds.
                batch = [await client.queue_prompt(txt2img(seed=len(client.frames) + i, steps=8)) for i in range(4)]
                await asyncio.gather(*(client.wait_done(pid) for pid in batch))
                return bool(_backend((await client.get("/proxy/backends"))[1], "alpha")["ejected"])
            await wait_until(ejected, timeout=20, what="alpha's ejection")
            state = _backend((await client.get("/proxy/backends"))[1], "alpha")
            assert state["available"] is False and 0 < state["ejected_for_s"] <= 30
            assert _gauge((await client.get("/metrics"))[1], 'comfy_proxy_backend_ejected{backend="alpha"}') == 1
            after = [await client.queue_prompt(txt2img(seed=500 + i, steps=2)) for i in range(4)]
            await asyncio.gather(*(client.wait_done(pid) for pid in after))
            records = await handle.services.store.get_many(after)
            assert all(r.backend == "beta" and r.outcome == "success" for r in records)
    finally:
        await asyncio.wait_for(handle.close(), TEARDOWN_S)


async def test_a_backends_queue_count_comes_from_its_socket_not_from_polls(sims) -> None:
    """Polled every 30 s here, yet the count of prompts another client queued straight at the backend shows
    at once: ComfyUI's `status` frames on the proxy's own socket carry it, and `/prompt` is not polled."""
    sim = await sims("alpha", step_ms=100)
    handle = await start_proxy(create_app(Config(backends=(BackendConfig(name="alpha", url=sim.url),),
                                                 scheduler=SchedulerConfig(poll_interval_s=30.0))))
    try:
        async with ComfyClient(handle.url) as client, ComfyClient(sim.url) as direct:
            async def queue_is(n: int) -> bool:
                return (await client.get("/proxy/backends"))[1]["backends"][0]["queue_remaining"] == n
            await wait_until(lambda: queue_is(0), what="the backend polled once")
            polls = sim.sim.polled
            for seed in range(3):
                await direct.queue_prompt(txt2img(seed=seed, steps=20))
            await wait_until(lambda: queue_is(3), timeout=5, what="three prompts counted from the socket")
            await wait_until(lambda: queue_is(0), timeout=30, what="the queue run down, counted likewise")
            assert sim.sim.polled == polls   # no poll told it
    finally:
        await asyncio.wait_for(handle.close(), TEARDOWN_S)


async def test_a_frame_that_breaks_its_handler_is_dropped_and_the_frames_after_it_still_flow(
        sims, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in one handler must not leave the backend connected and deaf (every later end lost)."""
    real = EventRouter.on_text
    broken: list[str] = []

    async def once_broken(self: EventRouter, backend: str, raw: str) -> None:
        if '"execution_start"' in raw and not broken:
            broken.append(raw)
            raise RuntimeError("a handler's bug")
        await real(self, backend, raw)
    monkeypatch.setattr(EventRouter, "on_text", once_broken)
    sim = await sims("alpha")
    handle = await start_proxy(create_app(Config(backends=(BackendConfig(name="alpha", url=sim.url),),
                                                 scheduler=SchedulerConfig(poll_interval_s=0.2))))
    try:
        async with ComfyClient(handle.url) as client:
            await client.connect()
            for seed in range(2):
                pid = await client.queue_prompt(txt2img(seed=seed))
                await client.wait_done(pid)
                assert (await client.get(f"/history/{pid}"))[1][pid]["status"]["status_str"] == "success"
        assert len(broken) == 1
    finally:
        await asyncio.wait_for(handle.close(), TEARDOWN_S)
