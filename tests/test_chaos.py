"""Chaos, CI-sized: three simulated backends and two proxy replicas, each its own process, sharing a
private Redis. The client's socket is on replica 1 and it posts its prompts to replica 2. Then, mid-run:
a backend is SIGKILLed, replica 2 is SIGKILLed, Redis is SIGKILLed and restarted (with its append-only
file; README, "Several replicas", says what a restart without persistence loses).

Every accepted prompt (a 200 from `POST /prompt`) is counted: completed, ended with an error, or lost
(not in history by the deadline), and whether the client's socket was told its end. Lost must be 0, every
end must be told, and with one retry allowed no prompt ends with an error.
The figures are printed (`pytest -s tests/test_chaos.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from proxy.bench.procs import Proc, proxy, sim
from proxy.store import RedisStore
from tests import tools
from tests.client import ComfyClient, txt2img
from tests.conftest import free_port, listening, wait_until

STEP_MS = "25"      # 20 steps: half a second a prompt
DEADLINE_S = 60.0   # for every accepted prompt to end, after each fault


@contextlib.asynccontextmanager
async def _redis(workdir: Path) -> AsyncIterator[tuple[str, Any]]:
    """A redis-server with an fsync-always append-only file; the yielded `restart` SIGKILLs and starts it."""
    binary = tools.tool("redis-server")
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
            "--appendfsync", "always", "--dir", str(workdir)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: ASYNC220

    async def restart() -> None:
        nonlocal process
        process.kill()
        process.wait(timeout=10)
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: ASYNC220
        await wait_until(lambda: listening(port), what="redis-server to come back")

    await wait_until(lambda: listening(port), what="redis-server to listen")
    try:
        yield f"redis://127.0.0.1:{port}/0", restart
    finally:
        process.kill()
        process.wait(timeout=10)


class Tally:
    """Accepted prompts and how each ended, as the client on replica 1 saw it."""

    def __init__(self, watcher: ComfyClient) -> None:
        self.watcher = watcher
        self.accepted: list[str] = []

    async def post(self, poster: ComfyClient, seed: int) -> str | None:
        try:
            status, body = await poster.post("/prompt", {"prompt": txt2img(seed, steps=20),
                                                        "client_id": self.watcher.client_id})
        except aiohttp.ClientError:
            return None   # never accepted: the replica was gone
        if status != 200:
            return None
        self.accepted.append(body["prompt_id"])
        return str(body["prompt_id"])

    async def settle(self, ids: list[str]) -> None:
        await asyncio.gather(*(self.watcher.wait_done(pid, timeout=DEADLINE_S) for pid in ids),
                             return_exceptions=True)

    async def outcome(self, prompt_id: str) -> str:
        """How it ended in the store (history), whatever the socket saw."""
        status, body = await self.watcher.get(f"/history/{prompt_id}")
        if status != 200 or prompt_id not in body:
            return "lost"
        return "completed" if body[prompt_id]["status"]["status_str"] == "success" else "error"

    def told(self, prompt_id: str) -> bool:
        """The client's socket got the prompt's end (`executing` null)."""
        return any(m["type"] == "executing" and m["data"].get("node") is None
                   for m in self.watcher.messages_of(prompt_id))

    async def figures(self, ids: list[str] | None = None) -> dict[str, int]:
        ids = self.accepted if ids is None else ids
        ends = [await self.outcome(pid) for pid in ids]
        return {"accepted": len(ids), "completed": ends.count("completed"), "error": ends.count("error"),
                "lost": ends.count("lost"), "end_not_told": sum(not self.told(pid) for pid in ids)}


async def _running_on(store: RedisStore, ids: list[str]) -> str:
    """The backend one of these prompts is running on, once one is."""
    found: list[str] = []

    async def running() -> bool:
        found[:] = [r.backend for r in await store.get_many(ids) if r.state == "running" and r.backend]
        return bool(found)
    await wait_until(running, timeout=20, what="a prompt running")
    return found[0]


async def test_backend_replica_and_redis_killed_mid_run_lose_nothing(tmp_path: Path) -> None:
    prefix = uuid.uuid4().hex[:8]
    async with _redis(tmp_path) as (redis_url, restart_redis), \
            sim("alpha", "--step-ms", STEP_MS) as alpha, sim("beta", "--step-ms", STEP_MS) as beta, \
            sim("gamma", "--step-ms", STEP_MS) as gamma:
        sims = {"alpha": alpha, "beta": beta, "gamma": gamma}
        config = tmp_path / "proxy.yaml"
        config.write_text(yaml.safe_dump({
            "backends": [{"name": name, "url": p.url, "max_inflight": 1} for name, p in sims.items()],
            "redis": {"url": redis_url}, "store": {"key_prefix": prefix},
            "scheduler": {"poll_interval_s": 0.25, "failover_after_s": 1.0, "retry_max_attempts": 1},
        }))
        store = RedisStore(redis_url, prefix)
        # Replica 2 starts first, so it holds the backends' upstream sockets when it dies.
        async with proxy([], config=str(config)) as two, proxy([], config=str(config)) as one, \
                ComfyClient(one.url) as watcher, ComfyClient(two.url) as poster:
            await watcher.connect()
            tally = Tally(watcher)
            try:
                # 1. A backend dies mid-run: its prompts run elsewhere (the running one once more).
                batch = [pid for i in range(12) if (pid := await tally.post(poster, i))]
                victim = await _running_on(store, batch)
                sims[victim].process.kill()
                await tally.settle(batch)
                assert (await tally.figures(batch))["end_not_told"] == 0, await tally.figures(batch)

                # 2. The replica the prompts were posted to dies mid-run; the socket on replica 1 sees the rest.
                batch = [pid for i in range(12, 18) if (pid := await tally.post(poster, i))]
                await _running_on(store, batch)
                survivors = [f"upstream:{name}" for name in sims if name != victim]
                before = await store.lease_holders()
                _kill(two)
                await tally.settle(batch)
                # An end replica 2 recorded but died before publishing is announced by the replica that takes
                # its sockets over (proxy.relay.announce).
                assert (await tally.figures(batch))["end_not_told"] == 0, await tally.figures(batch)
                dead = {before[n] for n in survivors if n in before}   # replica 2 held the sockets it started with

                async def taken_over() -> bool:
                    after = await store.lease_holders()
                    alive = {name.removeprefix("replica:") for name in after if name.startswith("replica:")}
                    return not dead & alive and all(after.get(n) in alive for n in survivors)
                await wait_until(taken_over, timeout=30, what="the surviving replica to hold every socket")

                # 3. Redis dies and comes back mid-run.
                batch = [pid for i in range(18, 24) if (pid := await tally.post(watcher, i))]
                await _running_on(store, batch)
                await restart_redis()
                await tally.settle(batch)
                assert (await tally.figures(batch))["end_not_told"] == 0, await tally.figures(batch)
                figures = await tally.figures()
            finally:
                await store.close()
    print(f"\nchaos figures: {figures}")
    assert figures["accepted"] == 24 and figures["lost"] == 0 and figures["error"] == 0, figures
    assert figures["completed"] == 24


def _kill(replica: Proc) -> None:
    replica.process.kill()
    replica.process.wait(timeout=10)

