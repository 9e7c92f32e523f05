"""A store wrapper that times every operation into `comfy_proxy_store_operation_seconds{op}`, so both
implementations are measured the same way without either knowing about metrics."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import Histogram


class InstrumentedStore:
    def __init__(self, inner: Any, histogram: Histogram) -> None:
        self._inner = inner
        self._histogram = histogram
        self._wrapped: dict[str, Callable[..., Awaitable[Any]]] = {}

    def __getattr__(self, name: str) -> Any:
        wrapped = self._wrapped.get(name)
        if wrapped is not None:
            return wrapped
        target = getattr(self._inner, name)
        if name.startswith("_") or not callable(target):
            return target
        child = self._histogram.labels(name)

        async def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await target(*args, **kwargs)
            finally:
                child.observe(time.perf_counter() - start)

        self._wrapped[name] = timed
        return timed
