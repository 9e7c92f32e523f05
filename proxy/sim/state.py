"""One simulator's state, built once per application and reached by handlers through `SIM`."""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from proxy.sim import nodes
from proxy.sim.executor import Executor
from proxy.sim.faults import Faults
from proxy.sim.files import SimPaths
from proxy.sim.gpu import SimGpu
from proxy.sim.hub import SocketHub
from proxy.sim.logs import SimLog
from proxy.sim.options import SimOptions
from proxy.sim.prompt_queue import PromptQueue


@dataclass(eq=False)
class Sim:
    options: SimOptions
    paths: SimPaths
    hub: SocketHub
    gpu: SimGpu
    faults: Faults
    queue: PromptQueue = field(init=False)
    log: SimLog = field(init=False)
    executor: Executor = field(init=False)
    number: int = 0  # server.py's `self.number`: the next queue number
    accepted: int = 0  # prompts POST /prompt queued (a simulator-only count, for /sim/stats)
    polled: int = 0    # GET /system_stats, /prompt and /object_info answered: what a poller costs it
    port: int | None = None  # the bound port, once known
    users: dict[str, str] = field(default_factory=lambda: {"default": "default"})
    dead: bool = False
    transports: weakref.WeakSet[asyncio.Transport] = field(default_factory=weakref.WeakSet)
    stop_listening: Callable[[], Awaitable[None]] | None = None  # set by start_sim; /sim/die uses it
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _object_info: tuple[int | None, dict[str, dict[str, Any]]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.queue = PromptQueue(self.queue_updated)
        self.log = SimLog(self.hub)
        self.executor = Executor(options=self.options, paths=self.paths, gpu=self.gpu, hub=self.hub,
                                 faults=self.faults, object_info=self.object_info)

    @classmethod
    def create(cls, options: SimOptions) -> Sim:
        return cls(options, SimPaths.create(options.base_dir), SocketHub(options.max_upload_mb * 1024 * 1024),
                   SimGpu.with_vram(options.name, options.vram_gb), Faults())

    def object_info(self) -> dict[str, dict[str, Any]]:
        """ComfyUI computes it on each call; only LoadImage's file list can change, so it is computed
        again when `input/` changed (its mtime) and shared otherwise. Callers only read it."""
        try:
            key: int | None = os.stat(self.paths.input).st_mtime_ns
        except FileNotFoundError:
            key = None
        if self._object_info is None or self._object_info[0] != key:
            self._object_info = (key, nodes.object_info(self.options, self.paths.input))
        return self._object_info[1]

    def queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self.queue.tasks_remaining()}}

    def queue_updated(self) -> None:
        self.hub.send_sync("status", {"status": self.queue_info()})


SIM = web.AppKey("sim", Sim)
