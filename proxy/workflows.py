"""Workflow templates: a ComfyUI graph with named inputs, for applications that do not build graphs.

A template is one YAML or JSON file in `workflows.dir`:

    name: portrait
    description: text to image
    workflow: {…API-format graph…}
    inputs:
      prompt: {node: "6", input: text, type: string, description: "what to draw"}
      seed:   {node: "3", input: seed, type: int, default: 0, min: 0}

Without `inputs`, nodes titled `input:NAME` (`_meta.title`) become inputs: the node's first literal
input, typed by its value, which is also the default. Files are checked when loaded, with messages that
name the file and key. A run is an ordinary prompt: admitted, queued, scheduled and counted like any other.

A file may also be a bare workflow, named by its file name: an API-format graph, or the graph the ComfyUI
editor saves (UI format: `nodes`, `links`, `widgets_values`), and `workflow:` may hold either. A UI graph
is converted as the editor's own `graphToPrompt` would (`proxy.comfy.uigraph`), with the farm's
`/object_info`, at each use (`resolved`): the conversion needs the farm's node definitions, which a
template loaded before any backend answered does not have, and `{a|b}` choices are drawn per run as the
page draws them per queue. Its marks and `inputs:` are checked then too.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from proxy.comfy.uigraph import UiGraphError, graph_to_api, workflow_format
from proxy.errors import BadRequest, NoBackendAvailable

TYPES = {"string": str, "int": int, "float": float, "boolean": bool, "image": str}
JSON_TYPES = {"string": "string", "int": "integer", "float": "number", "boolean": "boolean", "image": "string"}
TITLE_PREFIX = "input:"


class TemplateError(ValueError):
    pass


class TemplateUnusable(BadRequest):
    """A UI-format template the farm's node definitions cannot convert (a node class it lacks, …)."""

    status = 422

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__("template_unusable", message, details)


@dataclass(frozen=True)
class InputSpec:
    node: str
    input: str
    type: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    description: str = ""

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    workflow: dict[str, Any]
    inputs: dict[str, InputSpec]
    graph: dict[str, Any] | None = None   # the editor's graph (UI format), converted at each use
    raw_inputs: Any = None                # its `inputs:` section, checked once converted

    def resolved(self, object_info: dict[str, Any]) -> Template:
        """The template in API format: itself, or its UI graph converted with the farm's `/object_info`."""
        if self.graph is None:
            return self
        if not object_info:
            raise NoBackendAvailable("No node definitions yet to convert this workflow",
                                     f"{self.name} is an editor (UI-format) graph; no backend has answered yet")
        try:
            workflow = graph_to_api(self.graph, object_info)
            inputs = _inputs(self.name, self.raw_inputs, workflow)
        except (UiGraphError, TemplateError) as exc:
            raise TemplateUnusable(f"Workflow {self.name} cannot run on this farm", str(exc)) from None
        return replace(self, workflow=workflow, inputs=inputs, graph=None, raw_inputs=None)

    def schema(self) -> dict[str, Any]:
        """The inputs as a JSON Schema (draft 2020-12)."""
        props: dict[str, Any] = {}
        for name, spec in self.inputs.items():
            prop: dict[str, Any] = {"type": JSON_TYPES[spec.type]}
            if spec.description:
                prop["description"] = spec.description
            if spec.default is not None:
                prop["default"] = spec.default
            if spec.min is not None:
                prop["minimum"] = spec.min
            if spec.max is not None:
                prop["maximum"] = spec.max
            if spec.type == "image":
                prop["contentMediaType"] = "image/*"
                prop["description"] = (spec.description + " " if spec.description else "") + \
                    "(the name of a file uploaded with /upload/image)"
            props[name] = prop
        return {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": props,
                "required": [n for n, s in self.inputs.items() if s.required], "additionalProperties": False}

    def fill(self, values: Any) -> dict[str, Any]:
        """The graph with the inputs set; a bad value is a 400 in ComfyUI's shape naming the input."""
        if not isinstance(values, dict):
            raise BadRequest("invalid_prompt", "inputs must be an object", type(values).__name__)
        unknown = sorted(set(values) - set(self.inputs))
        if unknown:
            raise BadRequest("invalid_input", f"Unknown input: {unknown[0]}", unknown[0],
                             extra_info={"input_name": unknown[0], "known": sorted(self.inputs)})
        graph = copy.deepcopy(self.workflow)
        for name, spec in self.inputs.items():
            value = values.get(name, spec.default)
            if value is None:
                raise BadRequest("required_input_missing", "Required input is missing", name,
                                 extra_info={"input_name": name})
            graph[spec.node]["inputs"][spec.input] = check_input(name, spec, value)
        return graph


def check_input(name: str, spec: InputSpec, value: Any) -> Any:
    """A value for a named input, of its type and within its range; a 400 naming it otherwise."""
    kind = TYPES[spec.type]
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise BadRequest("invalid_input_type", f"Input {name} must be {JSON_TYPES[spec.type]}",
                         f"{name}: got {type(value).__name__}",
                         extra_info={"input_name": name, "received_value": value})
    if spec.min is not None and value < spec.min:
        raise BadRequest("value_smaller_than_min", f"Value {value} smaller than min of {spec.min}", name,
                         extra_info={"input_name": name, "received_value": value})
    if spec.max is not None and value > spec.max:
        raise BadRequest("value_bigger_than_max", f"Value {value} bigger than max of {spec.max}", name,
                         extra_info={"input_name": name, "received_value": value})
    return value


def _type_of(value: Any) -> str | None:
    for name in ("boolean", "int", "float", "string"):
        kind = TYPES[name]
        if isinstance(value, kind) and not (name in ("int", "float") and isinstance(value, bool)):
            return name
    return None


def _discover(where: str, workflow: dict[str, Any]) -> dict[str, InputSpec]:
    found: dict[str, InputSpec] = {}
    for node_id, node in workflow.items():
        title = str(((node.get("_meta") or {}).get("title")) or "")
        if not title.startswith(TITLE_PREFIX):
            continue
        name = title[len(TITLE_PREFIX):].strip()
        literal = next(((k, v) for k, v in (node.get("inputs") or {}).items()
                        if not isinstance(v, list) and _type_of(v) is not None), None)
        if not name or literal is None:
            raise TemplateError(f"{where}: workflow.{node_id}._meta.title: {title!r} names no literal input")
        kind = "image" if node.get("class_type") in ("LoadImage", "LoadImageMask") else _type_of(literal[1])
        found[name] = InputSpec(node=str(node_id), input=literal[0], type=kind or "string", default=literal[1])
    return found


def _parse_input(where: str, name: str, raw: Any, workflow: dict[str, Any]) -> InputSpec:
    path = f"{where}: inputs.{name}"
    if not isinstance(raw, dict):
        raise TemplateError(f"{path}: must be a mapping")
    unknown = set(raw) - {"node", "input", "type", "default", "min", "max", "description"}
    if unknown:
        raise TemplateError(f"{path}.{sorted(unknown)[0]}: unknown key")
    node, field_, kind = str(raw.get("node", "")), raw.get("input"), raw.get("type", "string")
    if node not in workflow:
        raise TemplateError(f"{path}.node: no node {node!r} in the workflow")
    if not isinstance(field_, str) or not field_:
        raise TemplateError(f"{path}.input: required (the input name on node {node})")
    if kind not in TYPES:
        raise TemplateError(f"{path}.type: must be one of {', '.join(TYPES)}")
    for key in ("min", "max"):
        if raw.get(key) is not None and not isinstance(raw[key], int | float):
            raise TemplateError(f"{path}.{key}: must be a number")
    spec = InputSpec(node=node, input=field_, type=kind, default=raw.get("default"), min=raw.get("min"),
                     max=raw.get("max"), description=str(raw.get("description") or ""))
    if spec.default is not None:
        try:
            check_input(name, spec, spec.default)
        except BadRequest as exc:
            raise TemplateError(f"{path}.default: {exc.message}") from None
    return spec


def _inputs(where: str, raw: Any, workflow: dict[str, Any]) -> dict[str, InputSpec]:
    if raw is None:
        return _discover(where, workflow)
    if isinstance(raw, dict):
        return {str(k): _parse_input(where, str(k), v, workflow) for k, v in raw.items()}
    raise TemplateError(f"{where}: inputs: must be a mapping")


def parse_template(where: str, raw: Any, default_name: str = "") -> Template:
    """A template file's contents: a template mapping, or a bare workflow named `default_name`."""
    if workflow_format(raw) is not None:
        raw = {"name": default_name, "workflow": raw}
    if not isinstance(raw, dict):
        raise TemplateError(f"{where}: must be a mapping")
    unknown = set(raw) - {"name", "description", "workflow", "inputs"}
    if unknown:
        raise TemplateError(f"{where}: {sorted(unknown)[0]}: unknown key")
    name = raw.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise TemplateError(f"{where}: name: required, without '/'")
    workflow, description = raw.get("workflow"), str(raw.get("description") or "")
    if workflow_format(workflow) == "ui":
        if raw.get("inputs") is not None and not isinstance(raw["inputs"], dict):
            raise TemplateError(f"{where}: inputs: must be a mapping")
        return Template(name, description, {}, {}, graph=workflow, raw_inputs=raw.get("inputs"))
    if not isinstance(workflow, dict) or not workflow or not all(
            isinstance(n, dict) and "class_type" in n for n in workflow.values()):
        raise TemplateError(f"{where}: workflow: must be an API-format graph (nodes with class_type) "
                            "or a graph saved by the ComfyUI editor")
    return Template(name, description, workflow, _inputs(where, raw.get("inputs"), workflow))


def load_templates(folder: str | Path) -> dict[str, Template]:
    out: dict[str, Template] = {}
    for path in sorted(Path(folder).iterdir()):
        if path.suffix not in (".yaml", ".yml", ".json") or not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
        except (ValueError, yaml.YAMLError) as exc:
            raise TemplateError(f"{path.name}: not valid {path.suffix[1:].upper()}: {exc}") from exc
        template = parse_template(path.name, raw, path.stem)
        if template.name in out:
            raise TemplateError(f"{path.name}: name: {template.name!r} is also defined by another file")
        out[template.name] = template
    return out
