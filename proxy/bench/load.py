"""Load generation with a pooled aiohttp client: N concurrent workers for a fixed time, or a fixed
number of sequential requests at one connection for latency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def session(connections: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections, force_close=False),
                                 auto_decompress=False)


async def timed(call: Callable[[], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    await call()
    return time.perf_counter() - start


async def for_duration(worker: Callable[[], Awaitable[int]], connections: int, seconds: float
                       ) -> tuple[int, int, float]:
    """Run `worker` in `connections` loops for `seconds`; returns (requests, bytes, elapsed)."""
    count = 0
    nbytes = 0
    deadline = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal count, nbytes
        while time.perf_counter() < deadline:
            nbytes += await worker()
            count += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(connections)))
    return count, nbytes, time.perf_counter() - start


async def get_body(s: aiohttp.ClientSession, url: str, params: dict[str, str] | None = None) -> int:
    async with s.get(url, params=params) as resp:
        n = 0
        async for chunk in resp.content.iter_chunked(1 << 16):
            n += len(chunk)
        if resp.status != 200:
            raise RuntimeError(f"GET {url} answered {resp.status}")
        return n
