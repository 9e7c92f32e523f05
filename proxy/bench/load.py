"""Load generation with a pooled aiohttp client: N concurrent workers for a fixed time, or a fixed
number of sequential requests at one connection for latency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp

T = TypeVar("T")


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


async def open_many(open_one: Callable[[], Awaitable[T]], target: int, kind: type[T],
                    params: dict[str, Any], batch: int = 250) -> list[T]:
    """Open `target` connections `batch` at a time; stops at the first batch with a failure, whose first
    error goes to `params["first_error"]`."""
    opened: list[T] = []
    while len(opened) < target:
        got = await asyncio.gather(*(open_one() for _ in range(min(batch, target - len(opened)))),
                                   return_exceptions=True)
        ok = [c for c in got if isinstance(c, kind)]
        opened.extend(ok)
        if len(ok) < len(got):
            params["first_error"] = repr(next(e for e in got if isinstance(e, BaseException)))
            break
    return opened
