"""A workflow as the ComfyUI editor saves it (the UI graph) turned into the prompt ComfyUI runs (API format).

Clients send what they have, often the editor's file rather than its "Export (API)". This redoes the
frontend's own `app.graphToPrompt()` (comfyui-frontend-package 1.32.9) over the farm's `/object_info`, so
the prompt is the one the page would have queued; tests/data/uigraph holds pairs recorded from the page.

The frontend's behaviour, kept because the prompt differs without it:
- Widgets come from object_info in `input_order` (else `required`, then `optional`): one per INT, FLOAT,
  BOOLEAN, STRING, COMBO, MARKDOWN, COLOR or TEXTAREA input not marked `forceInput`. `widgets_values`
  fills them by position, counting widgets that never reach the prompt: the `control_after_generate`
  combo after an INT that asks for it or is named seed/noise_seed, control and filter widgets after a
  COMBO that asks, the `upload` button appended for the first `image_upload`-style combo of `required`.
  `widgets_values` that is not a list is ignored: the defaults go out.
- A multiline STRING lives in a <textarea>: its value goes out as text, null as "", \r\n as \n.
- A linked input replaces its widget's value. Reroutes pass links through; a bypassed node (mode 4)
  passes on its first input of the consumer's type (same slot first), or nothing; a muted node (mode 2)
  is left out, and so is every input linked to it, even a widget's, whose value is then missing too.
- A PrimitiveNode writes its value into the widgets it feeds, then is left out.
- Widgets with `dynamicPrompts` lose `//` and `/* */` comments (`http://x` becomes `http:`) and pick one
  of each `{a|b}` at random; save nodes' `filename_prefix` gets `%date:…%` and `%Node.widget%` filled.
- Subgraphs are flattened, inner ids `outer:inner`. A subgraph input without a link takes the subgraph
  node's widget value raw (no comment stripping), but first every instance copies its widget values
  into the inner widgets they share, so the last instance's values win for linked inputs; a multiline
  text widget is one element for all instances. Muting a subgraph node leaves its nodes in the prompt;
  bypassing it cuts only its outputs.
- Old node type names and KSampler's `sample_` sampler names are renamed; list values go out as
  `{"__value__": [...]}`; integers past 2**53 are rounded as JSON.parse does; keys are in JavaScript's
  order (numeric ids ascending, then the others as met).

Refused with `UiGraphError`, naming the node: a class the farm lacks, a link to nothing, links in a
circle, legacy group nodes (`workflow>…`), nodes whose values the page itself makes (webcam, 3D, audio),
and a PrimitiveNode inside a subgraph (1.32.9 fails on it with a TypeError).

Layout, in the order a workflow goes through it: `loading` reads the saved file into the graph of `model`,
with node classes from `widgets`; `compile` resolves it into the prompt; `jstext` answers as JavaScript.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from proxy.comfy.uigraph.compile import _Compiler
from proxy.comfy.uigraph.jstext import dynamic_prompt, format_date
from proxy.comfy.uigraph.loading import _Loader
from proxy.comfy.uigraph.model import UiGraphError

__all__ = ["UiGraphError", "dynamic_prompt", "format_date", "graph_to_api", "workflow_format"]


def workflow_format(data: Any) -> Literal["ui", "api"] | None:
    """Which of ComfyUI's two workflow formats a loaded JSON document is, or None for neither."""
    if not isinstance(data, Mapping) or not data:
        return None
    if isinstance(data.get("nodes"), list) and isinstance(data.get("links", []), list):
        return "ui"
    if all(isinstance(node, Mapping) and isinstance(node.get("class_type"), str) for node in data.values()):
        return "api"
    return None


def graph_to_api(workflow: Mapping[str, Any], object_info: Mapping[str, Any], *, rng: random.Random | None = None,
                 now: datetime | None = None) -> dict[str, dict[str, Any]]:
    """The prompt the frontend's graphToPrompt gives for this UI workflow on a farm with this object_info.

    `rng` draws the `{a|b}` choices of dynamic prompts, `now` fills `%date:…%` (local time, as the page's
    clock); both default to the real ones. Raises UiGraphError for what cannot be converted."""
    if workflow_format(workflow) != "ui":
        raise UiGraphError("not a UI workflow: it needs a `nodes` list (an API prompt needs no conversion)")
    loader = _Loader(workflow, object_info)
    root = loader.graph(workflow)
    compiler = _Compiler(root, loader.used_subgraphs(), rng or random.Random(), now or datetime.now())
    return compiler.prompt()
