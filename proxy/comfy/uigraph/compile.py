"""graphToPrompt over the loaded graph: subgraphs flattened, every input resolved, the prompt written.

Execution order, bypassed, muted, virtual and subgraph nodes followed to a real output, PrimitiveNode
values copied into the widgets they feed, `%…%` and dynamic-prompt rewrites, and JavaScript's key order.
"""

from __future__ import annotations

import random
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from proxy.comfy.uigraph.jstext import UNDEFINED, _js_keys, _js_string, dynamic_prompt, format_date
from proxy.comfy.uigraph.loading import SAVE_TYPES, SR_PROPERTY, _sync_promoted
from proxy.comfy.uigraph.model import UiGraphError, _Graph, _Link, _Node, _Widget

MUTED, BYPASSED = 2, 4  # LGraphEventMode.NEVER, LGraphEventMode.BYPASS
SUBGRAPH_INPUT_ID = -10  # the id of a subgraph's input node in its links
PRIMITIVE_REPLACE = "Run widget replace on values"
_UNSAFE_IN_NAME = re.compile(r'[/?<>\\:*|"\x00-\x1f\x7f]')


def _execution_order(graph: _Graph) -> list[_Node]:
    """LGraph.computeExecutionOrder: Kahn's order over the links, nodes in a loop last."""
    remaining = {key: sum(s.link is not None for s in n.inputs) for key, n in graph.nodes.items()}
    ready = deque(n for key, n in graph.nodes.items() if remaining[key] == 0)
    pending = dict(graph.nodes)
    ordered, seen = [], set()
    while ready:
        node = ready.popleft()
        ordered.append(node)
        pending.pop(str(node.id), None)
        for link_id in (link_id for _, links in node.outputs for link_id in links):
            link = graph.links.get(link_id)
            if link is None or link.id in seen:
                continue
            seen.add(link.id)
            key = str(link.target_id)
            if key in graph.nodes and remaining[key] > 0:
                remaining[key] -= 1
                if remaining[key] == 0:
                    ready.append(graph.nodes[key])
    return ordered + [pending[key] for key in _js_keys(pending)]


class _Compiler:
    """graphToPrompt over the loaded model: flatten subgraphs, resolve every input, write the prompt."""

    def __init__(self, root: _Graph, subgraphs: list[_Graph], rng: random.Random, now: datetime) -> None:
        self.root, self.subgraphs, self.rng, self.now = root, subgraphs, rng, now
        self.dtos: dict[str, tuple[_Node, _Graph, tuple[str, ...]]] = {}
        for node in _execution_order(root):
            self._add(node, root, ())

    def _add(self, node: _Node, graph: _Graph, path: tuple[str, ...]) -> None:
        self.dtos.setdefault(_exec_id(path, node.id), (node, graph, path))
        if node.subgraph is not None:
            for inner in node.subgraph.nodes.values():
                self._add(inner, node.subgraph, (*path, str(node.id)))

    def all_nodes(self, graph: _Graph) -> Iterator[_Node]:
        """collectAllNodes: a subgraph node's inner nodes before it, in file order."""
        for node in graph.nodes.values():
            if node.subgraph is not None:
                yield from self.all_nodes(node.subgraph)
            yield node

    def replace_text(self, value: Any) -> str:
        """applyTextReplacements: `%date:…%` and `%Title.widget%` (by S&R name, else title; first match)."""
        def one(match: re.Match[str]) -> str:
            words = match.group(1).split(".")
            if len(words) != 2:
                return format_date(words[0][5:], self.now) if words[0].startswith("date:") else match.group(0)
            nodes = [n for n in self.all_nodes(self.root) if n.properties.get(SR_PROPERTY) == words[0]] or \
                [n for n in self.all_nodes(self.root) if n.title == words[0]]
            widget = nodes[0].widget(words[1]) if nodes else None
            if widget is None:
                return match.group(0)
            shown = widget.read()
            return _UNSAFE_IN_NAME.sub("_", _js_string("" if shown is None or shown is UNDEFINED else shown))
        if not isinstance(value, str):
            raise UiGraphError(f"%…% replacement needs text, not {value!r}"[:200])
        return re.sub(r"%([^%]+)%", one, value)

    def apply_primitives(self) -> None:
        """PrimitiveNode.applyToGraph: copy each primitive's value into the widgets it is linked to."""
        for node, graph, path in list(self.dtos.values()):
            if node.type != "PrimitiveNode" or not node.outputs or not node.outputs[0][1]:
                continue
            if path:
                raise UiGraphError("a PrimitiveNode inside a subgraph: frontend 1.32.9 cannot queue it either",
                                   _exec_id(path, node.id))
            targets = [self._primitive_target(graph, link_id) for link_id in node.outputs[0][1]]
            value = node.values[0] if node.values else (targets[0].read() if targets[0] else UNDEFINED)
            if value and node.properties.get(PRIMITIVE_REPLACE):
                value = self.replace_text(value)
            for widget in targets:
                if widget is not None:
                    widget.write(value)

    def _primitive_target(self, graph: _Graph, link_id: Any) -> _Widget | None:
        link = graph.links.get(link_id)
        if link is None:
            raise UiGraphError(f"a PrimitiveNode's output names link {link_id}, which is not in the graph")
        node = graph.nodes.get(str(link.target_id))
        if node is None or link.target_slot >= len(node.inputs):
            return None
        return node.widget(node.inputs[link.target_slot].widget)

    def resolve_input(self, key: str, slot: int, visited: set[str], kind: Any = None) -> Any:
        """ExecutableNodeDTO.resolveInput: (origin id, slot), a `_Value`, or None for nothing."""
        node, graph, path = self.dtos[key]
        _visit(visited, f"{graph.id}:{node.id}[I]{slot}", key)
        if not 0 <= slot < len(node.inputs):
            raise UiGraphError(f"no input {slot}", key)
        here = node.inputs[slot]
        if here.link is None:
            return None
        link = graph.links.get(here.link)
        if link is None:
            raise UiGraphError(f"input {here.name!r} names link {here.link}, which is not in the graph", key)
        if path and link.origin_id == SUBGRAPH_INPUT_ID:
            return self._from_subgraph_node(key, link, visited)
        if str(link.origin_id) not in graph.nodes:
            raise UiGraphError(f"input {here.name!r} is linked to node {link.origin_id}, which is not in the graph",
                               key)
        origin = _exec_id(path, link.origin_id)
        return self.resolve_output(origin, link.origin_slot, here.type if kind is None else kind, visited)

    def _from_subgraph_node(self, key: str, link: _Link, visited: set[str]) -> Any:
        """A link from a subgraph's input: what reaches the subgraph node's input, or its widget's value."""
        owner_key = key.rsplit(":", 1)[0]
        owner = self.dtos[owner_key][0]
        if not 0 <= link.origin_slot < len(owner.inputs):
            raise UiGraphError(f"subgraph input {link.origin_slot} does not exist", owner_key)
        outer = owner.inputs[link.origin_slot]
        if outer.link is None:
            widget = owner.widget(outer.widget)
            return None if widget is None else _Value(widget.read())
        return self.resolve_input(owner_key, link.origin_slot, visited)

    def resolve_output(self, key: str, slot: int, kind: Any, visited: set[str]) -> Any:
        """ExecutableNodeDTO.resolveOutput: through bypassed, virtual and subgraph nodes to a real output."""
        node, graph, path = self.dtos[key]
        _visit(visited, f"{graph.id}:{node.id}[O]{slot}", key)
        if node.mode == BYPASSED:
            index = _bypass_slot(node, slot, kind, key)
            return None if index == -1 else self.resolve_input(key, index, visited)
        if node.subgraph is not None:
            return self._subgraph_output(key, slot, kind, visited)
        if node.virtual:
            link = graph.links.get(node.inputs[slot].link) if slot < len(node.inputs) else None
            if link is None:
                return None
            if str(link.target_id) not in graph.nodes:
                raise UiGraphError(f"link {link.id} goes to node {link.target_id}, which is not in the graph", key)
            return self.resolve_input(_exec_id(path, link.target_id), link.target_slot, visited, kind)
        return _Origin(key, slot)

    def _subgraph_output(self, key: str, slot: int, kind: Any, visited: set[str]) -> Any:
        node = self.dtos[key][0]
        assert node.subgraph is not None
        if not 0 <= slot < len(node.subgraph.outputs):
            raise UiGraphError(f"subgraph output {slot} does not exist", key)
        links = [node.subgraph.links[i] for i in node.subgraph.outputs[slot] if i in node.subgraph.links]
        if not links:
            return None
        if str(links[0].origin_id) not in node.subgraph.nodes:
            raise UiGraphError(f"subgraph output {slot} comes from node {links[0].origin_id}, not a node inside", key)
        return self.resolve_output(f"{key}:{links[0].origin_id}", links[0].origin_slot, kind, visited)

    def widget_values(self, node: _Node) -> dict[str, Any]:
        """The widgets' values, as each widget serializes itself."""
        inputs: dict[str, Any] = {}
        for widget in node.widgets:
            if not widget.name or not widget.to_prompt:
                continue
            value = widget.read()
            if node.type in SAVE_TYPES and widget.name == "filename_prefix":
                value = self.replace_text(value)
            elif widget.dynamic_prompts and isinstance(value, str):
                value = dynamic_prompt(value, self.rng)
            inputs[widget.name] = _boxed(value)
        return inputs

    def entry(self, key: str) -> dict[str, Any]:
        node = self.dtos[key][0]
        inputs = self.widget_values(node)
        for index, slot in enumerate(node.inputs):
            resolved = self.resolve_input(key, index, set())
            if isinstance(resolved, _Value):
                inputs[slot.name] = _boxed(resolved.value)
            elif isinstance(resolved, _Origin):
                inputs[slot.name] = [resolved.key, int(resolved.slot)]
        return {"inputs": inputs, "class_type": node.type, "_meta": {"title": node.title}}

    def prompt(self) -> dict[str, dict[str, Any]]:
        self.apply_primitives()
        for graph in (self.root, *self.subgraphs):  # graph.serialize(): the root's nodes, then the definitions'
            _sync_promoted(graph)
        output = {key: self.entry(key) for key, (node, _, _) in self.dtos.items()
                  if not node.virtual and node.mode not in (MUTED, BYPASSED)}
        for entry in output.values():  # inputs linked to nodes left out go too
            entry["inputs"] = {name: value for name, value in entry["inputs"].items() if value is not UNDEFINED
                               and not (isinstance(value, list) and len(value) == 2 and value[0] not in output)}
        return {key: output[key] for key in _js_keys(output)}


@dataclass(frozen=True)
class _Value:
    value: Any


@dataclass(frozen=True)
class _Origin:
    key: str
    slot: int


def _exec_id(path: tuple[str, ...], node_id: Any) -> str:
    return ":".join((*path, str(node_id)))


def _visit(visited: set[str], unique: str, key: str) -> None:
    if unique in visited:
        raise UiGraphError(f"links go round in a circle ({unique})", key)
    visited.add(unique)


def _boxed(value: Any) -> Any:
    """A list value would read as a link; the page wraps it and ComfyUI unwraps it."""
    return {"__value__": value} if isinstance(value, list) else value


def _valid_connection(a: Any, b: Any) -> bool:
    """LiteGraph.isValidConnection: wildcards, case-insensitive names, comma-separated alternatives."""
    a, b = (0 if t in ("", "*") else t for t in (a, b))
    if not a or not b or a == b:
        return True
    a, b = str(a).lower(), str(b).lower()
    if "," not in a and "," not in b:
        return a == b
    return any(_valid_connection(x, y) for x in a.split(",") for y in b.split(","))


def _bypass_slot(node: _Node, slot: int, kind: Any, key: str) -> int:
    """#getBypassSlotIndex: the input a bypassed node hands on for output `slot` wanted as `kind`."""
    if not 0 <= slot < len(node.outputs):
        raise UiGraphError(f"bypassed node has no output {slot}", key)
    inputs, output_type = node.inputs, node.outputs[slot][0]
    if kind in ("*", ""):
        return slot if len(inputs) > slot else 0
    if slot < len(inputs) and _valid_connection(inputs[slot].type, output_type) and \
            _valid_connection(inputs[slot].type, kind):
        return slot
    exact = next((i for i, s in enumerate(inputs) if s.type == kind), -1)
    if exact != -1:
        return exact
    return next((i for i, s in enumerate(inputs)
                 if _valid_connection(s.type, output_type) and _valid_connection(s.type, kind)), -1)
