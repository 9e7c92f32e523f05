"""A simulated ComfyUI 0.3.75 server, faithful on the wire, for the demo, the tests and the benchmarks.

Same routes (each also at `/api` + path), JSON shapes, status codes, websocket message order and binary
frames as the golden traces in tests/traces/; nodes that cost time (samplers, checkpoint loads) sleep
instead of computing; images are real PNGs whose pixels depend on the seed and the backend's name.
Faults for tests are switched through `/sim/faults` and `/sim/die` (see `control.py`).

Layout: `options` (settings) · `nodes` (object_info) · `state` (one simulator's state) · `prompt_queue`
(queue and history) · `worker` and `executor` (running prompts, message order) · `graph` and `cache`
(execution order, output cache) · `progress` (progress_state) · `runtime` and `values` (what nodes do) ·
`images` and `jpeg` (files and previews) · `gpu` (VRAM) · `files` (folders, path rules) · `hub` and `ws`
(websockets) · `api_*` (HTTP routes) · `templates` (workflow templates, node docs) · `faults` and `control`
(test faults) · `server` (app, start/stop).
"""

from proxy.sim.options import SimOptions, add_sim_arguments, options_from_args
from proxy.sim.server import SimServer, create_sim_app, start_sim

__all__ = ["SimOptions", "SimServer", "add_sim_arguments", "create_sim_app", "options_from_args", "start_sim"]
