"""Session fixtures of the conformance tier: two real ComfyUI backends and a proxy in front of them (once
with the in-process store, once with Redis). The tier skips, saying why, where setup_comfyui.sh could
not install ComfyUI."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.real.harness import Process, start_comfyui, start_proxy, unavailable_reason


@dataclass
class Farm:
    """What a test talks to: each backend directly, and the proxy in front of both."""

    a: Process
    b: Process
    proxy: Process
    store_kind: str

    @property
    def backends(self) -> dict[str, Process]:
        return {self.a.name: self.a, self.b.name: self.b}


@pytest.fixture(scope="session")
def real_backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, Process]]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    started = [start_comfyui(name, tmp_path_factory.mktemp(name)) for name in ("real-a", "real-b")]
    try:
        for p in started:
            p.wait_ready("/system_stats")
        yield started[0], started[1]
    finally:
        for p in started:
            p.stop()


@pytest.fixture(scope="session", params=["memory", "redis"])
def farm(request: pytest.FixtureRequest, real_backends: tuple[Process, Process],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    a, b = real_backends
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    proxy = start_proxy([a, b], tmp_path_factory.mktemp(f"proxy-{request.param}"), redis_url)
    try:
        proxy.wait_ready("/proxy/healthz")
        _wait_backends_available(proxy, {a.name, b.name})
        yield Farm(a, b, proxy, request.param)
    finally:
        proxy.stop()


def _wait_backends_available(proxy: Process, names: set[str], timeout: float = 30.0) -> None:
    """The proxy dispatches only to backends its poller has seen: wait until both are available."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(proxy.url + "/proxy/readyz", timeout=2) as r:
                if names <= set(json.loads(r.read())["backends_available"]):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the proxy never saw {sorted(names)} available:\n{proxy.log_tail()}")
        time.sleep(0.1)
