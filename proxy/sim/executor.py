"""Runs one prompt the way ComfyUI 0.3.75's PromptExecutor does, message for message.

Order (traces/run_normal.json, run_cached.json, run_error.json, queue_interrupt.json):
`execution_start`, `execution_cached`, then per node `progress_state` (running) → `executing` →
[per sampler step: `progress_state`, (type-4 preview), `progress`, (type-1 preview)] → [`executed`] →
`progress_state` (finished); then `execution_success`, or `execution_error` / `execution_interrupted`.
The worker adds `status` and `executing` {node: null} afterwards.

Routing (execution.py, main.py, progress.py): messages go to the prompt's `client_id`. A prompt without
one sends `progress_state`, `progress`, previews and `execution_interrupted` to every socket (`sid=None`)
and the rest to nobody — including `executing` {node: null}, which ComfyUI sends only with a client_id.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.comfy import frames
from proxy.comfy.validation import is_link
from proxy.sim import runtime
from proxy.sim.cache import CacheEntry, OutputCache
from proxy.sim.faults import Faults
from proxy.sim.files import SimPaths, file_sha256
from proxy.sim.gpu import SimGpu
from proxy.sim.graph import ExecutionList
from proxy.sim.hub import SocketHub
from proxy.sim.options import SimOptions
from proxy.sim.progress import ProgressRegistry


class Interrupted(Exception):
    """ComfyUI's InterruptProcessingException."""


@dataclass
class WorkDone:
    """What the simulated GPU has done since start: the truth a benchmark compares schedulers on."""

    prompts: int = 0
    busy_s: float = 0.0          # wall time inside prompts (execution_start to the end), loads included
    load_s: float = 0.0          # of that, time spent loading checkpoints
    sampling_steps: int = 0


@dataclass
class _Run:
    """State of one prompt's execution."""
    prompt: dict[str, Any]
    prompt_id: str
    extra_data: dict[str, Any]
    info: dict[str, dict[str, Any]]
    progress: ProgressRegistry
    executed: set[str] = field(default_factory=set)
    ui_outputs: dict[str, dict[str, Any]] = field(default_factory=dict)


def _ms() -> int:
    return int(time.time() * 1000)


def _format_value(x: Any) -> Any:
    return x if x is None or isinstance(x, int | float | bool | str) else str(x)


class Executor:
    def __init__(self, *, options: SimOptions, paths: SimPaths, gpu: SimGpu, hub: SocketHub, faults: Faults,
                 object_info: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.options, self.paths, self.gpu, self.hub, self.faults = options, paths, gpu, hub, faults
        self._object_info = object_info
        self.cache = OutputCache()
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.interrupt_requested = False
        self.success = True
        self.status_messages: list[tuple[str, dict[str, Any]]] = []
        self.history_result: dict[str, Any] = {"outputs": {}, "meta": {}}
        self.work = WorkDone()

    def reset(self) -> None:
        """`POST /free` with free_memory: ComfyUI drops its caches."""
        self.cache.reset()
        self.objects.clear()

    def interrupt(self) -> None:
        self.interrupt_requested = True

    def _check_interrupt(self) -> None:
        if self.interrupt_requested:
            self.interrupt_requested = False
            raise Interrupted("Processing interrupted")

    def _add_message(self, event: str, data: dict[str, Any], broadcast: bool) -> None:
        data = {**data, "timestamp": _ms()}
        self.status_messages.append((event, data))
        if self.client_id is not None or broadcast:
            self.hub.send_sync(event, data, self.client_id)

    async def execute(self, prompt: dict[str, Any], prompt_id: str, extra_data: dict[str, Any],
                      execute_outputs: list[str]) -> None:
        began = time.monotonic()
        try:
            await self._execute(prompt, prompt_id, extra_data, execute_outputs)
        finally:
            self.work.prompts += 1
            self.work.busy_s += time.monotonic() - began

    async def _execute(self, prompt: dict[str, Any], prompt_id: str, extra_data: dict[str, Any],
                       execute_outputs: list[str]) -> None:
        self.interrupt_requested = False
        self.client_id = extra_data.get("client_id")
        self.status_messages = []
        self._add_message("execution_start", {"prompt_id": prompt_id}, broadcast=False)
        info = self._object_info()
        self.cache.set_prompt(prompt, lambda n: self._is_changed(prompt, n), lambda c: _keeps_node_id(info, c))
        self.objects = {k: v for k, v in self.objects.items() if prompt.get(k[0], {}).get("class_type") == k[1]}
        cached_nodes = [node_id for node_id in prompt if self.cache.get(node_id) is not None]
        self._add_message("execution_cached", {"nodes": cached_nodes, "prompt_id": prompt_id}, broadcast=False)
        run = _Run(prompt, prompt_id, extra_data, info,
                   ProgressRegistry(prompt_id, lambda d: self.hub.send_sync("progress_state", d, self.client_id)))
        await self._run_nodes(run, execute_outputs)
        self.history_result = {
            "outputs": {node_id: ui["output"] for node_id, ui in run.ui_outputs.items()},
            "meta": {node_id: ui["meta"] for node_id, ui in run.ui_outputs.items()},
        }
        self.last_node_id = None

    async def _run_nodes(self, run: _Run, execute_outputs: list[str]) -> None:
        current_outputs = self.cache.all_node_ids()
        elist = ExecutionList(run.prompt, lambda n: _is_output(run.info, run.prompt, n),
                              lambda n: self.cache.get(n) is not None)
        for node_id in execute_outputs:
            elist.add_node(node_id)
        while not elist.is_empty():
            current = elist.next_node()
            if current is None:
                error = {"node_id": next(iter(elist.pending)), "exception_message": "Dependency cycle detected",
                         "exception_type": "graph.DependencyCycleError", "traceback": [], "current_inputs": []}
                self._handle_error(run, current_outputs, error, RuntimeError("Dependency cycle detected"))
                return
            failure = await self._execute_node(run, current)
            self.success = failure is None
            if failure is not None:
                self._handle_error(run, current_outputs, *failure)
                return
            elist.complete(current)
        self._add_message("execution_success", {"prompt_id": run.prompt_id}, broadcast=False)

    async def _execute_node(self, run: _Run, node_id: str) -> tuple[dict[str, Any], BaseException] | None:
        cached = self.cache.get(node_id)
        if cached is not None:
            self._replay_cached(run, node_id, cached)
            return None
        class_type = run.prompt[node_id]["class_type"]
        input_data: dict[str, Any] | None = None
        try:
            run.progress.start(node_id)
            input_data = self._input_data(run, node_id)
            if self.client_id is not None:
                self.last_node_id = node_id
                self.hub.send_sync("executing", {"node": node_id, "display_node": node_id,
                                                 "prompt_id": run.prompt_id}, self.client_id)
            outputs, ui = await self._call_node(run, node_id, class_type, input_data)
        except Interrupted as iex:
            return {"node_id": node_id}, iex
        except Exception as ex:
            return _error_details(node_id, ex, input_data), ex
        if ui:
            self._record_ui(run, node_id, ui)
        self.cache.put(node_id, CacheEntry(run.ui_outputs.get(node_id), [[value] for value in outputs]))
        run.progress.finish(node_id)
        run.executed.add(node_id)
        return None

    def _replay_cached(self, run: _Run, node_id: str, cached: CacheEntry) -> None:
        if self.client_id is not None:
            output = (cached.ui or {}).get("output")
            self.hub.send_sync("executed", {"node": node_id, "display_node": node_id, "output": output,
                                            "prompt_id": run.prompt_id}, self.client_id)
            if cached.ui is not None:
                run.ui_outputs[node_id] = cached.ui
        run.progress.finish(node_id)

    def _record_ui(self, run: _Run, node_id: str, ui: dict[str, Any]) -> None:
        meta = {"node_id": node_id, "display_node": node_id, "parent_node": None, "real_node_id": node_id}
        run.ui_outputs[node_id] = {"meta": meta, "output": ui}
        if self.client_id is not None:
            self.hub.send_sync("executed", {"node": node_id, "display_node": node_id, "output": ui,
                                            "prompt_id": run.prompt_id}, self.client_id)

    async def _call_node(self, run: _Run, node_id: str, class_type: str, input_data: dict[str, Any]
                         ) -> runtime.Outputs:
        self._check_interrupt()  # nodes.before_node_execution
        if self.faults.error_at_node == class_type:
            raise Exception(f"Simulated failure of {class_type} (sim fault error_at_node)")
        state = self.objects.setdefault((node_id, class_type), {})
        ctx = runtime.RunContext(options=self.options, paths=self.paths, gpu=self.gpu,
                                 slow_factor=self.faults.slow_factor, node_id=node_id, prompt_id=run.prompt_id,
                                 state=state, step=lambda value, total, image, fmt: self._on_step(
                                     run, node_id, value, total, image=image, fmt=fmt))
        kwargs = {name: values[0] for name, values in input_data.items() if len(values) > 0}
        loads = self.gpu.loads
        try:
            return await runtime.HANDLERS[class_type](ctx, **kwargs)
        finally:  # each load paused for model_load_ms (runtime._ensure_loaded)
            self.work.load_s += ((self.gpu.loads - loads) * self.options.model_load_ms * ctx.slow_factor
                                 / self.options.speed / 1000)

    def _on_step(self, run: _Run, node_id: str, value: int, total: int, *, image: bytes | None, fmt: int) -> None:
        """main.py's progress hook: interrupt check, progress_state, previews and `progress`."""
        self._check_interrupt()
        self.work.sampling_steps += 1
        run.progress.update(node_id, value, total)
        metadata_client = self.hub.supports_preview_metadata(self.client_id)
        if image is not None and metadata_client:
            meta = frames.preview_metadata(node_id, run.prompt_id, fmt)
            self.hub.send_frame(frames.encode_preview_with_metadata(image, meta), self.client_id)
        self.hub.send_sync("progress", {"value": value, "max": total, "prompt_id": run.prompt_id,
                                        "node": node_id}, self.client_id)
        if image is not None and not metadata_client:
            self.hub.send_frame(frames.encode_preview(image, fmt), self.client_id)

    def _input_data(self, run: _Run, node_id: str) -> dict[str, Any]:
        """execution.py get_input_data: links from the cache, widgets as 1-lists, then hidden inputs."""
        node = run.prompt[node_id]
        spec = run.info[node["class_type"]].get("input", {})
        data: dict[str, Any] = {}
        for name, value in node["inputs"].items():
            category, extra = _category(spec, name)
            if is_link(value) and not extra.get("rawLink", False):
                entry = self.cache.get(value[0])
                missing = entry is None or value[1] >= len(entry.outputs)
                data[name] = (None,) if missing or entry is None else entry.outputs[value[1]]
            elif category is not None:
                data[name] = [value]
        for name, kind in (spec.get("hidden") or {}).items():
            if kind == "PROMPT":
                data[name] = [run.prompt]
            elif kind == "EXTRA_PNGINFO":
                data[name] = [run.extra_data.get("extra_pnginfo")]
            elif kind == "UNIQUE_ID":
                data[name] = [node_id]
        return data

    def _is_changed(self, prompt: dict[str, Any], node_id: str) -> Any:
        node = prompt[node_id]
        if node.get("class_type") not in runtime.IS_CHANGED_FILE_INPUT:
            return False
        try:
            return file_sha256(self.paths.annotated_input_path(node["inputs"]["image"]))
        except Exception:  # ComfyUI logs and uses NaN: never cached
            return float("NaN")

    def _handle_error(self, run: _Run, current_outputs: set[str], error: dict[str, Any],
                      ex: BaseException) -> None:
        node_id = error["node_id"]
        mes = {"prompt_id": run.prompt_id, "node_id": node_id,
               "node_type": run.prompt[node_id]["class_type"], "executed": list(run.executed)}
        if isinstance(ex, Interrupted):
            self._add_message("execution_interrupted", mes, broadcast=True)
            return
        mes.update(exception_message=error["exception_message"], exception_type=error["exception_type"],
                   traceback=error["traceback"], current_inputs=error["current_inputs"],
                   current_outputs=list(current_outputs))
        self._add_message("execution_error", mes, broadcast=False)

    def status(self) -> dict[str, Any]:
        return {"status_str": "success" if self.success else "error", "completed": self.success,
                "messages": [list(m) for m in self.status_messages]}


def _error_details(node_id: str, ex: BaseException, input_data: dict[str, Any] | None) -> dict[str, Any]:
    formatted = {name: [_format_value(x) for x in values] for name, values in (input_data or {}).items()}
    klass = type(ex)
    name = klass.__qualname__ if klass.__module__ == "builtins" else f"{klass.__module__}.{klass.__qualname__}"
    return {"node_id": node_id, "exception_message": f"{ex}\n", "exception_type": name,
            "traceback": traceback.format_tb(ex.__traceback__), "current_inputs": formatted}


def _category(spec: dict[str, Any], name: str) -> tuple[str | None, dict[str, Any]]:
    for category in ("required", "optional", "hidden"):
        entry = (spec.get(category) or {}).get(name)
        if entry is not None:
            extra = entry[1] if isinstance(entry, list) and len(entry) > 1 and isinstance(entry[1], dict) else {}
            return category, extra
    return None, {}


def _is_output(info: dict[str, dict[str, Any]], prompt: dict[str, Any], node_id: str) -> bool:
    return info.get(prompt[node_id]["class_type"], {}).get("output_node") is True


def _keeps_node_id(info: dict[str, dict[str, Any]], class_type: str) -> bool:
    """ComfyUI keys a node's cache on its id too when it takes UNIQUE_ID."""
    return "UNIQUE_ID" in (info.get(class_type, {}).get("input", {}).get("hidden") or {}).values()
