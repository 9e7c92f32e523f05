"""Every input of a template's workflow, addressed by node id (ComfyAPI's `{"node_id", "value"}`), read from
the farm's `/object_info`: what each widget takes (type, default, range, options), which nodes are sources
and sinks, what the output nodes produce. Marked inputs (`input:NAME` titles, a template's `inputs:`) keep
their names and may be addressed by them.

A node's input is named by `input`, or may be left out when the node has one widget value in the workflow
(a literal, not a link) or its template marks one of its inputs: the common case of a text node, a seed,
a LoadImage. Values are checked against `/object_info` as ComfyUI's validation would (numbers within
their range, a combo's value among its options) so a mistake is a 400 naming the node before anything
is queued. Image inputs (upload combos such as LoadImage's `image`) take an uploaded file's name or a URL
(`proxy.imagefetch`), which the caller resolves: they are returned apart.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from proxy.errors import BadRequest
from proxy.uploads import UPLOAD_FLAGS
from proxy.workflows import Template, check_input

WIDGETS = {"INT": "int", "FLOAT": "float", "STRING": "string", "BOOLEAN": "boolean"}
KINDS: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "boolean": bool, "string": str,
                                             "combo": (str, int, float), "image": str}
MEDIA_INPUTS = {"IMAGE": "images", "MASK": "images", "LATENT": "latents", "AUDIO": "audio", "VIDEO": "video"}


@dataclass(frozen=True)
class Widget:
    """One widget value of one node."""

    node_id: str
    input: str
    type: str                       # int, float, string, boolean, combo, image
    value: Any                      # as the workflow has it
    default: Any = None
    min: float | None = None
    max: float | None = None
    options: tuple[Any, ...] = ()
    description: str = ""
    name: str | None = None         # the template's name for it, when it is marked

    def describe(self, node_type: str, display_name: str) -> dict[str, Any]:
        out: dict[str, Any] = {"node_id": self.node_id, "input": self.input, "value": self.value,
                               "node_type": node_type, "display_name": display_name,
                               "description": self.description, "type": self.type, "default": self.default}
        if self.min is not None:
            out["min"] = self.min
        if self.max is not None:
            out["max"] = self.max
        if self.options and self.type == "combo":
            out["options"] = list(self.options)
        if self.name is not None:
            out["name"] = self.name
        return out


@dataclass
class Filled:
    """A workflow with the inputs set, and the image inputs still to resolve: (node, input, URL or name)."""

    workflow: dict[str, Any]
    images: list[tuple[str, str, str]] = field(default_factory=list)


def _spec(object_info: dict[str, Any], class_type: str, name: str) -> Any:
    inputs = (object_info.get(class_type) or {}).get("input") or {}
    for section in ("required", "optional"):
        spec = (inputs.get(section) or {}).get(name)
        if spec is not None:
            return spec
    return None


def widget_of(node_id: str, class_type: str, name: str, value: Any, object_info: dict[str, Any]) -> Widget:
    """What `/object_info` says the input takes (an unknown class or input: typed by its value)."""
    spec = _spec(object_info, class_type, name)
    kind = spec[0] if isinstance(spec, list) and spec else None
    extra = spec[1] if isinstance(spec, list) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    default, description = extra.get("default"), str(extra.get("tooltip") or "")
    if isinstance(kind, list) or kind == "COMBO":
        options = tuple(kind if isinstance(kind, list) else extra.get("options") or ())
        upload = any(extra.get(flag) for flag in UPLOAD_FLAGS)
        return Widget(node_id, name, "image" if upload else "combo", value, default, options=options,
                      description=description)
    if kind in WIDGETS:
        return Widget(node_id, name, WIDGETS[kind], value, default, min=extra.get("min"), max=extra.get("max"),
                      description=description)
    by_value = "boolean" if isinstance(value, bool) else "int" if isinstance(value, int) else \
        "float" if isinstance(value, float) else "string"
    return Widget(node_id, name, by_value, value, default, description=description)


def widgets(template: Template, object_info: dict[str, Any]) -> list[Widget]:
    """Every widget value of every node (literal inputs; links are not inputs), marked ones named."""
    names = {(spec.node, spec.input): name for name, spec in template.inputs.items()}
    out = []
    for node_id, node in template.workflow.items():
        for name, value in (node.get("inputs") or {}).items():
            if isinstance(value, list):
                continue
            w = widget_of(node_id, str(node.get("class_type")), name, value, object_info)
            out.append(Widget(**{**w.__dict__, "name": names.get((node_id, name))}))
    return out


def analysis(template: Template, object_info: dict[str, Any]) -> dict[str, Any]:
    """ComfyAPI's workflow descriptor: the graph, its nodes and edges, sources and sinks, every input by node
    id (with type, default and range) and every output node with what it produces."""
    workflow = template.workflow
    nodes, edges, fed = {}, [], set()
    for node_id, node in workflow.items():
        cls = str(node.get("class_type"))
        title = (node.get("_meta") or {}).get("title") or _display(cls, object_info)
        nodes[node_id] = {"class_type": cls, "title": title}
        for name, value in (node.get("inputs") or {}).items():
            if isinstance(value, list) and len(value) == 2:
                edges.append({"source": str(value[0]), "source_slot": value[1], "target": node_id, "input": name})
                fed.add(str(value[0]))
    sinks = [n for n, node in workflow.items() if (object_info.get(node["class_type"]) or {}).get("output_node")
             or n not in fed]
    linked = {e["target"] for e in edges}
    all_widgets = widgets(template, object_info)
    parameters: dict[str, dict[str, Any]] = {}
    for w in all_widgets:
        parameters.setdefault(w.node_id, {})[w.input] = {k: v for k, v in w.describe("", "").items()
                                                          if k not in ("node_id", "input", "node_type",
                                                                       "display_name")}
    return {
        "workflow_id": template.name, "description": template.description, "workflow_json": workflow,
        "nodes": nodes, "edges": edges, "source_ids": [n for n in workflow if n not in linked], "sink_ids": sinks,
        "external_parameters": parameters,
        "inputs": [w.describe(nodes[w.node_id]["class_type"], w.name or f"{nodes[w.node_id]['title']}: {w.input}")
                   for w in all_widgets],
        "outputs": [_output(n, workflow[n], object_info) for n in sinks
                    if (object_info.get(workflow[n]["class_type"]) or {}).get("output_node")],
    }


def _display(class_type: str, object_info: dict[str, Any]) -> str:
    return str((object_info.get(class_type) or {}).get("display_name") or class_type)


def _output(node_id: str, node: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """An output node and what it produces: what its inputs carry (images for a SaveImage, …)."""
    produces = sorted({MEDIA_INPUTS[kind] for name in (node.get("inputs") or {})
                       if isinstance(spec := _spec(object_info, node["class_type"], name), list) and spec
                       and isinstance(kind := spec[0], str) and kind in MEDIA_INPUTS})
    return {"node_id": node_id, "node_type": node["class_type"], "connection_id": "", "output_id": node_id,
            "produces": produces or ["ui"]}


def fill(template: Template, object_info: dict[str, Any], given: Any) -> Filled:
    """The workflow with ComfyAPI inputs (`[{"node_id", "value"}]`, or `{"node_id", "input", "value"}`) set;
    a bad one is a 400 in ComfyUI's shape naming the node and input."""
    if not isinstance(given, list):
        raise BadRequest("invalid_prompt", "inputs must be a list of {node_id, value}", type(given).__name__)
    filled = Filled(copy.deepcopy(template.workflow))
    marked = {(spec.node, spec.input): (named, spec) for named, spec in template.inputs.items()}
    for item in given:
        node_id, name = _address(template, item)
        node = filled.workflow[node_id]
        widget = widget_of(node_id, str(node.get("class_type")), name, node["inputs"].get(name), object_info)
        value = _checked(widget, item["value"])
        if (node_id, name) in marked:   # the template's own type and range hold too, however it is addressed
            value = check_input(*marked[(node_id, name)], value)
        if widget.type == "image":
            filled.images.append((node_id, name, value))
        node["inputs"][name] = value
    return filled


def _address(template: Template, item: Any) -> tuple[str, str]:
    """Which node and input an item names: a marked input's name, or a node id with its input (or the
    node's single widget value, or the one its template marks)."""
    if not isinstance(item, dict) or "node_id" not in item or "value" not in item:
        raise BadRequest("invalid_input", "Each input needs node_id and value", repr(item)[:200])
    key, named = str(item["node_id"]), item.get("input")
    if key in template.inputs and key not in template.workflow:
        spec = template.inputs[key]
        return spec.node, spec.input
    node = template.workflow.get(key)
    if node is None:
        raise BadRequest("invalid_input", f"No node {key} in workflow {template.name}", key,
                         extra_info={"node_id": key, "known": sorted(template.workflow)})
    literals = [n for n, v in (node.get("inputs") or {}).items() if not isinstance(v, list)]
    if named is not None:
        if named not in literals:
            raise BadRequest("invalid_input", f"Node {key} has no widget input {named}", f"{key}.{named}",
                             extra_info={"node_id": key, "input_name": named, "known": literals})
        return key, str(named)
    marked = [spec.input for spec in template.inputs.values() if spec.node == key]
    choices = marked if len(marked) == 1 else literals
    if len(choices) != 1:
        raise BadRequest("invalid_input", f"Node {key} has several inputs: name one with input", key,
                         extra_info={"node_id": key, "known": literals})
    return key, choices[0]


def _echo(value: Any) -> Any:
    """A refused value as an error may show it: short, and valid JSON (no NaN or infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value if not isinstance(value, str) or len(value) <= 200 else value[:200] + "…"


def _checked(w: Widget, value: Any) -> Any:
    where = f"{w.node_id}.{w.input}"
    typed = isinstance(value, KINDS[w.type]) and not isinstance(value, bool) if w.type != "boolean" \
        else isinstance(value, bool)
    if typed and isinstance(value, float) and not math.isfinite(value):
        typed = False
    if not typed:
        raise BadRequest("invalid_input_type", f"Input {where} must be {w.type}",
                         f"{where}: got {type(value).__name__}",
                         extra_info={"node_id": w.node_id, "input_name": w.input, "received_value": _echo(value)})
    if w.min is not None and value < w.min:
        raise BadRequest("value_smaller_than_min", f"Value {value} smaller than min of {w.min}", where,
                         extra_info={"node_id": w.node_id, "input_name": w.input, "received_value": _echo(value)})
    if w.max is not None and value > w.max:
        raise BadRequest("value_bigger_than_max", f"Value {value} bigger than max of {w.max}", where,
                         extra_info={"node_id": w.node_id, "input_name": w.input, "received_value": _echo(value)})
    if w.type == "combo" and w.options and value not in w.options:
        raise BadRequest("value_not_in_list", f"Value not in list: {value!r}", where,
                         extra_info={"node_id": w.node_id, "input_name": w.input, "received_value": _echo(value)})
    return float(value) if w.type == "float" else value
