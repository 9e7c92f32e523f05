"""The saved file turned into the in-memory graph, as LGraph.configure and ComfyNode.configure read it.

Renamed node types, the sampler-name patch, slots merged with the node's definition, subgraph
definitions built once and shared, and the widgets a subgraph node promotes; the nodes the proxy
cannot convert are refused here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

from proxy.comfy.uigraph.jstext import UNDEFINED, _js_parsed, _js_string
from proxy.comfy.uigraph.model import UiGraphError, _Graph, _Link, _Node, _Slot, _Widget
from proxy.comfy.uigraph.widgets import _default, _NodeDef, _spec_type

VIRTUAL_TYPES = frozenset({"Reroute", "PrimitiveNode", "Note", "MarkdownNote"})
BROWSER_WIDGET_TYPES = frozenset({"WEBCAM", "IMAGECOMPARE", "CHART", "GALLERIA", "AUDIO_UI", "AUDIOUPLOAD",
                                  "AUDIO_RECORD", "LOAD_3D", "PREVIEW_3D"})
# Frontend extensions give these nodes widgets whose value the page itself makes (uploadAudio.ts,
# load3d.ts, saveMesh.ts, webcamCapture.ts).
BROWSER_NODES = frozenset({"WebcamCapture", "Load3D", "Preview3D", "SaveGLB", "RecordAudio", "LoadAudio",
                           "SaveAudio", "PreviewAudio", "SaveAudioMP3", "SaveAudioOpus"})
RENAMED = {"T2IAdapterLoader": "ControlNetLoader", "ConditioningAverage ": "ConditioningAverage",
           "SDV_img2vid_Conditioning": "SVD_img2vid_Conditioning", "Load3DAnimation": "Load3D",
           "Preview3DAnimation": "Preview3D"}
SAVE_TYPES = frozenset({"SaveImage", "SaveVideo", "SaveAnimatedWEBP", "SaveWEBM", "SaveAudio", "SaveGLB",
                        "SaveAnimatedPNG", "CLIPSave", "VAESave", "ModelSave", "LoraSave", "SaveLatent"})
SR_PROPERTY = "Node name for S&R"


def _link(raw: Any) -> _Link:
    if isinstance(raw, list) and len(raw) >= 6:
        return _Link(*raw[:6])
    if isinstance(raw, Mapping):
        return _Link(raw.get("id"), raw.get("origin_id"), raw.get("origin_slot", 0), raw.get("target_id"),
                     raw.get("target_slot", 0), raw.get("type"))
    raise UiGraphError(f"a link is neither [id, from, slot, to, slot, type] nor an object: {raw!r}"[:200])


def _slot(raw: Mapping[str, Any]) -> _Slot:
    widget = raw.get("widget")
    return _Slot(str(raw.get("name", "")), raw.get("type"), raw.get("link"),
                 widget.get("name") if isinstance(widget, Mapping) else None)


class _Loader:
    """Builds the graph model the way LGraph.configure and ComfyNode.configure read a saved file."""

    def __init__(self, workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> None:
        self.object_info = object_info
        self.group_nodes = set((workflow.get("extra") or {}).get("groupNodes") or {})
        self.node_defs: dict[str, _NodeDef] = {}
        self.definitions: dict[str, Mapping[str, Any]] = {}
        self._collect(workflow)
        self.loading: list[str] = []
        self.subgraphs: dict[str, _Graph] = {}
        used = self._used(workflow, set())
        for subgraph_id in self.definitions:  # LGraph.configure: the definitions before the root's nodes
            if subgraph_id in used:
                self.subgraph(subgraph_id, None)

    def _collect(self, graph: Mapping[str, Any]) -> None:
        for definition in (graph.get("definitions") or {}).get("subgraphs") or []:
            if isinstance(definition, Mapping) and definition.get("id") not in self.definitions:
                self.definitions[str(definition.get("id"))] = definition
                self._collect(definition)

    def _used(self, graph: Mapping[str, Any], used: set[str]) -> set[str]:
        """The definitions this graph's nodes reach (findUsedSubgraphIds); others are never built."""
        for raw in _mappings(graph.get("nodes")):
            kind = str(raw.get("type"))
            if kind in self.definitions and kind not in used:
                used.add(kind)
                self._used(self.definitions[kind], used)
        return used

    def graph(self, data: Mapping[str, Any], graph_id: str | None = None) -> _Graph:
        nodes_data, links_data = data.get("nodes"), data.get("links") or []
        if not isinstance(nodes_data, list) or not isinstance(links_data, list):
            raise UiGraphError(f"{'subgraph ' + graph_id if graph_id else 'the workflow'}: `nodes` and `links` "
                               "must be lists")
        links = {link.id: link for link in map(_link, links_data)}
        graph = _Graph(graph_id, str(data.get("name") or ""), {}, links,
                       [(str(i.get("name", "")), list(i.get("linkIds") or [])) for i in _mappings(data.get("inputs"))],
                       [list(o.get("linkIds") or []) for o in _mappings(data.get("outputs"))])
        for raw in nodes_data:
            node = self.node(raw)
            graph.nodes[str(node.id)] = node
        _fix_link_slots(graph)
        if graph_id is None:
            _patch_samplers(graph)
        return graph

    def node(self, raw: Any) -> _Node:
        if not isinstance(raw, Mapping) or raw.get("id") is None:
            raise UiGraphError(f"a node without an id: {raw!r}"[:200])
        kind = RENAMED.get(str(raw.get("type")), str(raw.get("type")))
        mode = raw.get("mode")
        node = _Node(raw["id"], kind, mode if isinstance(mode, int) else 0, str(raw.get("title") or ""),
                     [_slot(s) for s in _mappings(raw.get("inputs"))],
                     [(o.get("type"), list(o.get("links") or [])) for o in _mappings(raw.get("outputs"))], [],
                     dict(raw.get("properties") or {}))
        values = raw.get("widgets_values")
        values = [_js_parsed(v) for v in values] if isinstance(values, list) else []
        if kind in VIRTUAL_TYPES:
            return replace(node, virtual=True, title=node.title or kind, values=values)
        if kind in self.definitions:
            return self._subgraph_node(node, values)
        return self._comfy_node(node, values)

    def _comfy_node(self, node: _Node, values: list[Any]) -> _Node:
        info = self.object_info.get(node.type)
        if not isinstance(info, Mapping):
            if node.type.startswith(("workflow>", "workflow/")) or node.type in self.group_nodes:
                raise UiGraphError(f"{node.type} is a legacy group node: convert it to a subgraph in the editor",
                                   str(node.id))
            raise UiGraphError(f"no node class {node.type!r} on this farm", str(node.id))
        if node.type in BROWSER_NODES:
            raise UiGraphError(f"{node.type}'s value is made by the web page; queue it from the editor", str(node.id))
        definition = self.node_defs.get(node.type) or self.node_defs.setdefault(node.type, _NodeDef(info))
        for name, (spec, _) in definition.specs.items():
            if _spec_type(spec) in BROWSER_WIDGET_TYPES:
                raise UiGraphError(f"input {name} is a {_spec_type(spec)} widget, which only the web page fills",
                                   str(node.id))
        widgets = definition.widgets()
        for widget, value in zip(widgets, definition.migrated(values, widgets), strict=False):
            widget.write(value)
        _wrap_upload(definition, widgets)
        properties = node.properties if node.type in SAVE_TYPES else {SR_PROPERTY: node.type, **node.properties}
        title = node.title or str(info.get("display_name") or info.get("name") or node.type)
        return replace(node, inputs=_merged_slots(definition.slots(), node.inputs),
                       outputs=_merged_outputs(info.get("output") or [], node.outputs),
                       widgets=widgets, properties=properties, title=title)

    def subgraph(self, subgraph_id: str, node_id: str | None) -> _Graph:
        """A definition's graph, built once: its instances share its nodes, as the page's do."""
        if subgraph_id in self.loading:
            raise UiGraphError(f"subgraph {subgraph_id} contains itself", node_id)
        if subgraph_id not in self.subgraphs:
            self.loading.append(subgraph_id)
            self.subgraphs[subgraph_id] = self.graph(self.definitions[subgraph_id], subgraph_id)
            self.loading.pop()
        return self.subgraphs[subgraph_id]

    def used_subgraphs(self) -> list[_Graph]:
        """The definitions in use, in the file's order, as graph.serialize() goes through them."""
        return [self.subgraphs[key] for key in self.definitions if key in self.subgraphs]

    def _subgraph_node(self, node: _Node, values: list[Any]) -> _Node:
        subgraph = self.subgraph(node.type, str(node.id))
        inputs = node.inputs + [_Slot(name, None) for name, _ in subgraph.inputs[len(node.inputs):]]
        widgets = _promoted_widgets(subgraph, inputs)
        for widget, value in zip(widgets, values, strict=False):
            widget.write(value)
        names = {w.name for w in widgets}
        inputs = [replace(s, widget=s.name) if s.name in names else s for s in inputs]
        node = replace(node, inputs=inputs, widgets=widgets, virtual=True, subgraph=subgraph,
                       title=node.title or subgraph.name)
        _proxy_widget_values(node, values)
        return node


def _mappings(items: Any) -> list[Mapping[str, Any]]:
    return [item for item in items if isinstance(item, Mapping)] if isinstance(items, list) else []


def _patch_samplers(graph: _Graph) -> None:
    """app.ts loadGraphData, top-level nodes only: KSampler's old `sample_` sampler names lose the prefix."""
    for node in graph.nodes.values():
        widget = node.widget("sampler_name") if node.type in ("KSampler", "KSamplerAdvanced") else None
        if widget is not None and isinstance(widget.value, str) and widget.value.startswith("sample_"):
            widget.write(widget.value[len("sample_"):])


def _merged_slots(defined: list[_Slot], saved: list[_Slot]) -> list[_Slot]:
    """ComfyNode.configure: the definition's inputs, with the file's links by name; unknown inputs after."""
    by_name = {slot.name: slot for slot in saved}
    merged = [replace(d, link=by_name[d.name].link, widget=d.widget or by_name[d.name].widget)
              if d.name in by_name else d for d in defined]
    names = {d.name for d in defined}
    return merged + [slot for slot in saved if slot.name not in names]


def _merged_outputs(types: list[Any], saved: list[tuple[Any, list[Any]]]) -> list[tuple[Any, list[Any]]]:
    """ComfyNode.configure: the definition's output types by position, the file's links; extra outputs kept."""
    merged = [(_spec_type([kind]), saved[i][1] if i < len(saved) else []) for i, kind in enumerate(types)]
    return merged + saved[len(types):]


def _wrap_upload(definition: _NodeDef, widgets: list[_Widget]) -> None:
    target = definition.upload_target()
    combo = next((w for w in widgets if target and w.name == target[0]), None)
    if target is None or combo is None:
        return
    spec = definition.specs[target[0]][0]
    combo.upload_folder = target[1]
    combo.initial = _js_string(_default("COMBO", spec))
    if combo.value is UNDEFINED:  # the value getter starts from `${default}`
        combo.value = combo.initial


def _promoted_widgets(subgraph: _Graph, inputs: list[_Slot]) -> list[_Widget]:
    """SubgraphNode: one widget per input whose links inside reach a widget, a copy of the first."""
    by_name = dict(subgraph.inputs)
    firsts = ((slot.name, next(_reached_widgets(subgraph, by_name.get(slot.name, [])), None)) for slot in inputs)
    return [inner.promoted(name) for name, inner in firsts if inner is not None]


def _reached_widgets(subgraph: _Graph, link_ids: list[Any]) -> Iterator[_Widget]:
    """The inner widgets a subgraph input's links go into (SubgraphInput.getConnectedWidgets)."""
    for link_id in link_ids:
        link = subgraph.links.get(link_id)
        target = subgraph.nodes.get(str(link.target_id)) if link else None
        if link is not None and target is not None and link.target_slot < len(target.inputs):
            inner = target.widget(target.inputs[link.target_slot].widget)
            if inner is not None:
                yield inner


def _sync_promoted(graph: _Graph) -> None:
    """SubgraphNode.serialize, which graphToPrompt runs: each promoted widget's value goes into every inner
    widget its input reaches, so the last instance of a subgraph sets the values its instances share."""
    for node in graph.nodes.values():
        if node.subgraph is None:
            continue
        for widget in node.widgets:
            if any(slot.name == widget.name for slot in node.inputs):
                for inner in _reached_widgets(node.subgraph, dict(node.subgraph.inputs).get(widget.name, [])):
                    inner.write(widget.read())


def _proxy_widget_values(node: _Node, values: list[Any]) -> None:
    """proxyWidget.ts onConfigure: `widgets_values` again, by position in `properties.proxyWidgets`, whose
    ["-1", name] entries are the promoted widgets (the panel's order, which the user may change)."""
    order = node.properties.get("proxyWidgets")
    if not isinstance(order, list):
        return
    for entry, value in zip(order, values, strict=False):
        widget = node.widget(entry[1]) if isinstance(entry, list) and len(entry) == 2 and entry[0] == "-1" else None
        if widget is not None and value is not None:
            widget.write(value)


def _fix_link_slots(graph: _Graph) -> None:
    """fixLinkInputSlots: a link's target slot is the index of the input that holds it."""
    for node in graph.nodes.values():
        for index, slot in enumerate(node.inputs):
            link = graph.links.get(slot.link) if slot.link else None
            if link is not None:
                graph.links[link.id] = replace(link, target_slot=index)
