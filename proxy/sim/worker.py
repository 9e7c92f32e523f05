"""The simulator's one prompt worker (ComfyUI main.py `prompt_worker`): a prompt at a time, then flags.

After each prompt: the history entry (and its `status` broadcast), then `executing` {node: null} to the
prompt's client only. Between prompts, `POST /free` flags unload the model and drop the caches.
"""

from __future__ import annotations

import time

import structlog

from proxy.sim.state import Sim

log = structlog.get_logger(__name__)


async def prompt_worker(sim: Sim) -> None:
    while True:
        got = await sim.queue.get()
        if got is not None:
            item, task_id = got
            extra_data = {**item.extra_data, **item.sensitive}
            started = time.perf_counter()
            try:
                await sim.executor.execute(item.prompt, item.prompt_id, extra_data, item.outputs_to_execute)
            except Exception:  # a simulator bug: record the prompt as failed and keep serving
                log.exception("sim_execution_crashed", prompt_id=item.prompt_id)
                sim.executor.success = False
                sim.executor.history_result = {"outputs": {}, "meta": {}}
            sim.queue.task_done(task_id, sim.executor.history_result, sim.executor.status())
            if sim.executor.client_id is not None:
                sim.hub.send_sync("executing", {"node": None, "prompt_id": item.prompt_id}, sim.executor.client_id)
            sim.log.info(executed_line(time.perf_counter() - started))
        flags = sim.queue.take_flags()
        free_memory = flags.get("free_memory", False)
        if flags.get("unload_models", free_memory):
            sim.gpu.unload_all()
        if free_memory:
            sim.executor.reset()


def executed_line(seconds: float) -> str:
    """main.py's line after each prompt: seconds, or H:M:S past ten minutes."""
    if seconds > 600:
        return f"Prompt executed in {time.strftime('%H:%M:%S', time.gmtime(seconds))}"
    return f"Prompt executed in {seconds:.2f} seconds"
